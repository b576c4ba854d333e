"""The stage scope: what a running stage is, handed down by the pipeline and never re-derived.

`StageScope` names the run, the stage, the stage's hash and the digests of the upstream outputs
it consumes, and holds the store it may write through (the pipeline's `ScopedStore`, which
refuses writes outside the stage's own prefix and its declared shared prefixes). Every artifact
key of a run is spelled here: `key(name)` for the stage's own outputs, `key_of(stage, name)` for
an upstream stage's. Stage bodies (`run_mine`, `run_judge`, ...) take a scope, so no module
rebuilds `<run>/<stage>/...` by hand.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from peg.store.base import ArtifactStore, artifact_key


def stage_prefix(run: str, stage: str) -> str:
    """`<run>/<stage>`: the prefix of every artifact and the record of one stage of a run."""
    return f"{run}/{stage}"


@dataclass(frozen=True)
class StageScope:
    """One stage of one run: its identity, its inputs' digests and its store."""

    run: str
    stage: str
    hash: str  # the pipeline's stage hash: its config sections and its upstream stages' hashes
    store: ArtifactStore
    inputs: Mapping[str, str] = field(default_factory=dict)  # upstream stage -> digest of its outputs

    def key(self, name: str) -> str:
        """The key of this stage's artifact `name` (a relative path)."""
        return artifact_key(self.run, self.stage, name)

    def key_of(self, stage: str, name: str) -> str:
        """The key of artifact `name` of another stage of this run (an input)."""
        return artifact_key(self.run, stage, name)

    @property
    def prefix(self) -> str:
        """`<run>/<stage>`: everything this stage writes of its own lies under it."""
        return stage_prefix(self.run, self.stage)

    @property
    def shard_hash(self) -> str:
        """The config hash a sharded stage stores its shards under: the stage hash and the digests of
        the inputs they were computed from, so a changed config or a changed input redoes them."""
        identity = json.dumps([self.hash, dict(sorted(self.inputs.items()))])
        return hashlib.sha256(identity.encode()).hexdigest()

