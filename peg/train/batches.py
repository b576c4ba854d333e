"""Global training batches: each built from ONE dataset (file), then sliced per rank.

Every rank builds the same deterministic plan from (seed, epoch): within each dataset the
examples are shuffled and cut into global batches of `queries_per_step` (a short tail is
dropped), then the batches of all datasets are shuffled together. A batch position
(epoch, index) is all a checkpoint needs to continue the data stream exactly.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

from peg.errors import PegError
from peg.data.errors import DataError, iter_jsonl
from peg.data.pairs import parse_example

logger = logging.getLogger(__name__)


class BatchError(PegError, ValueError):
    """A batch shape that cannot be used with this world size or data."""


@dataclass(frozen=True)
class Query:
    """One training query with its passages [pos, neg_1..neg_n] and optional teacher scores."""

    query: str
    passages: tuple[str, ...]
    teacher_scores: tuple[float, ...] | None


@dataclass(frozen=True)
class RankBatch:
    """The part of a global batch one rank encodes."""

    dataset: str
    queries: list[str]
    passages: list[str]  # per query: pos, neg_1..neg_n
    teacher_scores: list[list[float]] | None  # per query: [1 + n]


def load_dataset(path: str | Path, hard_negatives: int, need_scores: bool) -> list[Query]:
    """Read a training-pair JSONL file into queries with exactly `hard_negatives` negatives each.

    Examples with fewer negatives (mining keeps no padding: a query may have too few) are
    skipped with a warning naming how many and the first line; if none is left it is an error.
    """
    path = Path(path)
    queries = []
    short: list[tuple[int, int]] = []  # (line, negatives) of skipped examples
    for lineno, obj in iter_jsonl(path):
        ex = parse_example(obj, path, lineno)
        if len(ex.neg) < hard_negatives:
            short.append((lineno, len(ex.neg)))
            continue
        scores = None
        if need_scores:
            missing = [k for k in ("pos_scores", "neg_scores") if getattr(ex, k) is None]
            if missing and not (hard_negatives == 0 and missing == ["neg_scores"]):
                raise DataError(
                    path, lineno, f"loss.kind=listwise needs teacher scores: missing {' and '.join(missing)}"
                )
            scores = (ex.pos_scores[0], *(ex.neg_scores or [])[:hard_negatives])
        queries.append(Query(ex.query, (ex.pos[0], *ex.neg[:hard_negatives]), scores))
    if short and not queries:
        line, count = short[0]
        raise DataError(
            path, line, f"{count} negatives, but batch.hard_negatives asks for {hard_negatives} (no example has enough)"
        )
    if not queries:
        raise DataError(path, None, "no training examples")
    if short:
        line, count = short[0]
        logger.warning(
            "%s: skipped %d of %d examples with fewer than %d negatives (first: line %d, %d negatives)",
            path, len(short), len(short) + len(queries), hard_negatives, line, count,
        )
    return queries


class BatchPlan:
    """Deterministic global batches over several datasets; `rank_batch` slices one for a rank."""

    def __init__(self, datasets: dict[str, list[Query]], queries_per_step: int, world_size: int, seed: int):
        if queries_per_step % world_size:
            raise BatchError(
                f"batch.queries_per_step ({queries_per_step}) does not divide across {world_size} ranks"
            )
        self.datasets = datasets
        self.queries_per_step = queries_per_step
        self.world_size = world_size
        self.seed = seed
        too_small = [name for name, qs in datasets.items() if len(qs) < queries_per_step]
        if too_small:
            raise BatchError(
                f"batch.queries_per_step ({queries_per_step}) exceeds the examples in {', '.join(too_small)}"
            )

    @property
    def steps_per_epoch(self) -> int:
        return sum(len(qs) // self.queries_per_step for qs in self.datasets.values())

    def epoch_batches(self, epoch: int) -> list[tuple[str, list[int]]]:
        """(dataset, example indices) for every global batch of `epoch`, in training order."""
        rng = random.Random(f"{self.seed}:{epoch}")
        batches = []
        for name in sorted(self.datasets):
            order = list(range(len(self.datasets[name])))
            rng.shuffle(order)
            q = self.queries_per_step
            batches += [(name, order[i : i + q]) for i in range(0, len(order) - q + 1, q)]
        rng.shuffle(batches)
        return batches

    def rank_batch(self, dataset: str, indices: list[int], rank: int) -> RankBatch:
        per_rank = self.queries_per_step // self.world_size
        mine = [self.datasets[dataset][i] for i in indices[rank * per_rank : (rank + 1) * per_rank]]
        scores = None if mine[0].teacher_scores is None else [list(q.teacher_scores) for q in mine]
        return RankBatch(dataset, [q.query for q in mine], [p for q in mine for p in q.passages], scores)
