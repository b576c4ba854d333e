"""Shared pieces of the SciFact quality benchmarks (teacher_quality.py, effectiveness.py): data,
the base model's cached embeddings, seeded query subsets and a dev split carved from the TRAIN
queries (never the test split).

Embeddings go through peg's own encode cache (`peg.runtime.embeddings`), in a local store
(`--store`, default /tmp/peg-quality), so every benchmark and rerun encodes the corpus once.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np

from peg.config import RunConfig
from peg.data import BeirDataset
from peg.eval.retrieval import search

ROOT = Path(__file__).resolve().parents[1]
SCIFACT = Path(os.environ.get("PEG_SCIFACT", ROOT.parent / "shared" / "data" / "scifact"))  # ../shared beside the repo
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_STORE = "/tmp/peg-quality"
RUN_NAME = "scifact-bench"


def bench_config(store: str, model: str = MINILM, beir: Path = SCIFACT, **sections) -> RunConfig:
    """A RunConfig over the BEIR folder `beir` (default SciFact) for the benchmarks (encode with one
    2-thread actor), named `<folder name>-bench` (SciFact: RUN_NAME), so each collection's stages
    have their own keys in a shared store; `sections` update the sections they name key by key."""
    config = {
        "name": RUN_NAME if beir == SCIFACT else f"{beir.name}-bench",
        "data": {"beir": str(beir)},
        "model": {"name_or_path": model},
        "encode": {"num_actors": 1, "actor_cpus": 2.0, "batch_size": 32},
        "store": {"uri": store},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    return RunConfig.model_validate(config)


def seeded_subset(ids: list[str], size: int | None, seed: int) -> list[str]:
    """The first `size` ids of a `random.Random(seed)` shuffle (all if size is None): a smaller
    size gives a prefix of a larger one's list, so cached per-query work carries over."""
    shuffled = sorted(ids)
    random.Random(seed).shuffle(shuffled)
    return shuffled[:size]


def dev_split(train: BeirDataset, size: int, seed: int = 0) -> list[str]:
    """A dev split carved from the train queries (settings are chosen here, never on test)."""
    return seeded_subset(list(train.queries), size, seed)


def embed_split(config: RunConfig, data: BeirDataset) -> tuple[list[str], np.ndarray, list[str], np.ndarray]:
    """(query ids, query embeddings, passage ids, passage embeddings), through the encode cache."""
    from peg.runtime import encode_corpus, encode_queries, ray_session
    from peg.store import open_store

    store = open_store(config.store)
    with ray_session(num_cpus=2):
        corpus = encode_corpus(config, store, data.corpus.values(), show_progress=True)
        queries = encode_queries(config, store, data.queries, show_progress=True)
    return queries.ids, queries.matrix, corpus.ids, corpus.matrix


def top_k(query_emb: np.ndarray, passage_emb: np.ndarray, passage_ids: list[str], k: int) -> list[list[tuple[str, float]]]:
    """Each query's top `k` (passage id, cosine) by exact search."""
    scores, rows = search(query_emb, passage_emb, k)
    return [[(passage_ids[j], float(s)) for j, s in zip(r, sc) if j >= 0] for r, sc in zip(rows, scores)]


if __name__ == "__main__":  # warm the cache: base embeddings of the corpus, test and train queries
    import sys

    store = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_STORE
    config = bench_config(store)
    for split in ("test", "train"):
        ids, _, pids, _ = embed_split(config, BeirDataset.load(SCIFACT, split))
        print(f"{split}: {len(ids)} queries, {len(pids)} passages embedded", flush=True)
