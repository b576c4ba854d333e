"""Stage state in the store: a `_stage.json` record per stage, written by the stage itself.

A record holds the stage hash, a status, every output key with its sha256, and the digests of
the upstream stages' outputs it consumed. A stage is *complete* when its record says so for the
current stage hash and current upstream outputs, and every output verifies against the store
(local: the content's sha256; S3: size and the ETag recorded at upload). Otherwise it is:
- *pending*: no record;
- *stale*: made for another config, or from upstream outputs that have since changed;
- *partial*: running, interrupted, or its record is unreadable (it resumes; never a dead end);
- *invalid*: an output failed verification (named in `failed`); it is redone on the next run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Literal

from peg.store import ArtifactStore, IntegrityError, StoreError

RECORD = "_stage.json"

Status = Literal["running", "complete", "invalid"]  # what a record says (the stage writes it)
StageState = Literal["complete", "pending", "stale", "partial", "invalid"]  # what a stage is (the module docstring)


@dataclass(frozen=True)
class StageRecord:
    stage: str
    hash: str
    status: Status
    outputs: dict[str, str]  # key -> sha256
    inputs: dict[str, str] = field(default_factory=dict)  # upstream stage -> digest of its outputs
    failed: str | None = None  # the output that failed verification (status "invalid")

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode() + b"\n"

    def digest(self) -> str:
        """Identity of this stage's outputs (their keys and sha256), for the stages that read them."""
        return hashlib.sha256(json.dumps(self.outputs, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class StageCheck:
    state: StageState
    detail: str = ""
    record: StageRecord | None = None


def record_key(prefix: str) -> str:
    return f"{prefix}/{RECORD}"


class DamagedRecord(Exception):
    """The stage record exists but cannot be read (bad bytes, bad JSON, unknown fields)."""


def read_record(store: ArtifactStore, prefix: str) -> StageRecord | None:
    """The stage's record, None if there is none; DamagedRecord if it does not verify or parse."""
    key = record_key(prefix)
    if not store.exists(key):
        return None
    try:
        return StageRecord(**store.read_json(key))
    except (StoreError, ValueError, TypeError) as e:
        raise DamagedRecord(f"{key}: {e}") from None


def write_record(store: ArtifactStore, prefix: str, record: StageRecord) -> None:
    store.put_bytes(record_key(prefix), record.to_bytes(), producer=record.stage, config_hash=record.hash)


def check_stage(store: ArtifactStore, prefix: str, stage_hash: str, inputs: dict[str, str]) -> StageCheck:
    """The stage's state (see the module docstring); verifies every output of a complete record."""
    try:
        record = read_record(store, prefix)
    except DamagedRecord:
        return StageCheck("partial", f"damaged record {record_key(prefix)}")
    if record is None:
        return StageCheck("pending")
    if record.hash != stage_hash:
        return StageCheck("stale", "config changed", record)
    if record.status == "invalid":
        return StageCheck("invalid", f"{record.failed} failed verification", record)
    if record.status != "complete":
        return StageCheck("partial", "interrupted", record)
    changed = sorted(s for s in set(inputs) | set(record.inputs) if inputs.get(s) != record.inputs.get(s))
    if changed:
        return StageCheck("stale", f"outputs of {', '.join(changed)} changed", record)
    for key, sha256 in record.outputs.items():
        try:
            manifest = store.verify(key)
        except IntegrityError:
            return StageCheck("invalid", f"{key} differs from its manifest", _invalid(record, key))
        except StoreError:  # a missing object or manifest
            return StageCheck("invalid", f"{key} is missing", _invalid(record, key))
        if manifest.sha256 != sha256:
            return StageCheck("invalid", f"{key} was replaced after the stage completed", _invalid(record, key))
    return StageCheck("complete", "", record)


def _invalid(record: StageRecord, key: str) -> StageRecord:
    return StageRecord(record.stage, record.hash, "invalid", record.outputs, record.inputs, key)


def outputs_of(store: ArtifactStore, keys: list[str], stage: str) -> dict[str, str]:
    """sha256 of each output key by its manifest; raises if one is missing (a stage may not claim what it lacks)."""
    missing = [k for k in keys if not store.exists(k)]
    if missing:
        raise StoreError(f"stage {stage}: outputs missing from {store.describe()}: {missing[:5]}")
    return {k: store.require_manifest(k).sha256 for k in keys}
