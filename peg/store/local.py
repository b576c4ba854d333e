"""LocalStore: artifacts as files under a root directory, manifests beside them."""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from peg.store.base import (
    MANIFEST_SUFFIX,
    ArtifactStore,
    Manifest,
    StoreError,
    VerifyingReader,
    check_key,
    check_prefix,
    new_manifest,
    under_prefix,
)
from peg.store.files import CHUNK_SIZE, TEMP_PREFIX, atomic_output, file_mode, fsync_dir, write_atomically

CONTROL_LOCK_PREFIX = f"{TEMP_PREFIX}lock-"  # no key may start with TEMP_PREFIX (check_key)


class LocalStore(ArtifactStore):
    """Artifacts under `root`: `root/<key>` and `root/<key>.manifest.json`.

    `put_file` copies through a temp file in the target directory (fsync, os.replace) and writes
    the manifest last; an interrupted write leaves the previous artifact (or nothing) in place.
    Opening creates nothing: the directory appears with the first write, so a mistyped path in a
    read-only command (`status`, `store ls`) reads as an empty store instead of making a folder.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().absolute()
        try:
            self.root.resolve(strict=False)
        except (RuntimeError, OSError):  # RuntimeError: Python < 3.13's symlink loop
            raise StoreError(f"local store {self.root}: symbolic links loop (the path leads back to itself)") from None
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"local store {self.root}: not a directory")

    def describe(self) -> str:
        return f"local store {self.root}"

    def _object_path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _manifest_path(self, key: str) -> Path:
        return self.root / (check_key(key) + MANIFEST_SUFFIX)

    def put_file(self, key: str, local_path: str | Path, producer: str, config_hash: str = "") -> Manifest:
        target = self._object_path(key)
        manifest_path = self._manifest_path(key)
        source = Path(local_path)
        digest = hashlib.sha256()
        size = 0
        # The old manifest goes just before the new object replaces the old: meanwhile the key
        # reads as absent, never as the old manifest describing the new object.
        try:
            with atomic_output(target, before_replace=lambda: manifest_path.unlink(missing_ok=True)) as out, \
                    open(source, "rb") as f:
                while chunk := f.read(CHUNK_SIZE):
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
        except OSError as e:
            raise StoreError(f"{self.describe()}: cannot write {key!r} from {source}: {e}") from e
        manifest = new_manifest(key, size, digest.hexdigest(), producer, config_hash)
        try:
            write_atomically(manifest_path, manifest.to_json())
        except OSError as e:
            raise StoreError(f"{self.describe()}: cannot write the manifest of {key!r}: {e}") from e
        return manifest

    def manifest(self, key: str) -> Manifest | None:
        path = self._manifest_path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        return Manifest.from_json(data, str(path))

    def exists(self, key: str) -> bool:
        try:
            found = self.manifest(key)
        except StoreError:
            return False
        if found is None:
            return False
        try:
            return self._object_path(key).stat().st_size == found.size
        except FileNotFoundError:
            return False

    def list(self, prefix: str = "") -> list[str]:
        prefix = check_prefix(prefix)
        keys = []
        start = self.root / prefix if prefix and (self.root / prefix).is_dir() else self.root
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = [d for d in dirnames if not d.startswith(TEMP_PREFIX)]
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if not name.endswith(MANIFEST_SUFFIX):
                    continue
                key = name[: -len(MANIFEST_SUFFIX)] if rel_dir == "." else f"{rel_dir}/{name[: -len(MANIFEST_SUFFIX)]}"
                if under_prefix(key, prefix) and (Path(dirpath) / name[: -len(MANIFEST_SUFFIX)]).is_file():
                    keys.append(key)
        return sorted(keys)

    def delete(self, prefix: str) -> None:
        prefix = check_prefix(prefix)
        if not self.root.is_dir():
            return
        if not prefix:
            for child in self.root.iterdir():
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
            return
        path = self.root / prefix
        Path(str(path) + MANIFEST_SUFFIX).unlink(missing_ok=True)  # manifest first: the key turns absent
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

    def local_path(self, key: str) -> Path:
        return self._object_path(key)

    @contextmanager
    def open_binary(self, key: str) -> Iterator[BinaryIO]:
        found = self.require_manifest(key)
        path = self._object_path(key)
        try:
            raw = open(path, "rb")
        except FileNotFoundError:
            raise StoreError(f"{self.describe()}: artifact {key!r} has a manifest but no object at {path}") from None
        with raw, io.BufferedReader(VerifyingReader(raw, found, f"{self.describe()}: {key}"), CHUNK_SIZE) as reader:
            yield reader

    # --- control objects (a run's lease) ---------------------------------------------------------
    # Every write of a control object holds an exclusive flock on a hidden lock file beside it
    # (`.peg-tmp-lock-<name>`, never listed), so a create and a compare-and-swap cannot interleave,
    # between threads or processes. Writes land with os.replace, so a reader never finds the name
    # missing while the object exists. flock also holds across NFS clients (Linux maps it to NFS
    # byte-range locks).

    def _control_path(self, key: str) -> Path:
        return self.root / check_key(key)

    @contextmanager
    def _control_lock(self, path: Path) -> Iterator[None]:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.with_name(f"{CONTROL_LOCK_PREFIX}{path.name}"), os.O_RDWR | os.O_CREAT, file_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    @staticmethod
    def _current(path: Path) -> tuple[bytes, str] | None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:  # a directory or an unreadable file where the control object belongs
            raise StoreError(f"{path}: cannot read ({e.strerror}); peg writes this file itself: move it away") from None
        return data, hashlib.sha256(data).hexdigest()

    def create_object(self, key: str, data: bytes) -> str | None:
        path = self._control_path(key)
        with self._control_lock(path):
            if path.exists():
                return None
            write_atomically(path, data)
        return hashlib.sha256(data).hexdigest()

    def read_object(self, key: str) -> tuple[bytes, str] | None:
        return self._current(self._control_path(key))

    def replace_object(self, key: str, data: bytes, token: str) -> str | None:
        path = self._control_path(key)
        with self._control_lock(path):
            current = self._current(path)
            if current is None or current[1] != token:
                return None
            write_atomically(path, data)
        return hashlib.sha256(data).hexdigest()

    def remove_object(self, key: str, token: str) -> bool:
        path = self._control_path(key)
        with self._control_lock(path):
            current = self._current(path)
            if current is None or current[1] != token:
                return False
            path.unlink()
            fsync_dir(path.parent)
        return True
