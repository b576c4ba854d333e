"""The artifact store interface, manifests and the pieces both backends share.

An artifact is one object under a key (a POSIX relative path such as `myrun/mine/shard-00003.jsonl`)
plus a manifest object `<key>.manifest.json` (size, sha256, producer stage, config hash, created
time). The manifest is written only after the object is complete, so an artifact counts as present
(`exists`) only when both are there and agree on the size; reads verify the sha256.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, UTC
from pathlib import Path
from typing import Any, BinaryIO

from pydantic import BaseModel, ConfigDict, ValidationError

from peg.errors import PegError
from peg.store.files import CHUNK_SIZE, TEMP_PREFIX, copy_stream_atomically

MANIFEST_SUFFIX = ".manifest.json"

_COMPONENT = re.compile(r"^[A-Za-z0-9_.=+@,-]+$")


class StoreError(PegError, RuntimeError):
    """An artifact store operation that failed; the message names the store and the key."""


class IntegrityError(StoreError):
    """An artifact whose content does not match its manifest (changed or corrupted after it was stored)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key

    def __reduce__(self):
        return (IntegrityError, (self.key, str(self)))


class Manifest(BaseModel):
    """What an artifact is: its key, size in bytes, sha256, the stage that made it and when."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str
    size: int
    sha256: str
    producer: str
    config_hash: str
    created: str  # ISO 8601, UTC
    etag: str | None = None  # S3: the object's ETag at upload (a cheap check that it was not replaced)

    def to_json(self) -> bytes:
        return self.model_dump_json(indent=2).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Manifest:
        try:
            return cls.model_validate_json(data)
        except ValidationError as e:
            raise StoreError(f"{where}: invalid manifest: {e.errors()[0]['msg']}") from None


def new_manifest(key: str, size: int, sha256: str, producer: str, config_hash: str, etag: str | None = None) -> Manifest:
    created = datetime.now(UTC).isoformat(timespec="seconds")
    return Manifest(key=key, size=size, sha256=sha256, producer=producer, config_hash=config_hash, created=created,
                    etag=etag)


def artifact_key(run: str, stage: str, name: str) -> str:
    """The key of artifact `name` (a relative path) that stage `stage` of run `run` makes."""
    return check_key(f"{run}/{stage}/{name}")


def check_key(key: str) -> str:
    """Return `key` if it is a usable artifact key, else raise StoreError saying why."""
    if not key or key.startswith("/") or key.endswith("/"):
        raise StoreError(f"invalid artifact key {key!r}: must be a relative POSIX path to a file")
    for part in key.split("/"):
        if part in ("", ".", "..") or not _COMPONENT.match(part) or part.startswith(TEMP_PREFIX):
            raise StoreError(
                f"invalid artifact key {key!r}: component {part!r} must be non-empty, not '.'/'..', "
                f"and use only letters, digits and _.=+@,-"
            )
    if key.endswith(MANIFEST_SUFFIX):
        raise StoreError(f"invalid artifact key {key!r}: the suffix {MANIFEST_SUFFIX} is reserved for manifests")
    return key


def check_prefix(prefix: str) -> str:
    """A prefix is '' (everything) or a key-like path; it matches itself and what lies below it."""
    prefix = prefix.strip("/")
    if prefix:
        for part in prefix.split("/"):
            if part in ("", ".", "..") or not _COMPONENT.match(part):
                raise StoreError(f"invalid prefix {prefix!r}: component {part!r} is not allowed")
    return prefix


def under_prefix(key: str, prefix: str) -> bool:
    return not prefix or key == prefix or key.startswith(prefix + "/")


class VerifyingReader(io.RawIOBase):
    """Pass bytes through from `source`, hashing them; at end of stream, check size and sha256.

    `advance(n)` is called with each chunk's size (a progress bar).
    """

    def __init__(self, source: BinaryIO, manifest: Manifest, where: str, advance: Callable[[int], None] | None = None):
        self._source = source
        self._advance = advance
        self._manifest = manifest
        self._where = where
        self._digest = hashlib.sha256()
        self._size = 0
        self._checked = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._source.read(len(buffer))
        if not data:
            self._check()
            return 0
        n = len(data)
        buffer[:n] = data
        self._digest.update(data)
        self._size += n
        if self._advance:
            self._advance(n)
        if self._size > self._manifest.size:
            self._check()
        return n

    def _check(self) -> None:
        if self._checked:
            return
        self._checked = True
        m = self._manifest
        if self._size != m.size:
            raise IntegrityError(m.key, f"{self._where}: size mismatch: read {self._size} bytes, manifest says {m.size}")
        if self._digest.hexdigest() != m.sha256:
            raise IntegrityError(
                m.key,
                f"{self._where}: sha256 mismatch: content {self._digest.hexdigest()}, manifest {m.sha256} "
                "(the object was changed or corrupted after it was stored)"
            )


class ArtifactStore(ABC):
    """Keyed artifacts with manifests, in a local directory or an S3 bucket.

    Writes are atomic: a reader sees either the previous artifact or the complete new one, never
    a partial object. Every read verifies the content against the manifest's size and sha256 as
    it streams (one pass; `IntegrityError` naming the key on a mismatch). `list`/`delete` take a
    path prefix: '' means everything, `a/b` matches `a/b` itself and keys below `a/b/` (not `a/bc`).

    Besides artifacts, a store holds small *control objects* without manifests (a run's lease):
    `create_object` writes one only if it is absent, `replace_object`/`remove_object` only if it
    still holds the content read earlier (compare-and-swap on the token `read_object` returned).
    """

    @abstractmethod
    def put_file(self, key: str, local_path: str | Path, producer: str, config_hash: str = "") -> Manifest:
        """Store the file at `local_path` under `key`, then its manifest; return the manifest."""

    @abstractmethod
    def manifest(self, key: str) -> Manifest | None:
        """The artifact's manifest, or None if there is none."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """True if the object and its manifest are both present and agree on the size."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys under `prefix` that have a manifest (manifests themselves are not listed)."""

    @abstractmethod
    def delete(self, prefix: str) -> None:
        """Remove every object and manifest under `prefix` (including objects without a manifest)."""

    @abstractmethod
    def local_path(self, key: str) -> Path | None:
        """Where the artifact's file lies if the store is a local directory, else None (for messages:
        read artifacts through the store, which verifies them)."""

    @abstractmethod
    @contextmanager
    def open_binary(self, key: str) -> Iterator[BinaryIO]:
        """Stream the artifact's bytes; reading to the end verifies size and sha256 (IntegrityError)."""

    @abstractmethod
    def describe(self) -> str:
        """Where the store is, for messages (a directory, or endpoint and bucket)."""

    @abstractmethod
    def create_object(self, key: str, data: bytes) -> str | None:
        """Write control object `key` only if it does not exist; its new token, or None if it exists."""

    @abstractmethod
    def read_object(self, key: str) -> tuple[bytes, str] | None:
        """A control object's content and a token for `replace_object`/`remove_object`, or None."""

    @abstractmethod
    def replace_object(self, key: str, data: bytes, token: str) -> str | None:
        """Replace control object `key` only if it still is what `token` was read from; the new token or None."""

    @abstractmethod
    def remove_object(self, key: str, token: str) -> bool:
        """Remove control object `key` only if it still is what `token` was read from."""

    def abort_interrupted_uploads(self, prefix: str, started_before: datetime) -> list[str]:
        """Abort every incomplete multipart upload under the path `prefix` that started before
        `started_before` (one a killed process left: S3 keeps and bills its parts but lists it
        as no object); return their keys. A store without multipart uploads has none to abort."""
        return []

    def verify(self, key: str) -> Manifest:
        """Check the stored object against its manifest (IntegrityError if it differs); return the manifest.

        The default streams the whole object through the sha256; a backend may use a cheaper
        check it can trust (S3: size and the ETag recorded at upload).
        """
        found = self.require_manifest(key)
        with self.open_binary(key) as source:
            while source.read(CHUNK_SIZE):
                pass
        return found

    def require_manifest(self, key: str) -> Manifest:
        found = self.manifest(key)
        if found is None:
            raise StoreError(f"{self.describe()}: no artifact {key!r} (its manifest is missing)")
        return found

    def get_file(self, key: str, local_path: str | Path) -> Path:
        """Copy the artifact to `local_path` (atomically), verifying sha256 against the manifest."""
        with self.open_binary(key) as source:
            return copy_stream_atomically(source, local_path)

    def materialise(self, key: str, directory: str | Path) -> Path:
        """A verified local copy of the artifact at `directory/<file name>` (one read of the object)."""
        return self.get_file(key, Path(directory) / Path(key).name)

    def materialise_prefix(self, prefix: str, directory: str | Path) -> Path:
        """Every artifact under `prefix` as a plain, verified local folder (no manifests): `directory/<rest of key>`."""
        directory = Path(directory)
        prefix = check_prefix(prefix)
        keys = self.list(prefix)
        if not keys:
            raise StoreError(f"{self.describe()}: no artifacts under {prefix!r}")
        for key in keys:
            self.get_file(key, directory / key[len(prefix) :].lstrip("/"))
        return directory

    @contextmanager
    def open_text(self, key: str, encoding: str = "utf-8") -> Iterator[io.TextIOBase]:
        """Stream the artifact as text (e.g. JSONL line by line); verified once read to the end."""
        with self.open_binary(key) as source:
            yield io.TextIOWrapper(source, encoding=encoding)

    def put_bytes(self, key: str, data: bytes, producer: str, config_hash: str = "") -> Manifest:
        """Store a small in-memory payload (JSON metadata, reports)."""
        with tempfile.TemporaryDirectory(prefix="peg-put-") as tmp:
            path = Path(tmp) / "payload"
            path.write_bytes(data)
            return self.put_file(key, path, producer, config_hash)

    def put_text(self, key: str, text: str, producer: str, config_hash: str = "") -> Manifest:
        return self.put_bytes(key, text.encode("utf-8"), producer, config_hash)

    def put_json(self, key: str, obj: Any, producer: str, config_hash: str = "") -> Manifest:
        """Store `obj` as indented, key-sorted JSON."""
        return self.put_text(key, json.dumps(obj, indent=2, sort_keys=True) + "\n", producer, config_hash)

    def get_bytes(self, key: str) -> bytes:
        """Read a small artifact fully into memory, verified."""
        with self.open_binary(key) as source:
            return source.read()

    def read_text(self, key: str) -> str:
        """A small artifact's text (UTF-8), verified."""
        return self.get_bytes(key).decode("utf-8")

    def read_json(self, key: str) -> Any:
        """A small JSON artifact, verified."""
        return json.loads(self.get_bytes(key))
