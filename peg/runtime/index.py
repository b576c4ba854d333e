"""Sharded inner-product search: one FAISS index per Ray actor, per-query top-k merged.

The corpus matrix is cut into `num_shards` contiguous row ranges; each `ShardSearcher` actor
holds one range (memory per actor ~ corpus / num_shards). A search sends the queries to every
shard and merges the per-shard top-k. Order is total and deterministic: score descending, then
corpus row ascending, so ties never depend on the sharding. With the flat index the merged
result equals one exact `faiss.IndexFlatIP` over the whole corpus, ids and scores.
With `in_process` the same shard searchers are plain objects in this process (no Ray), searched
in turn and merged the same way: the results are identical to the actors'.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import faiss
import numpy as np
import ray

from peg.errors import PegError

IndexKind = Literal["flat", "ivf", "hnsw"]


class EmptyShardError(PegError, ValueError):
    """A corpus shard would hold no passages (more shards than passages, or an empty corpus)."""


def build_index(matrix: np.ndarray, kind: IndexKind, *, ivf_nlist: int = 1024, ivf_nprobe: int = 32,
                hnsw_m: int = 32, hnsw_ef_search: int = 128, use_gpu: bool = False) -> faiss.Index:
    """An inner-product FAISS index over `matrix` (float32 [n, dim]); on GPU when asked and available."""
    dim = matrix.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "ivf":
        nlist = max(1, min(ivf_nlist, len(matrix) // 39))  # FAISS wants >= 39 training points a list
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.nprobe = min(ivf_nprobe, nlist)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = hnsw_ef_search
    else:
        raise ValueError(f"unknown index kind {kind!r} (flat, ivf, hnsw)")
    if use_gpu and kind != "hnsw" and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    if not index.is_trained:
        index.train(matrix)
    index.add(matrix)
    return index


def exact_top_k(index: faiss.Index, queries: np.ndarray, k: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of `index` (holding `size` vectors) ordered by (score desc, row asc), ties resolved exactly.

    FAISS orders equal scores arbitrarily and may cut a tie group at k; search deeper until the
    k-th score is strictly above the last one found (or the index is exhausted), then sort.
    Returns (scores float32 [Q, k'], rows int64 [Q, k']) with k' = min(k, size).
    """
    k = min(k, size)
    depth = min(size, k + 1)
    while True:
        scores, rows = index.search(queries, depth)
        if depth == size or k == 0 or bool(np.all(scores[:, k - 1] > scores[:, depth - 1])):
            break
        depth = min(size, depth * 2)
    rows = np.where(rows < 0, np.iinfo(np.int64).max, rows)  # approximate indexes pad with -1
    order = np.lexsort((rows, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)


class ShardSearcher:
    """Ray actor: a FAISS index over corpus rows [offset, offset + len(matrix))."""

    def __init__(self, matrix: np.ndarray, offset: int, kind: IndexKind, options: dict):
        self.offset = offset
        self.size = len(matrix)
        self.index = build_index(np.ascontiguousarray(matrix, dtype=np.float32), kind, **options)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [Q, k'], global rows [Q, k']) in (score desc, row asc) order."""
        scores, rows = exact_top_k(self.index, np.ascontiguousarray(queries, dtype=np.float32), k, self.size)
        return scores, np.where(rows < self.size, rows + self.offset, -1)


def merge_top_k(parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard (scores, rows) into the global top-k by (score desc, row asc); -1 rows last."""
    scores = np.concatenate([s for s, _ in parts], axis=1)
    rows = np.concatenate([r for _, r in parts], axis=1)
    sort_rows = np.where(rows < 0, np.iinfo(np.int64).max, rows)
    order = np.lexsort((sort_rows, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)


def search_shards(actors: Sequence, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Send `queries` to every shard (Ray actors, or `ShardSearcher`s in this process) and merge:
    (scores [Q, k], corpus rows [Q, k])."""
    if all(isinstance(actor, ShardSearcher) for actor in actors):
        return merge_top_k([actor.search(queries, k) for actor in actors], k)
    queries_ref = ray.put(np.ascontiguousarray(queries, dtype=np.float32))
    parts = ray.get([actor.search.remote(queries_ref, k) for actor in actors])
    return merge_top_k(parts, k)


class ShardedIndex:
    """A corpus index spread over `num_shards` Ray actors (needs a Ray session: `peg.runtime.ray_session`),
    or with `in_process` over `num_shards` searchers in this process."""

    def __init__(
        self,
        embeddings: np.ndarray,
        ids: Sequence[str],
        num_shards: int,
        index_kind: IndexKind = "flat",
        *,
        actor_cpus: float = 0.5,
        actor_gpus: float = 0.0,
        in_process: bool = False,
        **index_options,
    ):
        if len(ids) != len(embeddings):
            raise ValueError(f"{len(ids)} ids for {len(embeddings)} embeddings")
        if len(embeddings) == 0:
            raise EmptyShardError("cannot index an empty corpus: every shard would be empty")
        if num_shards > len(embeddings):
            raise EmptyShardError(
                f"mining.num_shards ({num_shards}) exceeds the corpus size ({len(embeddings)} passages): "
                f"shards {len(embeddings)}..{num_shards - 1} would be empty"
            )
        self.ids = list(ids)
        self.size = len(embeddings)
        bounds = np.linspace(0, self.size, num_shards + 1).round().astype(int)
        options = {**index_options, "use_gpu": actor_gpus > 0}
        if in_process:
            self.actors = [ShardSearcher(embeddings[a:b], int(a), index_kind, options)
                           for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
            return
        cpus = ray.cluster_resources().get("CPU", 0)
        if num_shards * actor_cpus > cpus:
            raise ValueError(
                f"{num_shards} shard actors x {actor_cpus} CPUs (mining.num_shards x mining.actor_cpus) exceed the "
                f"{cpus:g} CPUs of the Ray cluster: they could never all start; lower mining.actor_cpus"
            )
        remote = ray.remote(num_cpus=actor_cpus, num_gpus=actor_gpus)(ShardSearcher)
        self.actors = [
            remote.remote(ray.put(np.ascontiguousarray(embeddings[a:b], dtype=np.float32)), int(a), index_kind, options)
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        ]

    def search_rows(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32 [Q, k'], corpus rows int64 [Q, k']), k' = min(k, corpus size)."""
        return search_shards(self.actors, queries, min(k, self.size))

    def search(self, queries: np.ndarray, k: int) -> tuple[list[list[str]], np.ndarray]:
        """(ids [Q][k'], scores [Q, k']): per query, the top-k passages by score, ties by corpus order."""
        scores, rows = self.search_rows(queries, k)
        return [[self.ids[r] for r in row if r >= 0] for row in rows], scores

    def close(self) -> None:
        """Stop the shard actors (or drop the in-process searchers)."""
        for actor in self.actors:
            if not isinstance(actor, ShardSearcher):
                ray.kill(actor)
        self.actors = []
