"""Run the stage graph: skip complete stages, run the rest through a backend, in order.

A stage's hash covers the config sections it reads and the hashes of the stages it needs, so a
changed section invalidates that stage and everything downstream. The backend only launches a
stage's entrypoint (`peg pipeline stage NAME CONFIG`); the entrypoint itself reads inputs from
the store, writes outputs and marks the stage complete, so a pod runs exactly what a laptop runs.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from peg.errors import PegError
from peg.config import RunConfig
from peg.pipeline.stages import STAGES, Stage, StageContext, enabled_stages, primary_node
from peg.pipeline.state import StageRecord, is_complete, read_record, record_key, verified_outputs, write_record
from peg.store import ArtifactStore, open_store


class Backend(Protocol):
    def run_stage(self, stage: Stage, config_path: Path) -> None:
        """Run `peg pipeline stage <stage.name> <config_path>` to completion or raise."""


class StageFailed(PegError, RuntimeError):
    """A stage's entrypoint exited non-zero."""


class LocalBackend:
    """Runs each stage's entrypoint as a child process on this machine (embedded Ray, torchrun)."""

    def run_stage(self, stage: Stage, config_path: Path) -> None:
        command = [sys.executable, "-m", "peg", "pipeline", "stage", stage.name, str(config_path)]
        result = subprocess.run(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if result.returncode != 0:
            raise StageFailed(f"stage {stage.name} failed (exit code {result.returncode}); rerun to resume it")


def stage_hashes(config: RunConfig) -> dict[str, str]:
    """Each enabled stage's hash: its config sections plus the hashes of the stages it needs."""
    hashes: dict[str, str] = {}
    enabled = {s.name for s in enabled_stages(config)}
    for stage in STAGES:
        if stage.name not in enabled:
            continue
        upstream = [hashes[n] for n in stage.needs if n in hashes]
        own = config.section_hash(*stage.sections) if stage.sections else ""
        hashes[stage.name] = hashlib.sha256("|".join([stage.name, own, *upstream]).encode()).hexdigest()
    return hashes


@dataclass
class StageStatus:
    name: str
    state: str  # complete | stale | partial | pending
    outputs: int


def pipeline_status(config: RunConfig, store: ArtifactStore) -> list[StageStatus]:
    hashes = stage_hashes(config)
    rows = []
    for stage in enabled_stages(config):
        prefix = f"{config.name}/{stage.name}"
        record = read_record(store, prefix)
        if is_complete(store, prefix, hashes[stage.name]):
            state = "complete"
        elif record is None:
            state = "pending"
        elif record.hash != hashes[stage.name]:
            state = "stale"
        else:
            state = "partial"
        rows.append(StageStatus(stage.name, state, len(record.outputs) if record else 0))
    return rows


def run_pipeline(config: RunConfig, config_path: Path, backend: Backend, log=print) -> list[str]:
    """Run every enabled stage that is not complete; return the names of the stages run."""
    store = open_store(config.store)
    hashes = stage_hashes(config)
    ran = []
    for stage in enabled_stages(config):
        prefix = f"{config.name}/{stage.name}"
        if is_complete(store, prefix, hashes[stage.name]):
            log(f"[skip] {stage.name}: complete")
            continue
        log(f"[run]  {stage.name}")
        backend.run_stage(stage, config_path)
        if not is_complete(store, prefix, hashes[stage.name]):
            raise StageFailed(f"stage {stage.name} exited without verified outputs in {store.describe()}")
        ran.append(stage.name)
    return ran


def run_stage_entrypoint(config: RunConfig, config_path: Path, name: str) -> None:
    """The body of `peg pipeline stage NAME CONFIG`: run one stage and mark it complete.

    Stages after `prepare` see `data.*` pointing at local copies of the data in the store. On the
    other nodes of a multi-node training job only the stage's work runs: node 0 keeps the record.
    """
    stages = {s.name: s for s in enabled_stages(config)}
    if name not in stages:
        raise ValueError(f"stage {name!r} is not enabled in {config_path} (enabled: {', '.join(stages)})")
    stage = stages[name]
    store = open_store(config.store)
    stage_hash = stage_hashes(config)[name]
    context = StageContext(config, config_path, store, stage_hash)
    if name != "prepare":
        context = StageContext(context.data_config(), config_path, store, stage_hash)
    if not primary_node():
        stage.run(context)
        return
    prefix = f"{config.name}/{name}"
    record = read_record(store, prefix)
    if record is not None and record.hash != stage_hash:
        store.delete(prefix)  # outputs of another config: never resume from them
    write_record(store, prefix, StageRecord(name, stage_hash, "running", {}))
    extra = stage.run(context)
    outputs = sorted((set(store.list(prefix)) - {record_key(prefix)}) | set(extra))
    write_record(store, prefix, StageRecord(name, stage_hash, "complete", verified_outputs(store, outputs, name)))
