"""Hard-negative selection from a query's ranked candidates (pure functions, no Ray; docs/methods.md §5).

Each candidate is checked against the rules in this order; the first rule that applies drops
it and is the one counted:

1. `positive`: a positive of the query;
2. `duplicate_of_positive`: a passage whose text is identical to a positive's;
3. `rank_window` (selection = rank_window): its rank is outside [start, end);
4. `max_score`: s(q, n) > mining.max_score;
5. `relative_margin` (selection = topk_percpos, NV-Retriever's TopK-PercPos):
   s(q, n) > relative_margin * s_ref;
6. `absolute_margin`: s(q, n) > s_ref - absolute_margin;

where s_ref is the query's reference positive score (`reference_positive_score`): the lowest of
its positives' scores (`mining.positive_reference: lowest`, strict: a negative must score below
every positive) or the highest (`highest`: for collections whose queries have many weakly judged
positives, where the lowest positive scores below nearly every candidate).

Of the survivors, topk_percpos keeps the `negatives_per_query` highest scored; rank_window
samples that many uniformly with an RNG seeded by (mining.seed, query id), so the choice does not
depend on sharding or order. A query with fewer survivors keeps what it has (never padded with
random passages, which may be positives) and is counted as short.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from peg.config import MiningConfig

RULES = ("positive", "duplicate_of_positive", "rank_window", "max_score", "relative_margin", "absolute_margin")


@dataclass
class Selection:
    """The chosen negatives (corpus rows and retrieval scores, by rank) and why others were dropped."""

    rows: list[int]
    scores: list[float]
    dropped: Counter = field(default_factory=Counter)
    not_selected: int = 0


def reference_positive_score(positive_scores: Sequence[float], mining: MiningConfig) -> float:
    """s_ref of the margin rules: the lowest or the highest positive score, as `mining.positive_reference` says."""
    return min(positive_scores) if mining.positive_reference == "lowest" else max(positive_scores)


def drop_reason(
    rank: int, row: int, score: float, positives: set[int], duplicates: set[int], reference: float, mining: MiningConfig
) -> str | None:
    """The first rule that drops the candidate at `rank` (see the module docstring), or None."""
    if row in positives:
        return "positive"
    if row in duplicates:
        return "duplicate_of_positive"
    if mining.selection == "rank_window" and not mining.rank_window[0] <= rank < mining.rank_window[1]:
        return "rank_window"
    if mining.max_score is not None and score > mining.max_score:
        return "max_score"
    if mining.selection == "topk_percpos" and score > mining.relative_margin * reference:
        return "relative_margin"
    if mining.absolute_margin is not None and score > reference - mining.absolute_margin:
        return "absolute_margin"
    return None


def select_negatives(
    query_id: str,
    rows: Sequence[int],
    scores: Sequence[float],
    positives: set[int],
    duplicates: set[int],
    reference: float,
    mining: MiningConfig,
) -> Selection:
    """Pick up to `mining.negatives_per_query` negatives from candidates ranked by score (rank 0
    first); `reference`: the query's reference positive score (`reference_positive_score`)."""
    survivors: list[tuple[int, float]] = []
    dropped: Counter = Counter()
    for rank, (row, score) in enumerate(zip(rows, scores, strict=True)):
        if row < 0:  # an approximate index found fewer than k
            continue
        reason = drop_reason(rank, int(row), float(score), positives, duplicates, reference, mining)
        if reason:
            dropped[reason] += 1
        else:
            survivors.append((int(row), float(score)))
    n = mining.negatives_per_query
    if mining.selection == "rank_window" and len(survivors) > n:
        rng = np.random.default_rng([mining.seed, zlib.crc32(query_id.encode())])
        chosen = sorted(rng.choice(len(survivors), size=n, replace=False).tolist())
    else:
        chosen = list(range(min(n, len(survivors))))
    return Selection(
        rows=[survivors[i][0] for i in chosen],
        scores=[survivors[i][1] for i in chosen],
        dropped=dropped,
        not_selected=len(survivors) - len(chosen),
    )
