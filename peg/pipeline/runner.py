"""Run the stage graph: skip complete stages, run the rest through a backend, in order.

A stage's hash covers the config sections it declares (`Stage.sections`) and the hashes of the
stages it needs, so a changed section invalidates that stage and everything downstream. Its
record also names the digests of the upstream outputs it consumed: a stage whose upstream was
redone with different outputs is stale too. The backend only launches a stage's entrypoint
(`peg pipeline stage NAME CONFIG`); the entrypoint reads inputs from the store (verified),
writes outputs and marks the stage complete, so a pod runs exactly what a laptop runs.

One run at a time: `run_pipeline` holds the run's lease in the store (peg/store/lease.py) and
hands it to the stages it starts (`PEG_RUN_LEASE`); a stage started on its own takes the lease
itself.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from peg.config import ConfigError, RunConfig
from peg.errors import PegError
from peg.process import child_env
from peg.pipeline.context import ScopedStore, StageContext, primary_node
from peg.pipeline.stages import STAGES, Stage, StageDone, enabled_stages
from peg.pipeline.state import (
    DamagedRecord,
    StageRecord,
    StageState,
    check_stage,
    outputs_of,
    read_record,
    record_key,
    write_record,
)
from peg.store import ArtifactStore, IntegrityError, StoreError, open_store
from peg.store.keys import EMBEDDING_CACHE
from peg.store.lease import Lease, LeaseRecord, read_lease
from peg.store.scope import StageScope, stage_prefix

LEASE_ENV = "PEG_RUN_LEASE"  # the lease owner id a pipeline hands to the stages it starts


class Backend(Protocol):
    def run_stage(self, stage: Stage, config_path: Path, env: Mapping[str, str]) -> None:
        """Run `peg pipeline stage <stage.name> <config_path>` with `env` added, to completion or raise."""


class StageFailed(PegError, RuntimeError):
    """A stage's entrypoint exited non-zero; `reported`: it printed its own one-line error (exit 2)."""

    def __init__(self, message: str, reported: bool = False):
        self.reported = reported
        super().__init__(message)


class LocalBackend:
    """Runs each stage's entrypoint as a child process on this machine (embedded Ray, torchrun).

    The child inherits this process's output streams and `peg.console` environment: its noise
    goes to the same log file, its progress bars and its error line to the same console.

    The child dies with this process (peg.process), so killing a run kills its stages.
    """

    def run_stage(self, stage: Stage, config_path: Path, env: Mapping[str, str]) -> None:
        command = [sys.executable, "-m", "peg.process", "peg", "pipeline", "stage", stage.name, str(config_path)]
        result = subprocess.run(command, env=child_env({**os.environ, "PYTHONUNBUFFERED": "1", **env}))
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
        own = config.section_hash(*stage.sections)
        hashes[stage.name] = hashlib.sha256("|".join([stage.name, own, *upstream]).encode()).hexdigest()
    return hashes


def _prefix(config: RunConfig, stage: str) -> str:
    return stage_prefix(config.name, stage)


def _inputs(stage: Stage, records: Mapping[str, StageRecord | None]) -> dict[str, str]:
    """Digest of each enabled upstream stage's outputs ("" where it has no record yet)."""
    return {n: (records[n].digest() if records[n] else "") for n in stage.needs if n in records}


def _record_or_none(store: ArtifactStore, prefix: str) -> StageRecord | None:
    try:
        return read_record(store, prefix)
    except DamagedRecord:
        return None


@dataclass
class StageStatus:
    name: str
    state: StageState
    outputs: int
    detail: str = ""


def pipeline_status(config: RunConfig, store: ArtifactStore) -> list[StageStatus]:
    """Each enabled stage's state; every output of a complete stage is verified (see peg.pipeline.state)."""
    hashes = stage_hashes(config)
    records: dict[str, StageRecord | None] = {}
    rows = []
    for stage in enabled_stages(config):
        prefix = _prefix(config, stage.name)
        check = check_stage(store, prefix, hashes[stage.name], _inputs(stage, records))
        records[stage.name] = check.record if check.state == "complete" else _record_or_none(store, prefix)
        outputs = len(check.record.outputs) if check.record else 0
        rows.append(StageStatus(stage.name, check.state, outputs, check.detail))
    return rows


def run_lease(config: RunConfig, store: ArtifactStore, command: str = "") -> Lease:
    return Lease(store, config.name, config.store.lease_seconds, command)


def current_lease(config: RunConfig, store: ArtifactStore) -> LeaseRecord | None:
    return read_lease(store, config.name)


def mark_invalid(store: ArtifactStore, config: RunConfig, stage: str, key: str) -> None:
    """Record that `key` of `stage` failed verification, and drop it so the redo recomputes it."""
    prefix = _prefix(config, stage)
    record = _record_or_none(store, prefix)
    if record is not None:
        write_record(store, prefix, StageRecord(stage, record.hash, "invalid", record.outputs, record.inputs, key))
    store.delete(key)


def producing_stage(config: RunConfig, key: str) -> str | None:
    """The stage whose prefix holds `key` in this run (the encode stage for the shared embedding
    cache), if any."""
    parts = key.split("/")
    if parts[0] == EMBEDDING_CACHE:
        return "encode"
    names = {s.name for s in STAGES}
    return parts[1] if len(parts) > 2 and parts[0] == config.name and parts[1] in names else None


def run_pipeline(
    config: RunConfig, config_path: Path, backend: Backend, log: Callable[[str], None] = print, wait: float = 0.0
) -> dict[str, float]:
    """Run every enabled stage that is not complete, one `log` line each; return {stage run: seconds}.

    Takes the run's lease first (waiting up to `wait` seconds for another run; else LeaseHeld).
    """
    from peg.pipeline.preflight import check_pipeline_training  # it imports the model and LLM loaders

    check_pipeline_training(config, config_path)
    store = open_store(config.store)
    hashes = stage_hashes(config)
    lease = run_lease(config, store, f"peg pipeline run {config_path}")
    lease.acquire(wait)
    try:
        records: dict[str, StageRecord | None] = {}
        ran: dict[str, float] = {}
        for stage in enabled_stages(config):
            if lease.lost.is_set():
                raise StageFailed(f"lost the lease of run {config.name!r} to another process; stopped before {stage.name}")
            prefix = _prefix(config, stage.name)
            check = check_stage(store, prefix, hashes[stage.name], _inputs(stage, records))
            if check.state == "complete":
                log(f"[skip] {stage.name}: complete")
                records[stage.name] = check.record
                continue
            if check.state == "invalid" and check.record is not None and check.record.failed:
                mark_invalid(store, config, stage.name, check.record.failed)
                log(f"[redo] {stage.name}: {check.detail}")
            else:
                log(f"[run]  {stage.name}" + (f" ({check.state}: {check.detail})" if check.detail else ""))
            started = time.monotonic()
            try:
                backend.run_stage(stage, config_path, {LEASE_ENV: lease.owner})
            except StageFailed as e:
                explained = _explain_failure(store, config, str(e))
                raise StageFailed(explained, reported=e.reported and explained == str(e)) from None
            after = check_stage(store, prefix, hashes[stage.name], _inputs(stage, records))
            if after.state != "complete":
                raise StageFailed(f"stage {stage.name} exited without verified outputs in {store.describe()}: "
                                  f"{after.state} {after.detail}".rstrip())
            records[stage.name] = after.record
            ran[stage.name] = time.monotonic() - started
        return ran
    finally:
        lease.release()


def _explain_failure(store: ArtifactStore, config: RunConfig, message: str) -> str:
    """Add which upstream artifact failed verification, if a stage marked one invalid."""
    for stage in enabled_stages(config):
        record = _record_or_none(store, _prefix(config, stage.name))
        if record is not None and record.status == "invalid":
            return (f"{message}: {record.failed} (made by stage {stage.name}) failed verification; the next run "
                    f"redoes {stage.name} and what follows")
    return message


def run_stage_entrypoint(config: RunConfig, config_path: Path, name: str) -> StageDone:
    """The body of `peg pipeline stage NAME CONFIG`: run one stage and mark it complete.

    Stages after `prepare` see `data.*` pointing at local copies of the data in the store. On the
    other nodes of a multi-node training job only the stage's work runs: node 0 keeps the record.
    Under `peg pipeline run` the run's lease is already held (PEG_RUN_LEASE names its owner);
    started on its own, the stage takes the lease for its duration.
    """
    stages = {s.name: s for s in enabled_stages(config)}
    if name not in stages:
        raise ValueError(f"stage {name!r} is not enabled in {config_path} (enabled: {', '.join(stages)})")
    store = open_store(config.store)
    holder = current_lease(config, store)
    if not primary_node() or (holder is not None and holder.owner == os.environ.get(LEASE_ENV)):
        return _run_stage(config, config_path, stages[name], store)
    lease = run_lease(config, store, f"peg pipeline stage {name} {config_path}")
    lease.acquire()
    try:
        return _run_stage(config, config_path, stages[name], store)
    finally:
        lease.release()


def run_with_needs(config: RunConfig, config_path: Path, name: str, log: Callable[[str], None] = print) -> StageDone:
    """The body of the single-stage commands (`peg encode|mine|judge|score|synth CONFIG`): every
    enabled stage `name` depends on that is not complete runs first, then `name` itself, each
    through `run_stage_entrypoint`, so the command leaves the store contents and record that
    `peg pipeline stage NAME CONFIG` leaves."""
    enabled = {s.name: s for s in enabled_stages(config)}
    if name not in enabled:
        raise ConfigError(f"{config_path}: {name}.enabled is false: `peg {name}` runs only an enabled stage")
    needed, frontier = set(), [name]
    while frontier:
        for need in enabled[frontier.pop()].needs:
            if need in enabled and need not in needed:
                needed.add(need)
                frontier.append(need)
    store = open_store(config.store)
    for stage in (s for s in enabled.values() if s.name in needed):  # pipeline order
        state = next(row for row in pipeline_status(config, store) if row.name == stage.name)
        if state.state != "complete":
            log(f"[run]  {stage.name} (needed by {name})")
            run_stage_entrypoint(config, config_path, stage.name)
    return run_stage_entrypoint(config, config_path, name)


def stage_scope(config: RunConfig, store: ArtifactStore, name: str, inputs: Mapping[str, str] | None = None) -> StageScope:
    """The scope of stage `name` of `config`'s run: its pipeline hash, `inputs` (upstream stage ->
    digest of its outputs) and `store` (the pipeline passes a `ScopedStore`)."""
    return StageScope(config.name, name, stage_hashes(config)[name], store, dict(inputs or {}))


def _run_stage(config: RunConfig, config_path: Path, stage: Stage, store: ArtifactStore) -> StageDone:
    name = stage.name
    hashes = stage_hashes(config)
    stage_hash = hashes[name]
    prefix = _prefix(config, name)
    inputs = {}
    for need in (n for n in stage.needs if n in hashes):
        upstream = _record_or_none(store, _prefix(config, need))
        if upstream is None or upstream.status != "complete" or upstream.hash != hashes[need]:
            raise StageFailed(f"stage {name} needs stage {need}, which is not complete")
        inputs[need] = upstream.digest()  # its outputs are verified as this stage reads them
    if not primary_node():  # another node of a multi-node job: node 0 holds the lease and the record
        return stage.run(StageContext(config, config_path, stage_scope(config, store, name, inputs)).with_data())
    record = _record_or_none(store, prefix)
    if record is not None and (record.hash != stage_hash or (record.inputs and record.inputs != inputs)):
        store.delete(prefix)  # outputs of another config or other inputs: never resume from them
    elif record is not None and record.failed:
        store.delete(record.failed)
    write_record(store, prefix, StageRecord(name, stage_hash, "running", {}, inputs))
    scoped = ScopedStore(store, name, (prefix, *stage.shared))
    context = StageContext(config, config_path, stage_scope(config, scoped, name, inputs)).with_data()
    try:
        done = stage.run(context)
    except IntegrityError as e:
        _drop_empty_record(store, prefix)
        producer = producing_stage(config, e.key)
        if producer is None:
            raise
        mark_invalid(store, config, producer, e.key)
        raise StageFailed(f"{e}; stage {producer} is marked invalid and is redone on the next run") from e
    except BaseException:
        _drop_empty_record(store, prefix)
        raise
    outputs = sorted((set(store.list(prefix)) - {record_key(prefix)}) | set(done.extra_keys))
    write_record(store, prefix, StageRecord(name, stage_hash, "complete", outputs_of(store, outputs, name), inputs))
    return done


def _drop_empty_record(store: ArtifactStore, prefix: str) -> None:
    """A failed stage that stored nothing leaves no record: it reads as pending, not as partial."""
    try:
        if store.list(prefix) == [record_key(prefix)]:
            store.delete(record_key(prefix))
    except StoreError:
        pass
