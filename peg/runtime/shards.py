"""One sharded-task runner on Ray, used by every sharded stage (mine, judge, score, synth).

Items are cut into shards of `shard_size`; a pool of Ray actors builds its processor once (loads
a model, holds index handles) and processes one shard per call. A shard's outputs are put to the
store as `<base>/shard-NNNNN.<part>` the moment it finishes (the last part listed marks the shard
as done). A rerun skips shards stored with the same config hash, so a killed stage, or one with a
failed shard, redoes only what is missing. A failing shard does not stop the others; the stage
then raises `ShardsFailed` naming every failed shard.

A stage whose data fits in this machine's memory, off a cluster, runs `in_process` instead
(`run_here` decides and logs why): the processor is built once here and the shards run one after
another with all the machine's cores, with the same store keys, resume and failure rules. On a
laptop that saves the Ray start, one worker process and one model copy per actor.

Fault injection (tests, drills): `PEG_FAIL_SHARDS="3,mine:1"` makes shard 3 of every stage and
shard 1 of `mine` raise inside its Ray call.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import ray

from peg.config import ConfigError
from peg.errors import PegError
from peg.process import available_cpus
from peg.progress import progress_bar
from peg.store import ArtifactStore

FAIL_SHARDS_ENV = "PEG_FAIL_SHARDS"

logger = logging.getLogger(__name__)

# In-process work may take at most this share of the memory available now.
IN_PROCESS_MEMORY_SHARE = 0.5

# A shard processor: (shard number, items) -> a result. Built inside the actor.
Processor = Callable[[int, list], Any]


class ShardsFailed(PegError, RuntimeError):
    """Some shards of a stage failed; `failed` maps shard number -> error text. One line."""

    def __init__(self, stage: str, failed: dict[int, str], stored: int):
        self.stage = stage
        self.failed = failed
        first, *others = sorted(failed)
        more = f" (also failed: {', '.join(f'{s:05d}' for s in others)})" if others else ""
        super().__init__(
            f"{stage} shard {first:05d} failed: {failed[first]}{more}; "
            f"{stored} other shard(s) are stored and will be reused"
        )


class Pool(Protocol):
    """How many actors run shards and what each one reserves (an `LLMConfig` is one)."""

    num_actors: int
    actor_cpus: float
    actor_gpus: float


@dataclass(frozen=True)
class WorkerPool:
    num_actors: int = 1
    actor_cpus: float = 0.5
    actor_gpus: float = 0.0


class ShardWorker:
    """Ray actor (or, in process, a plain object): builds its processor once, then processes shards.
    `threads` sets torch's intra-op threads; None keeps the process's own (all cores)."""

    def __init__(self, build: Callable[[], Processor], threads: int | None):
        import torch

        if threads is not None:
            torch.set_num_threads(threads)
        self.process = build()

    def run(self, stage: str, shard: int, items: list, fail: bool) -> Any:
        if fail:
            raise RuntimeError(f"injected failure ({FAIL_SHARDS_ENV}) in {stage} shard {shard:05d}")
        return self.process(shard, items)


def run_here(stage: str, need_bytes: int, placement: str = "auto") -> bool:
    """Whether `stage` runs in this process (True) or on Ray actors (False); the choice is logged.

    placement "process" / "ray" force it. "auto": on Ray when RAY_ADDRESS names a cluster (the
    stage runs there, with that cluster's workers), or when `need_bytes` (the stage's data in
    memory) exceeds IN_PROCESS_MEMORY_SHARE of the memory available now; otherwise in process.
    """
    import psutil

    available = psutil.virtual_memory().available
    size = f"{need_bytes / 2**30:.2f} GiB of data, {available / 2**30:.1f} GiB available"
    if placement != "auto":
        here, why = placement == "process", f"placement: {placement}"
    elif os.environ.get("RAY_ADDRESS"):
        here, why = False, "RAY_ADDRESS names a Ray cluster"
    elif need_bytes > IN_PROCESS_MEMORY_SHARE * available:
        here, why = False, f"more than {IN_PROCESS_MEMORY_SHARE:.0%} of the memory available"
    else:
        here, why = True, f"fits in {IN_PROCESS_MEMORY_SHARE:.0%} of the memory available, not on a cluster"
    where = f"in this process ({available_cpus()} CPUs, no Ray actors)" if here else "on Ray actors"
    logger.info("%s: runs %s: %s (%s)", stage, where, why, size)
    return here


def failed_shards_from_env(stage: str) -> set[int]:
    """Shard numbers of `stage` that `PEG_FAIL_SHARDS` asks to fail."""
    value = os.environ.get(FAIL_SHARDS_ENV, "").strip()
    shards = set()
    for entry in filter(None, (e.strip() for e in value.split(","))):
        name, _, number = entry.rpartition(":")
        if not number.isdigit():
            raise ConfigError(f"{FAIL_SHARDS_ENV}={value!r}: expected comma-separated [stage:]shard numbers")
        if name in ("", stage):
            shards.add(int(number))
    return shards


def shard_key(base: str, shard: int, part: str) -> str:
    return f"{base}/shard-{shard:05d}.{part}"


def num_shards(num_items: int, shard_size: int) -> int:
    return (num_items + shard_size - 1) // shard_size


def is_stored(store: ArtifactStore, keys: Sequence[str], config_hash: str) -> bool:
    for key in keys:
        manifest = store.manifest(key) if store.exists(key) else None
        if manifest is None or manifest.config_hash != config_hash:
            return False
    return True


def missing_shards(
    store: ArtifactStore, base: str, num_items: int, shard_size: int, parts: Sequence[str], config_hash: str
) -> list[int]:
    """Shard numbers not yet stored (with this config hash) for `num_items` items."""
    shards = range(num_shards(num_items, shard_size))
    return [s for s in shards if not is_stored(store, [shard_key(base, s, p) for p in parts], config_hash)]


def input_identity(store: ArtifactStore, key: str) -> str:
    """A stored input's sha256 prefix, part of a stage's config hash (a changed input redoes it)."""
    manifest = store.manifest(key)
    return manifest.sha256[:16] if manifest else "missing"


def root_cause(error: Exception) -> str:
    """The innermost error of a Ray task failure, one line: 'Type: message'."""
    cause = getattr(error, "cause", None) or error
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}".rstrip(": ")


def run_shards(
    *,
    stage: str,
    store: ArtifactStore,
    base: str,
    items: Sequence[Any],
    shard_size: int,
    parts: Sequence[str],
    build: Callable[[], Processor],
    pool: Pool,
    config_hash: str,
    to_files: Callable[[int, Any], dict[str, str]] = lambda shard, result: result,
    show_progress: bool = True,
    unit: str = "items",
    in_process: bool = False,
) -> tuple[list[int], list[int]]:
    """Process `items` in shards of `shard_size` on `pool.num_actors` Ray actors, or with
    `in_process` one after another in this process (one processor, no Ray session needed).

    Each result goes through `to_files(shard, result)` on the driver ({part: file text}) and is
    stored at once. The Ray path needs a Ray session (`peg.runtime.ray_session`). Returns (shards
    computed now, shards reused). Raises `ShardsFailed` after the other shards finished if any
    shard failed.
    """
    shards = list(range(num_shards(len(items), shard_size)))
    todo = missing_shards(store, base, len(items), shard_size, parts, config_hash)
    reused = [s for s in shards if s not in todo]
    if not todo:
        return [], reused
    fail = failed_shards_from_env(stage)

    def shard_items(s: int) -> list:
        return list(items[s * shard_size : (s + 1) * shard_size])

    def put(s: int, result: Any) -> None:
        files = to_files(s, result)
        for part in parts:  # the last part marks the shard as done
            store.put_text(shard_key(base, s, part), files[part], producer=stage, config_hash=config_hash)

    failed: dict[int, str] = {}
    total = sum(len(shard_items(s)) for s in todo)
    if in_process:
        worker = ShardWorker(build, None)
        with progress_bar(total, stage, enabled=show_progress, unit=unit) as advance:
            for s in todo:
                try:
                    result = worker.run(stage, s, shard_items(s), s in fail)
                except Exception as e:  # the shard raised: record it, finish the others
                    failed[s] = f"{type(e).__name__}: {e}"
                    continue
                put(s, result)
                advance(len(shard_items(s)))
        if failed:
            raise ShardsFailed(stage, failed, stored=len(shards) - len(failed))
        return todo, reused
    actor_class = ray.remote(ShardWorker).options(
        num_cpus=pool.actor_cpus, num_gpus=pool.actor_gpus, max_restarts=0, max_task_retries=0
    )
    build_ref = ray.put(build)
    threads = max(1, round(pool.actor_cpus))
    idle = [actor_class.remote(build_ref, threads) for _ in range(actors_that_fit(stage, pool, min(pool.num_actors, len(todo))))]
    queue = list(todo)
    pending: dict[Any, tuple[int, Any]] = {}
    with progress_bar(total, stage, enabled=show_progress, unit=unit) as advance:
        while queue or pending:
            while queue and idle:
                s, actor = queue.pop(0), idle.pop()
                pending[actor.run.remote(stage, s, shard_items(s), s in fail)] = (s, actor)
            [ref], _ = ray.wait(list(pending), num_returns=1)
            s, actor = pending.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError as e:  # the actor died (or failed to load): replace it
                failed[s] = root_cause(e)
                ray.kill(actor)
                if queue:
                    idle.append(actor_class.remote(build_ref, threads))
                continue
            except Exception as e:  # the shard raised: record it, keep the actor, finish the others
                failed[s] = root_cause(e)
                idle.append(actor)
                continue
            idle.append(actor)
            put(s, result)
            advance(len(shard_items(s)))
    for actor in idle:
        ray.kill(actor)
    if failed:
        raise ShardsFailed(stage, failed, stored=len(shards) - len(failed))
    return todo, reused


def actors_that_fit(stage: str, pool: Pool, wanted: int, wait_seconds: float = 30.0) -> int:
    """How many of `wanted` actors of the pool's size the Ray session has room for now. Each actor
    is handed shards as it frees, so an actor that could never be scheduled would hold its shard
    forever: a pool larger than the free CPUs/GPUs (another actor holds some, e.g. synth's search
    index) runs with the actors that fit, saying so. When none fits, this waits up to
    `wait_seconds` for actors being stopped to free theirs, then raises ConfigError."""
    deadline = time.monotonic() + wait_seconds
    while True:
        free, total = ray.available_resources(), ray.cluster_resources()
        fit = wanted
        for resource, need in (("CPU", pool.actor_cpus), ("GPU", pool.actor_gpus)):
            if need > 0:
                fit = min(fit, int(free.get(resource, 0) / need + 1e-9))
        if fit >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if fit < 1:
        raise ConfigError(
            f"{stage}: an actor of {pool.actor_cpus:g} CPUs and {pool.actor_gpus:g} GPUs does not fit the Ray session "
            f"({free.get('CPU', 0):g} of {total.get('CPU', 0):g} CPUs and {free.get('GPU', 0):g} of "
            f"{total.get('GPU', 0):g} GPUs free): lower the stage's actor_cpus/actor_gpus"
        )
    if fit < wanted:
        logger.warning("%s: %d actors of %g CPUs / %g GPUs asked, %d fit the Ray session's free %g CPUs / %g GPUs",
                       stage, wanted, pool.actor_cpus, pool.actor_gpus, fit, free.get("CPU", 0), free.get("GPU", 0))
    return fit


def read_shards(store: ArtifactStore, base: str, shards: Sequence[int], parts: Sequence[str]) -> dict[str, list[str]]:
    """Each part's stored text (verified), one entry a shard in the order of `shards`."""
    return {part: [store.read_text(shard_key(base, s, part)) for s in shards] for part in parts}
