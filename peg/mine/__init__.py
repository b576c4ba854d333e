"""Hard-negative mining on Ray: encoding (Ray Data), sharded FAISS search, negative selection."""

from peg.mine.encode import EmbeddingSet, encode_corpus, encode_queries, encode_texts
from peg.mine.search import EmptyShardError, ShardedIndex
from peg.mine.select import Selection, select_negatives
from peg.mine.session import ray_session
from peg.mine.stage import MineResult, MiningError, run_encode, run_mine

__all__ = [
    "EmbeddingSet",
    "EmptyShardError",
    "MineResult",
    "MiningError",
    "Selection",
    "ShardedIndex",
    "encode_corpus",
    "encode_queries",
    "encode_texts",
    "ray_session",
    "run_encode",
    "run_mine",
    "select_negatives",
]
