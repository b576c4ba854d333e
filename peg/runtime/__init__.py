"""The shared runtime under `mine`, `llm` and `eval`: a Ray session, one sharded-task runner
(shard keys, resume, fault injection, `ShardsFailed`), the sharded FAISS index and the embedding
cache every run in a store shares."""

from peg.runtime.embeddings import EmbeddingSet, encode_corpus, encode_queries, encode_texts
from peg.runtime.index import EmptyShardError, ShardedIndex
from peg.runtime.session import ray_scope, ray_session
from peg.runtime.shards import ShardsFailed, WorkerPool, run_shards

__all__ = [
    "EmbeddingSet",
    "EmptyShardError",
    "ShardedIndex",
    "ShardsFailed",
    "WorkerPool",
    "encode_corpus",
    "encode_queries",
    "encode_texts",
    "ray_scope",
    "ray_session",
    "run_shards",
]
