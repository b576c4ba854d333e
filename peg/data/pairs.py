"""Training-pair JSONL as used by sentence-transformers / FlagEmbedding.

One object a line: {"query": str, "pos": [str, ...], "neg": [str, ...]} plus optional
"query_id", "pos_ids", "neg_ids" (ids aligned with the texts) and "pos_scores", "neg_scores"
(teacher scores aligned with the texts, for listwise distillation).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from peg.data.errors import DataError, OnError, iter_jsonl, raise_error, require_text
from peg.store.files import atomic_output

_KNOWN = {"query", "pos", "neg", "query_id", "pos_ids", "neg_ids", "pos_scores", "neg_scores", "query_type"}


@dataclass
class TrainingExample:
    query: str
    pos: list[str]
    neg: list[str] = field(default_factory=list)
    query_id: str | None = None
    pos_ids: list[str] | None = None
    neg_ids: list[str] | None = None
    pos_scores: list[float] | None = None
    neg_scores: list[float] | None = None
    query_type: str | None = None

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None}, ensure_ascii=False)


def _text_list(obj: dict[str, Any], key: str, path: Path, lineno: int, *, required: bool) -> list[str]:
    if key not in obj:
        if required:
            raise DataError(path, lineno, f"missing field '{key}'")
        return []
    value = obj[key]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise DataError(path, lineno, f"field '{key}' must be a list of strings, got {type(value).__name__}")
    if required and not value:
        raise DataError(path, lineno, f"field '{key}' is empty")
    for i, text in enumerate(value):
        if not isinstance(text, str):
            raise DataError(path, lineno, f"{key}[{i}] must be a string, got {type(text).__name__}")
        if not text.strip():
            raise DataError(path, lineno, f"{key}[{i}] is empty text")
    return value


def _aligned(obj: dict[str, Any], key: str, texts: list[str], kind: type, path: Path, lineno: int) -> list | None:
    if key not in obj:
        return None
    value = obj[key]
    if not isinstance(value, list) or len(value) != len(texts):
        n = len(value) if isinstance(value, list) else type(value).__name__
        raise DataError(path, lineno, f"field '{key}' must be a list aligned with its texts ({len(texts)}), got {n}")
    try:
        values = [kind(v) for v in value]
    except (TypeError, ValueError):
        raise DataError(path, lineno, f"field '{key}' must hold {kind.__name__} values") from None
    if kind is float and not all(math.isfinite(v) for v in values):
        raise DataError(path, lineno, f"field '{key}' holds a non-finite value ({value})")
    return values


def parse_example(obj: dict[str, Any], path: Path, lineno: int) -> TrainingExample:
    unknown = set(obj) - _KNOWN
    if unknown:
        raise DataError(path, lineno, f"unknown field(s) {sorted(unknown)}; known: {sorted(_KNOWN)}")
    query = require_text(obj, "query", path, lineno)
    pos = _text_list(obj, "pos", path, lineno, required=True)
    neg = _text_list(obj, "neg", path, lineno, required=False)
    query_id = obj.get("query_id")
    return TrainingExample(
        query=query,
        pos=pos,
        neg=neg,
        query_id=None if query_id is None else str(query_id),
        pos_ids=_aligned(obj, "pos_ids", pos, str, path, lineno),
        neg_ids=_aligned(obj, "neg_ids", neg, str, path, lineno),
        pos_scores=_aligned(obj, "pos_scores", pos, float, path, lineno),
        neg_scores=_aligned(obj, "neg_scores", neg, float, path, lineno),
        query_type=obj.get("query_type"),
    )


def iter_examples(path: str | Path, on_error: OnError = raise_error) -> Iterator[TrainingExample]:
    """Stream and validate a training-pair JSONL file."""
    path = Path(path)
    count = 0
    for lineno, obj in iter_jsonl(path, on_error):
        try:
            yield parse_example(obj, path, lineno)
            count += 1
        except DataError as e:
            on_error(e)
    if count == 0:
        on_error(DataError(path, None, "no training examples (the file is empty)"))


def write_examples(path: str | Path, examples: Iterable[TrainingExample]) -> int:
    """Write examples atomically (temp file + rename); returns the count written."""
    count = 0
    with atomic_output(path, "w", encoding="utf-8") as f:
        for example in examples:
            f.write(example.to_json() + "\n")
            count += 1
    return count
