"""Errors for bad input data: each names the file and, where there is one, the line."""

from __future__ import annotations

import codecs
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from peg.errors import PegError


class DataError(PegError, ValueError):
    """Bad input data. `str()` reads `file:line: message`."""

    bad_input = True

    def __init__(self, path: str | Path, line: int | None, message: str):
        self.path = str(path)
        self.line = line
        self.message = message
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


OnError = Callable[[DataError], None]


def raise_error(error: DataError) -> None:
    """The default `on_error`: stop at the first problem."""
    raise error


def missing_file_reason(path: Path) -> str:
    """Why `path`, which is not a readable file, cannot be read: the message a DataError gives."""
    try:
        path.resolve(strict=True)
    except FileNotFoundError:
        pass
    except (RuntimeError, OSError):  # RuntimeError: Python < 3.13's symlink loop
        return "symbolic links loop (the path leads back to itself)"
    if path.is_dir():
        return "is a directory, not a file"
    compressed = [p.name for p in path.parent.glob(f"{path.name}.*") if p.suffix in (".gz", ".bz2", ".xz", ".zst", ".zip")]
    if compressed:
        return f"file not found (there is {compressed[0]}: decompress it first)"
    return "file not found"


def iter_lines(path: Path, on_error: OnError = raise_error) -> Iterator[tuple[int, str]]:
    """Yield (line number, text) of a UTF-8 file; a leading BOM is dropped, a line that is not
    valid UTF-8 goes to `on_error`. Line endings are kept."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                on_error(DataError(path, lineno, f"invalid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"))


def iter_jsonl(path: str | Path, on_error: OnError = raise_error) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line; a malformed line goes to `on_error`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, missing_file_reason(path))
    for lineno, raw in iter_lines(path, on_error):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            on_error(DataError(path, lineno, f"malformed JSON: {e.msg} (column {e.colno})"))
            continue
        if not isinstance(obj, dict):
            on_error(DataError(path, lineno, f"expected a JSON object, got {type(obj).__name__}"))
            continue
        yield lineno, obj


def require_text(obj: dict[str, Any], key: str, path: Path | str, lineno: int, *, allow_empty: bool = False) -> str:
    """Return obj[key] as a string, raising DataError if missing, not a string or empty."""
    if key not in obj:
        raise DataError(path, lineno, f"missing field '{key}'")
    value = obj[key]
    if isinstance(value, int) and not isinstance(value, bool) and key.endswith("id"):
        value = str(value)
    if not isinstance(value, str):
        raise DataError(path, lineno, f"field '{key}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(path, lineno, f"field '{key}' is empty")
    return value
