"""Stage state in the store: a `_stage.json` record per stage, written by the stage itself.

A stage is *complete* when its record says so for the current stage hash and every output it
lists is still in the store with the recorded sha256. A record that says *running* under another
hash means the stage's partial outputs were made for another config: they are deleted before the
stage runs again, so shard-level resume never mixes configs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from peg.store import ArtifactStore

RECORD = "_stage.json"


@dataclass(frozen=True)
class StageRecord:
    stage: str
    hash: str
    status: Literal["running", "complete"]
    outputs: dict[str, str]  # key -> sha256

    def to_bytes(self) -> bytes:
        return json.dumps(self.__dict__, indent=2, sort_keys=True).encode() + b"\n"


def record_key(prefix: str) -> str:
    return f"{prefix}/{RECORD}"


def read_record(store: ArtifactStore, prefix: str) -> StageRecord | None:
    key = record_key(prefix)
    if not store.exists(key):
        return None
    return StageRecord(**json.loads(store.get_bytes(key)))


def write_record(store: ArtifactStore, prefix: str, record: StageRecord) -> None:
    store.put_bytes(record_key(prefix), record.to_bytes(), producer=record.stage, config_hash=record.hash)


def is_complete(store: ArtifactStore, prefix: str, stage_hash: str) -> bool:
    """True if the stage completed under `stage_hash` and all its outputs verify by manifest."""
    record = read_record(store, prefix)
    if record is None or record.status != "complete" or record.hash != stage_hash:
        return False
    for key, sha256 in record.outputs.items():
        manifest = store.manifest(key)
        if manifest is None or manifest.sha256 != sha256 or not store.exists(key):
            return False
    return True


def verified_outputs(store: ArtifactStore, keys: list[str], stage: str) -> dict[str, str]:
    """sha256 of each output key; raises if one is missing (a stage may not claim what it lacks)."""
    missing = [k for k in keys if not store.exists(k)]
    if missing:
        raise RuntimeError(f"stage {stage}: outputs missing from {store.describe()}: {missing[:5]}")
    return {k: store.require_manifest(k).sha256 for k in keys}
