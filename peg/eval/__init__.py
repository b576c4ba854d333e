"""Retrieval evaluation: exact search, TREC run files, trec_eval metrics (pytrec_eval)."""

from peg.eval.metrics import MEASURES, compute_metrics
from peg.eval.retrieval import EvalResult, evaluate_embeddings, evaluate_model
from peg.eval.runfile import read_run, write_run

__all__ = [
    "MEASURES",
    "EvalResult",
    "compute_metrics",
    "evaluate_embeddings",
    "evaluate_model",
    "read_run",
    "write_run",
]
