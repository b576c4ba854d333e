"""Sharded LLM stages on Ray: each shard of items is processed by an actor holding the model.

A shard's outputs are put to the store as `<base>/shard-NNNNN.<part>` the moment it finishes
(the last part listed marks the shard as done). A rerun skips shards stored with the same config
hash, so a killed stage, or one with a failed shard, redoes only what is missing. A failing shard
does not stop the others; the stage then raises `ShardsFailed` naming every failed shard.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import ray

from peg.errors import PegError
from peg.config import ConfigError, LLMConfig
from peg.progress import progress_bar
from peg.store import ArtifactStore

# Fault injection for tests and drills: comma-separated shard numbers whose Ray call raises.
FAIL_SHARDS_ENV = "PEG_LLM_FAIL_SHARDS"

# A shard processor: (shard number, items) -> {part: file content}. Built inside the actor.
Processor = Callable[[int, list], dict[str, str]]


class ShardsFailed(PegError, RuntimeError):
    """Some shards of a stage failed; `failed` maps shard number -> error text."""

    def __init__(self, stage: str, failed: dict[int, str], stored: int):
        self.stage = stage
        self.failed = failed
        lines = [f"{stage} shard {s:05d} failed: {err}" for s, err in sorted(failed.items())]
        super().__init__(
            "\n".join(lines) + f"\n{stored} other shard(s) are stored; rerun `peg {stage}` to redo only the failed shard(s)"
        )


class ShardWorker:
    """Ray actor: builds its processor (loads the model) once, then processes shards."""

    def __init__(self, build: Callable[[], Processor], threads: int):
        import torch

        torch.set_num_threads(threads)
        self.process = build()

    def run(self, shard: int, items: list, fail: bool) -> dict[str, str]:
        if fail:
            raise RuntimeError(f"injected failure ({FAIL_SHARDS_ENV}) in shard {shard:05d}")
        return self.process(shard, items)


def failed_shards_from_env() -> set[int]:
    value = os.environ.get(FAIL_SHARDS_ENV, "").strip()
    try:
        return {int(s) for s in value.split(",") if s.strip()}
    except ValueError:
        raise ConfigError(f"{FAIL_SHARDS_ENV}={value!r}: expected comma-separated shard numbers") from None


def shard_key(base: str, shard: int, part: str) -> str:
    return f"{base}/shard-{shard:05d}.{part}"


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
    shards = range((num_items + shard_size - 1) // shard_size)
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
    parts: Sequence[str],
    build: Callable[[], Processor],
    llm: LLMConfig,
    config_hash: str,
    show_progress: bool = True,
) -> tuple[list[int], list[int]]:
    """Process `items` in shards of `llm.shard_size` on `llm.num_actors` Ray actors.

    Needs a Ray session (`peg.mine.ray_session`). Returns (shards computed now, shards reused).
    Raises `ShardsFailed` after the other shards finished if any shard failed.
    """
    size = llm.shard_size
    shards = list(range((len(items) + size - 1) // size))
    todo = missing_shards(store, base, len(items), size, parts, config_hash)
    reused = [s for s in shards if s not in todo]
    if not todo:
        return [], reused
    fail = failed_shards_from_env()
    actor_class = ray.remote(ShardWorker).options(
        num_cpus=llm.actor_cpus, num_gpus=llm.actor_gpus, max_restarts=0, max_task_retries=0
    )
    build_ref = ray.put(build)
    threads = max(1, round(llm.actor_cpus))
    idle = [actor_class.remote(build_ref, threads) for _ in range(min(llm.num_actors, len(todo)))]
    queue = list(todo)
    pending: dict[Any, tuple[int, Any]] = {}
    failed: dict[int, str] = {}
    total = sum(len(items[s * size : (s + 1) * size]) for s in todo)
    with progress_bar(total, f"{stage} shards", enabled=show_progress, unit="items") as advance:
        while queue or pending:
            while queue and idle:
                s, actor = queue.pop(0), idle.pop()
                pending[actor.run.remote(s, list(items[s * size : (s + 1) * size]), s in fail)] = (s, actor)
            [ref], _ = ray.wait(list(pending), num_returns=1)
            s, actor = pending.pop(ref)
            try:
                outputs = ray.get(ref)
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
            for part in parts:  # the last part marks the shard as done
                store.put_text(shard_key(base, s, part), outputs[part], producer=stage, config_hash=config_hash)
            advance(len(items[s * size : (s + 1) * size]))
    for actor in idle:
        ray.kill(actor)
    if failed:
        raise ShardsFailed(stage, failed, stored=len(shards) - len(failed))
    return todo, reused

