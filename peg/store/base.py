"""The artifact store interface, manifests and the pieces both backends share.

An artifact is one object under a key (a POSIX relative path such as `myrun/mine/shard-00003.jsonl`)
plus a manifest object `<key>.manifest.json` (size, sha256, producer stage, config hash, created
time). The manifest is written only after the object is complete, so an artifact counts as present
(`exists`) only when both are there and agree on the size; reads verify the sha256.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

from pydantic import BaseModel, ConfigDict, ValidationError

from peg.errors import PegError

MANIFEST_SUFFIX = ".manifest.json"
TEMP_PREFIX = ".peg-tmp-"
CHUNK_SIZE = 1 << 20

_COMPONENT = re.compile(r"^[A-Za-z0-9_.=+@,-]+$")


class StoreError(PegError, RuntimeError):
    """An artifact store operation that failed; the message names the store and the key."""


class Manifest(BaseModel):
    """What an artifact is: its key, size in bytes, sha256, the stage that made it and when."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str
    size: int
    sha256: str
    producer: str
    config_hash: str
    created: str  # ISO 8601, UTC

    def to_json(self) -> bytes:
        return self.model_dump_json(indent=2).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Manifest:
        try:
            return cls.model_validate_json(data)
        except ValidationError as e:
            raise StoreError(f"{where}: invalid manifest: {e.errors()[0]['msg']}") from None


def new_manifest(key: str, size: int, sha256: str, producer: str, config_hash: str) -> Manifest:
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return Manifest(key=key, size=size, sha256=sha256, producer=producer, config_hash=config_hash, created=created)


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


def hash_file(path: Path) -> tuple[int, str]:
    """(size, sha256 hex) of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


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
            raise StoreError(f"{self._where}: size mismatch: read {self._size} bytes, manifest says {m.size}")
        if self._digest.hexdigest() != m.sha256:
            raise StoreError(
                f"{self._where}: sha256 mismatch: content {self._digest.hexdigest()}, manifest {m.sha256} "
                "(the object was changed or corrupted after it was stored)"
            )


def write_stream_atomically(source: BinaryIO, target: Path) -> None:
    """Copy `source` to `target` through a temp file in the same directory (fsync + os.replace).

    On any error the temp file is removed and `target` is left as it was.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := source.read(CHUNK_SIZE):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ArtifactStore(ABC):
    """Keyed artifacts with manifests, in a local directory or an S3 bucket.

    Writes are atomic: a reader sees either the previous artifact or the complete new one, never
    a partial object. `list`/`delete` take a path prefix: '' means everything, `a/b` matches
    `a/b` itself and keys below `a/b/` (not `a/bc`).
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
        """The artifact's file if the store is a local directory, else None."""

    @abstractmethod
    @contextmanager
    def open_binary(self, key: str) -> Iterator[BinaryIO]:
        """Stream the artifact's bytes; reading to the end verifies size and sha256 (StoreError)."""

    @abstractmethod
    def describe(self) -> str:
        """Where the store is, for messages (a directory, or endpoint and bucket)."""

    def require_manifest(self, key: str) -> Manifest:
        found = self.manifest(key)
        if found is None:
            raise StoreError(f"{self.describe()}: no artifact {key!r} (its manifest is missing)")
        return found

    def get_file(self, key: str, local_path: str | Path) -> Path:
        """Copy the artifact to `local_path` (atomically), verifying sha256 against the manifest."""
        target = Path(local_path)
        with self.open_binary(key) as source:
            write_stream_atomically(source, target)
        return target

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

    def get_bytes(self, key: str) -> bytes:
        """Read a small artifact fully into memory, verified."""
        with self.open_binary(key) as source:
            return source.read()
