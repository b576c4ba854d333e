"""Sharded FAISS search on a real local Ray equals one exact index; negative selection rules."""

from __future__ import annotations

import os
import subprocess
import sys

import faiss
import numpy as np
import pytest
import ray

from peg.config import MiningConfig
from peg.mine import reference_positive_score, select_negatives
from peg.runtime import EmptyShardError, ShardedIndex


def corpus_with_ties(n: int = 600, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    corpus = rng.standard_normal((n, dim)).astype(np.float32)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    # Exact duplicates spread over different shards: equal scores that straddle shard boundaries.
    for src, dsts in ((3, (150, 299, 300, 451, 599)), (10, (11, 310)), (400, (5, 401))):
        for dst in dsts:
            corpus[dst] = corpus[src]
    queries = rng.standard_normal((40, dim)).astype(np.float32)
    queries[:8] = corpus[[3, 10, 400, 3, 10, 400, 150, 599]]  # queries whose top hits are tie groups
    return corpus, queries


def reference_top_k(corpus: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """One exact IndexFlatIP over everything, full ranking, ordered by (score desc, row asc)."""
    index = faiss.IndexFlatIP(corpus.shape[1])
    index.add(corpus)
    scores, rows = index.search(queries, len(corpus))
    order = np.lexsort((rows, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)


@pytest.mark.parametrize("num_shards", [2, 3])
def test_sharded_top_k_equals_single_exact_index(ray_local, num_shards):
    corpus, queries = corpus_with_ties()
    ids = [f"doc{i}" for i in range(len(corpus))]
    index = ShardedIndex(corpus, ids, num_shards=num_shards, index_kind="flat", actor_cpus=0.25)
    try:
        for k in (1, 4, 25, 250):  # 250 > a shard's 200 passages when num_shards = 3
            got_ids, got_scores = index.search(queries, k)
            want_scores, want_rows = reference_top_k(corpus, queries, k)
            assert got_ids == [[ids[r] for r in row] for row in want_rows], k
            assert np.array_equal(got_scores, want_scores), k  # bit for bit
    finally:
        index.close()
    # The tie groups are really exercised: query 0 hits the 6 copies of passage 3, in row order.
    assert got_ids[0][:6] == ["doc3", "doc150", "doc299", "doc300", "doc451", "doc599"]
    assert len(set(got_scores[0, :6].tolist())) == 1


def test_approximate_indexes_find_exact_duplicates(ray_local):
    corpus, queries = corpus_with_ties(n=2000, dim=16, seed=1)
    ids = [str(i) for i in range(len(corpus))]
    _, want_rows = reference_top_k(corpus, corpus[:50], 1)
    for kind in ("ivf", "hnsw"):
        index = ShardedIndex(corpus, ids, num_shards=1, index_kind=kind, ivf_nlist=8, ivf_nprobe=8)
        try:
            got_ids, got_scores = index.search(corpus[:50], 5)
        finally:
            index.close()
        # Each passage finds itself (or its lower-row duplicate) first; nprobe = nlist makes IVF exhaustive.
        assert [row[0] for row in got_ids] == [ids[r] for r in want_rows[:, 0]], kind
        assert np.all(np.diff(got_scores, axis=1) <= 0), kind


def test_more_shards_than_passages_is_a_clear_error(ray_local):
    corpus = np.eye(3, dtype=np.float32)
    with pytest.raises(EmptyShardError, match=r"mining.num_shards \(5\) exceeds the corpus size \(3 passages\)"):
        ShardedIndex(corpus, ["a", "b", "c"], num_shards=5)
    with pytest.raises(EmptyShardError, match="empty corpus"):
        ShardedIndex(np.empty((0, 3), np.float32), [], num_shards=1)


def test_more_shard_actors_than_cpus_is_a_clear_error_not_a_hang(ray_local):
    with pytest.raises(ValueError, match=r"5 shard actors x 0.5 CPUs .* exceed the 2 CPUs"):
        ShardedIndex(np.eye(8, dtype=np.float32), list("abcdefgh"), num_shards=5, actor_cpus=0.5)


def test_ray_session_joins_the_cluster_named_by_ray_address(ray_local):
    """What a KubeRay RayJob does: RAY_ADDRESS set -> connect to that cluster, start none."""
    address = ray.get_runtime_context().gcs_address
    code = (
        "import ray\nfrom peg.runtime import ray_session\n"
        "with ray_session():\n    print(ray.get_runtime_context().gcs_address)\n"
        "print(ray.is_initialized())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "RAY_ADDRESS": address},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [address, "False"]


def test_ray_scope_starts_ray_only_when_a_session_is_needed_and_keeps_it_for_the_scope(ray_local):
    """`ray_scope`: no Ray while nothing needs it; the first `ray_session` inside connects, later
    ones reuse that session, and it ends with the scope."""
    code = (
        "import ray\nfrom peg.runtime import ray_scope, ray_session\n"
        "with ray_scope():\n"
        "    print(ray.is_initialized())\n"
        "    with ray_session():\n        first = ray.get_runtime_context().get_job_id()\n"
        "    with ray_session():\n        print(ray.get_runtime_context().get_job_id() == first)\n"
        "    print(ray.is_initialized())\n"
        "print(ray.is_initialized())\n"
    )
    address = ray.get_runtime_context().gcs_address
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "RAY_ADDRESS": address},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True", "True", "False"]


# ---- negative selection (pure functions) ----

def test_topk_percpos_drops_positives_duplicates_and_near_positives():
    mining = MiningConfig(negatives_per_query=3, relative_margin=0.9)
    rows = [7, 1, 2, 3, 4, 5, 6, 8]
    scores = [0.95, 0.9, 0.85, 0.79, 0.7, 0.6, 0.5, 0.4]
    # min positive 0.8 -> keep n only if s <= 0.72; row 1 is the positive's duplicate, row 7 the positive.
    sel = select_negatives("q1", rows, scores, positives={7}, duplicates={1}, reference=0.8, mining=mining)
    assert sel.rows == [4, 5, 6]
    assert sel.scores == [0.7, 0.6, 0.5]
    assert sel.dropped == {"positive": 1, "duplicate_of_positive": 1, "relative_margin": 2}
    assert sel.not_selected == 1


def test_positive_reference_highest_keeps_negatives_a_weak_positive_would_drop():
    """A query with a strong (0.9) and a weak (0.3) positive: against the lowest, every candidate
    above 0.95 x 0.3 is dropped; against the highest, those below 0.95 x 0.9 are kept."""
    positive_scores = [0.9, 0.3]
    rows, scores = [10, 11, 12, 13, 14], [0.9, 0.8, 0.6, 0.4, 0.2]
    kept = {}
    for reference in ("lowest", "highest"):
        mining = MiningConfig(negatives_per_query=3, positive_reference=reference)
        s_ref = reference_positive_score(positive_scores, mining)
        assert s_ref == {"lowest": 0.3, "highest": 0.9}[reference]
        kept[reference] = select_negatives("q", rows, scores, {10}, set(), s_ref, mining).rows
    assert kept == {"lowest": [14], "highest": [11, 12, 13]}


def test_absolute_margin_and_max_score_and_rule_order():
    mining = MiningConfig(negatives_per_query=5, relative_margin=1.0, absolute_margin=0.1, max_score=0.75)
    rows = [1, 2, 3, 4, 5]
    scores = [0.9, 0.8, 0.72, 0.65, 0.3]
    # max_score (0.75) takes 0.9 and 0.8 first; absolute margin: drop s > 0.8 - 0.1 = 0.7 -> 0.72.
    sel = select_negatives("q", rows, scores, positives=set(), duplicates=set(), reference=0.8, mining=mining)
    assert sel.rows == [4, 5]
    assert sel.dropped == {"max_score": 2, "absolute_margin": 1}


def test_short_query_gets_fewer_negatives_never_padding():
    mining = MiningConfig(negatives_per_query=4)
    sel = select_negatives("q", [0, 1, 2], [0.99, 0.98, 0.1], positives={0}, duplicates=set(),
                           reference=0.5, mining=mining)
    assert sel.rows == [2]  # 0 is the positive, 1 is above 0.95 * 0.5; nothing is padded in


def test_rank_window_samples_within_window_seeded_per_query():
    mining = MiningConfig(selection="rank_window", rank_window=(2, 8), top_k=10, negatives_per_query=3, seed=5)
    rows = list(range(100, 110))
    scores = [1.0 - 0.01 * i for i in range(10)]
    a = select_negatives("query-a", rows, scores, positives={103}, duplicates=set(), reference=0.2, mining=mining)
    again = select_negatives("query-a", rows, scores, positives={103}, duplicates=set(), reference=0.2, mining=mining)
    assert a.rows == again.rows and len(a.rows) == 3
    assert set(a.rows) <= {102, 104, 105, 106, 107} and a.rows == sorted(a.rows)
    assert a.dropped == {"rank_window": 4, "positive": 1}
    chosen = {tuple(select_negatives(f"q{i}", rows, scores, set(), set(), 0.2, mining).rows) for i in range(30)}
    assert len(chosen) > 1  # different queries sample differently
    assert all(set(c) <= set(range(102, 108)) for c in chosen)


def test_rank_window_config_checks():
    with pytest.raises(ValueError, match=r"top_k \(100\) must be >= the rank_window end \(210\)"):
        MiningConfig(selection="rank_window")
    with pytest.raises(ValueError, match="0 <= start < end"):
        MiningConfig(rank_window=(5, 5))
