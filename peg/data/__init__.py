"""Data IO: BEIR folders and training-pair JSONL, streamed and validated."""

from peg.data.beir import BeirDataset, Passage, iter_corpus, load_qrels, load_queries
from peg.data.errors import DataError
from peg.data.pairs import TrainingExample, iter_examples, write_examples

__all__ = [
    "BeirDataset",
    "DataError",
    "Passage",
    "TrainingExample",
    "iter_corpus",
    "iter_examples",
    "load_qrels",
    "load_queries",
    "write_examples",
]
