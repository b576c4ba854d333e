"""The sharded-stage template: what mine, judge, score and synth share around their pure logic.

A sharded stage declares a `ShardedStage` (its shard parts, its processor, its pool and shard
size) and hands `run_sharded` its scope and items. The template runs the shards under the
scope's prefix with the scope's `shard_hash` (a changed config or input redoes them, a rerun
reuses what is stored) on Ray actors or in this process, reads every shard back verified, and gives the stage
a `ShardRun`: the per-part texts, summed shard stats and `put` for the stage's combined outputs.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from peg.store.scope import StageScope
from peg.runtime.session import ray_session
from peg.runtime.shards import Pool, Processor, missing_shards, read_shards, run_shards


@dataclass(frozen=True)
class ShardedStage:
    """A sharded stage's declaration. `parts`: each shard's files, the last one marking it done;
    `to_files(shard, result)`: the processor's result as {part: text} (default: it already is)."""

    parts: tuple[str, ...]
    build: Callable[[], Processor]
    pool: Pool
    shard_size: int
    unit: str = "items"
    to_files: Callable[[int, Any], dict[str, str]] = lambda shard, result: result


@dataclass(frozen=True)
class ShardRun:
    """The shards of one run of a sharded stage: which were computed now or reused, and their texts."""

    scope: StageScope
    computed: list[int]
    reused: list[int]
    texts: dict[str, list[str]]  # part -> one text a shard, in shard order

    def joined(self, part: str) -> str:
        """Every shard's `part`, concatenated in shard order."""
        return "".join(self.texts[part])

    def summed(self, part: str = "stats.json") -> dict[str, int]:
        """The shards' flat JSON stats of `part`, summed key by key."""
        totals: dict[str, int] = {}
        for text in self.texts[part]:
            for key, value in json.loads(text).items():
                totals[key] = totals.get(key, 0) + value
        return totals

    def counts(self) -> dict[str, int]:
        return {"shards_computed": len(self.computed), "shards_reused": len(self.reused)}

    def put(self, outputs: dict[str, str | dict]) -> tuple[str, ...]:
        """Put the stage's combined outputs ({name: text, or a dict stored as JSON}) under its prefix,
        in the order given (put the training file last: readers take its presence as done); their keys."""
        store, stage, config_hash = self.scope.store, self.scope.stage, self.scope.shard_hash
        for name, value in outputs.items():
            if isinstance(value, dict):
                store.put_json(self.scope.key(name), value, stage, config_hash)
            else:
                store.put_text(self.scope.key(name), value, stage, config_hash)
        return tuple(self.scope.key(name) for name in outputs)


@dataclass(frozen=True)
class StageReport:
    """What a sharded stage did: its report (report.json), the keys it wrote, and its summary
    lines (`headline(report)` then the keys), which `peg judge|score|synth` print."""

    report: dict
    keys: tuple[str, ...]
    headline: Callable[[dict], list[str]]

    def summary_lines(self) -> list[str]:
        return [*self.headline(self.report), f"wrote {', '.join(self.keys)}"]


def run_sharded(
    scope: StageScope, stage: ShardedStage, items: Sequence[Any], show_progress: bool = True, in_process: bool = False
) -> ShardRun:
    """Run `items` through `stage`'s processor in shards stored under `scope` (resuming), and read
    every shard back. Ray starts only if a shard is to be computed (a rerun that reuses every shard
    starts none); `in_process`: the shards run in this process, no Ray at all
    (`peg.runtime.shards.run_here` decides). Raises `ShardsFailed` after the other shards finished if any failed."""
    todo = missing_shards(scope.store, scope.prefix, len(items), stage.shard_size, stage.parts, scope.shard_hash)
    with ray_session() if todo and not in_process else contextlib.nullcontext():
        computed, reused = run_shards(
            stage=scope.stage, store=scope.store, base=scope.prefix, items=items, shard_size=stage.shard_size,
            parts=stage.parts, build=stage.build, pool=stage.pool, config_hash=scope.shard_hash,
            show_progress=show_progress, unit=stage.unit, to_files=stage.to_files, in_process=in_process,
        )
    texts = read_shards(scope.store, scope.prefix, sorted(computed + reused), stage.parts)
    return ShardRun(scope, computed, reused, texts)
