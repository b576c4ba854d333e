"""LocalStore: artifacts as files under a root directory, manifests beside them."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
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


class LocalStore(ArtifactStore):
    """Artifacts under `root`: `root/<key>` and `root/<key>.manifest.json`.

    `put_file` copies through a temp file in the target directory (fsync, os.replace) and writes
    the manifest last; an interrupted write leaves the previous artifact (or nothing) in place.
    Opening creates nothing: the directory appears with the first write, so a mistyped path in a
    read-only command (`status`, `store ls`) reads as an empty store instead of making a folder.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().absolute()
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
    # Create: link a complete temp file into place (fails if the name exists). Compare-and-swap:
    # rename the current file to a private name, compare it with the token, then put the new
    # content in place (or the old one back). While the name is moved aside another process can
    # find it absent; see README "Integrity" for that window.

    def _control_path(self, key: str) -> Path:
        return self.root / check_key(key)

    def create_object(self, key: str, data: bytes) -> str | None:
        path = self._control_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, file_mode())
            try:
                os.link(tmp, path)
            except FileExistsError:
                return None
            fsync_dir(path.parent)
            return hashlib.sha256(data).hexdigest()
        finally:
            Path(tmp).unlink(missing_ok=True)

    def read_object(self, key: str) -> tuple[bytes, str] | None:
        try:
            data = self._control_path(key).read_bytes()
        except FileNotFoundError:
            return None
        return data, hashlib.sha256(data).hexdigest()

    def _swap(self, key: str, token: str, data: bytes | None) -> str | None:
        path = self._control_path(key)
        aside = path.with_name(f"{TEMP_PREFIX}{path.name}.{os.getpid()}.{os.urandom(4).hex()}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return None
        try:
            if hashlib.sha256(aside.read_bytes()).hexdigest() != token:
                try:
                    os.link(aside, path)  # not ours to change: put it back (unless a new one appeared)
                except FileExistsError:
                    pass
                return None
            return token if data is None else self.create_object(key, data)
        finally:
            aside.unlink(missing_ok=True)

    def replace_object(self, key: str, data: bytes, token: str) -> str | None:
        return self._swap(key, token, data)

    def remove_object(self, key: str, token: str) -> bool:
        return self._swap(key, token, None) is not None
