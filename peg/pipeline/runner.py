"""Run the stage graph: skip complete stages, run the rest through a backend, in order.

A stage's hash covers the config sections it reads and the hashes of the stages it needs, so a
changed section invalidates that stage and everything downstream. The backend only launches a
stage's entrypoint (`peg pipeline stage NAME CONFIG`); the entrypoint itself reads inputs from
the store, writes outputs and marks the stage complete, so a pod runs exactly what a laptop runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from peg.config import RunConfig
from peg.errors import PegError
from peg.pipeline.stages import STAGES, Stage, StageContext, enabled_stages
from peg.pipeline.state import StageRecord, is_complete, read_record, record_key, verified_outputs, write_record
from peg.store import ArtifactStore, open_store


class Backend(Protocol):
    def run_stage(self, stage: Stage, config_path: Path) -> None:
        """Run `peg pipeline stage <stage.name> <config_path>` to completion or raise."""


class StageFailed(PegError, RuntimeError):
    """A stage's entrypoint exited non-zero; `reported`: it printed its own one-line error (exit 2)."""

    def __init__(self, message: str, reported: bool = False):
        self.reported = reported
        super().__init__(message)


class LocalBackend:
    """Runs each stage's entrypoint as a child process on this machine (embedded Ray, torchrun).

    The child inherits this process's output streams and `peg.console` environment: its noise
    goes to the same log file, its progress bars and its error line to the same console.
    """

    def run_stage(self, stage: Stage, config_path: Path) -> None:
        command = [sys.executable, "-m", "peg", "pipeline", "stage", stage.name, str(config_path)]
        result = subprocess.run(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if result.returncode != 0:
            raise StageFailed(
                f"stage {stage.name} failed (exit code {result.returncode})", reported=result.returncode == 2
            )


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


def run_pipeline(config: RunConfig, config_path: Path, backend: Backend, log=print) -> dict[str, float]:
    """Run every enabled stage that is not complete, one `log` line each; return {stage run: seconds}."""
    store = open_store(config.store)
    hashes = stage_hashes(config)
    ran: dict[str, float] = {}
    for stage in enabled_stages(config):
        prefix = f"{config.name}/{stage.name}"
        if is_complete(store, prefix, hashes[stage.name]):
            log(f"[skip] {stage.name}: complete")
            continue
        log(f"[run]  {stage.name}")
        started = time.monotonic()
        backend.run_stage(stage, config_path)
        if not is_complete(store, prefix, hashes[stage.name]):
            raise StageFailed(f"stage {stage.name} exited without verified outputs in {store.describe()}")
        ran[stage.name] = time.monotonic() - started
    return ran


def run_stage_entrypoint(config: RunConfig, config_path: Path, name: str) -> None:
    """The body of `peg pipeline stage NAME CONFIG`: run one stage and mark it complete."""
    stages = {s.name: s for s in enabled_stages(config)}
    if name not in stages:
        raise ValueError(f"stage {name!r} is not enabled in {config_path} (enabled: {', '.join(stages)})")
    stage = stages[name]
    store = open_store(config.store)
    stage_hash = stage_hashes(config)[name]
    prefix = f"{config.name}/{name}"
    record = read_record(store, prefix)
    if record is not None and record.hash != stage_hash:
        store.delete(prefix)  # outputs of another config: never resume from them
    write_record(store, prefix, StageRecord(name, stage_hash, "running", {}))
    context = StageContext(config, config_path, store, stage_hash)
    extra = stage.run(context)
    outputs = sorted((set(store.list(prefix)) - {record_key(prefix)}) | set(extra))
    write_record(store, prefix, StageRecord(name, stage_hash, "complete", verified_outputs(store, outputs, name)))


def result_lines(config: RunConfig, store: ArtifactStore) -> list[str]:
    """What a finished pipeline shows its user: the metrics table, the nDCG@10 change and where
    the exported model and the report are."""
    summary_key = f"{config.name}/eval/summary.json"
    if not store.exists(summary_key):
        return []
    from peg.eval.retrieval import markdown_table

    summary = json.loads(store.get_bytes(summary_key))
    results = summary["metrics"]
    base, tuned = results["base"]["ndcg@10"], results["fine-tuned"]["ndcg@10"]
    lines = [markdown_table(results).rstrip("\n"),
             f"nDCG@10 on {summary['split']}: base {base:.4f} -> fine-tuned {tuned:.4f} ({tuned - base:+.4f})"]
    for label, key in (("model", f"{config.name}/export/model/modules.json"), ("report", f"{config.name}/report/report.html")):
        if store.exists(key):
            local = store.local_path(key)
            where = (local.parent if label == "model" else local) if local else f"{store.describe()}/{key}"
            lines.append(f"{label}: {where}")
    return lines
