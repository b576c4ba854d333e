"""Local file primitives every part of peg uses: write-temp-then-rename and a file's sha256.

Files are written through a temp file in the target's directory (flush, fsync, chmod to the
usual `0666 & ~umask`, `os.replace`, fsync of the directory), so a reader sees the old file or
the complete new one, and another user (a serving container) can read what peg wrote.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

TEMP_PREFIX = ".peg-tmp-"
CHUNK_SIZE = 1 << 20


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def file_mode() -> int:
    """The mode a plain `open(path, "w")` would give a new file: 0666 minus the process umask."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """The mode a plain `mkdir` would give a new directory (`tempfile.mkdtemp` gives 0700)."""
    return 0o777 & ~_umask()


def file_sha256(path: str | Path) -> tuple[int, str]:
    """(size, sha256 hex) of a file, read once in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_output(
    target: str | Path, mode: str = "wb", encoding: str | None = None, before_replace: Callable[[], None] | None = None
) -> Iterator:
    """Open a temp file beside `target`; on a clean exit it replaces `target` (fsync'd, usual mode).

    `before_replace` runs once the data is on disk, just before the rename. On any error the
    temp file is removed and `target` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=target.parent)
    try:
        with os.fdopen(fd, mode, encoding=encoding if "b" not in mode else None) as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, file_mode())
        if before_replace:
            before_replace()
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def write_atomically(target: str | Path, data: bytes | str) -> Path:
    """Write `data` (bytes, or text as UTF-8) to `target` atomically; returns `target`."""
    with atomic_output(target) as out:
        out.write(data.encode() if isinstance(data, str) else data)
    return Path(target)


def copy_stream_atomically(source: BinaryIO, target: str | Path, advance: Callable[[int], None] | None = None) -> Path:
    """Copy `source` to `target` atomically, chunk by chunk."""
    with atomic_output(target) as out:
        while chunk := source.read(CHUNK_SIZE):
            out.write(chunk)
            if advance:
                advance(len(chunk))
    return Path(target)
