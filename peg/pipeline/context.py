"""What a running stage gets: the config, a store it may write only where it declared, and keys.

Every artifact key a stage builds goes through its `StageScope` (peg/store/scope.py:
`<run>/<stage>/<name>`). The scope's store refuses writes outside the stage's own prefix and the
store-wide prefixes it declares in `Stage.shared` (the embedding cache), so one stage cannot
overwrite another's verified outputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from peg.config import RunConfig
from peg.store.scope import StageScope
from peg.store import ArtifactStore, Manifest, StoreError
from peg.store.base import under_prefix


class ScopedStore(ArtifactStore):
    """A store that reads everything but writes and deletes only under `prefixes`."""

    def __init__(self, inner: ArtifactStore, stage: str, prefixes: tuple[str, ...]):
        self.inner, self.stage, self.prefixes = inner, stage, prefixes

    def _check_write(self, key: str) -> None:
        if not any(under_prefix(key, p) for p in self.prefixes):
            raise StoreError(
                f"stage {self.stage} may not write {key!r}: it writes only under {', '.join(self.prefixes)} "
                "(declare a store-wide prefix in the stage's `shared`)"
            )

    def put_file(self, key: str, local_path: str | Path, producer: str, config_hash: str = "") -> Manifest:
        self._check_write(key)
        return self.inner.put_file(key, local_path, producer, config_hash)

    def delete(self, prefix: str) -> None:
        self._check_write(prefix)
        self.inner.delete(prefix)

    def manifest(self, key: str) -> Manifest | None:
        return self.inner.manifest(key)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def list(self, prefix: str = "") -> list[str]:
        return self.inner.list(prefix)

    def local_path(self, key: str) -> Path | None:
        return self.inner.local_path(key)

    @contextmanager
    def open_binary(self, key: str) -> Iterator[BinaryIO]:
        with self.inner.open_binary(key) as source:
            yield source

    def verify(self, key: str) -> Manifest:
        return self.inner.verify(key)

    def get_file(self, key: str, local_path: str | Path) -> Path:
        return self.inner.get_file(key, local_path)

    def describe(self) -> str:
        return self.inner.describe()

    def create_object(self, key: str, data: bytes) -> str | None:
        self._check_write(key)
        return self.inner.create_object(key, data)

    def read_object(self, key: str) -> tuple[bytes, str] | None:
        return self.inner.read_object(key)

    def replace_object(self, key: str, data: bytes, token: str) -> str | None:
        self._check_write(key)
        return self.inner.replace_object(key, data, token)

    def remove_object(self, key: str, token: str) -> bool:
        self._check_write(key)
        return self.inner.remove_object(key, token)


DATA = "data"  # <run>/prepare/data/{beir/..., train_files/...}: the run's inputs, in the store


def stored_train_file(index: int, path: str) -> str:
    return f"{index}-{Path(path).name}"


def primary_node() -> bool:
    """False on the other nodes of a multi-node training job (PET_NODE_RANK > 0): they train
    but leave stage records and outputs to node 0."""
    return os.environ.get("PET_NODE_RANK", "0") == "0"


@dataclass(frozen=True)
class StageContext:
    """What a stage body gets: the config (data paths resolved to the store's copies after
    `prepare`), its file, and the stage's scope (run, stage, hash, inputs, scoped store, keys)."""

    config: RunConfig
    config_path: Path
    scope: StageScope

    @property
    def store(self) -> ArtifactStore:
        return self.scope.store

    @property
    def stage(self) -> str:
        return self.scope.stage

    @property
    def stage_hash(self) -> str:
        return self.scope.hash

    @property
    def inputs(self) -> Mapping[str, str]:
        return self.scope.inputs

    def key(self, stage: str, name: str) -> str:
        """The key of artifact `name` of `stage` in this run."""
        return self.scope.key_of(stage, name)

    def output_key(self, name: str) -> str:
        return self.scope.key(name)

    def work_dir(self) -> Path:
        """A local scratch directory kept across reruns of the same stage config and inputs (train checkpoints)."""
        root = Path(os.environ.get("PEG_WORK_DIR", Path.home() / ".cache" / "peg" / "work"))
        store_id = hashlib.sha256(self.store.describe().encode()).hexdigest()[:8]
        identity = hashlib.sha256(json.dumps([self.stage_hash, dict(self.inputs)], sort_keys=True).encode()).hexdigest()
        path = root / f"{self.config.name}-{store_id}" / f"{self.stage}-{identity[:16]}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def put_dir(self, name: str, directory: Path) -> list[str]:
        """Put every file under `directory` at `<run>/<this stage>/<name>/<relative path>`."""
        keys = []
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            key = self.output_key(f"{name}/{path.relative_to(directory).as_posix()}")
            self.store.put_file(key, path, producer=self.stage, config_hash=self.stage_hash)
            keys.append(key)
        return keys

    def with_data(self) -> StageContext:
        """This context, for a stage after `prepare` with `data.*` read from the store (`data_config`)."""
        if self.stage == "prepare":
            return self
        return StageContext(self.data_config(), self.config_path, self.scope)

    def data_config(self) -> RunConfig:
        """The config with `data.beir` / `data.train_files` pointing at local copies of the data
        `prepare` put in the store (fetched once per machine): later stages read data only from there."""
        config = self.config.model_copy(deep=True)
        root = Path(os.environ.get("PEG_WORK_DIR", Path.home() / ".cache" / "peg" / "work"))
        store_id = hashlib.sha256(self.store.describe().encode()).hexdigest()[:8]
        local = root / f"{self.config.name}-{store_id}" / DATA
        prefix = self.key("prepare", DATA)
        want = json.dumps({k: self.store.manifest(k).sha256 for k in self.store.list(prefix)}, sort_keys=True)
        stamp = local / ".peg-materialised.json"
        if not (stamp.is_file() and stamp.read_text() == want):
            self.materialise_dir("prepare", DATA, local)
            stamp.write_text(want)
        if config.data.beir:
            config.data.beir = str(local / "beir")
        config.data.train_files = [str(local / "train_files" / stored_train_file(i, f)) for i, f in enumerate(config.data.train_files)]
        return config

    def materialise_dir(self, stage: str, name: str, dest: Path) -> Path:
        """`<run>/<stage>/<name>/...` as a plain local folder of verified copies (replacing `dest`)."""
        shutil.rmtree(dest, ignore_errors=True)
        return self.store.materialise_prefix(self.key(stage, name), dest)
