"""Retrieval evaluation: exact search, TREC run files, trec_eval metrics (pytrec_eval)."""

from peg.eval.metrics import compute_metrics, search_depth
from peg.eval.retrieval import EvalResult, evaluate_embeddings, evaluate_model
from peg.eval.runfile import read_run, write_run

__all__ = [
    "EvalResult",
    "compute_metrics",
    "evaluate_embeddings",
    "evaluate_model",
    "search_depth",
    "read_run",
    "write_run",
]
