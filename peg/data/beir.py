"""BEIR folders: corpus.jsonl, queries.jsonl, qrels/<split>.tsv.

`BeirDataset.load` and `iter_corpus` also take `beir:NAME` (fetched on first use, `peg.data.fetch`).

Readers stream and validate. Each takes `on_error`: by default the first problem raises a
`DataError` naming file and line; `peg data check` passes a collector to see every problem.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from peg.data.errors import DataError, OnError, iter_jsonl, iter_lines, raise_error, require_text
from peg.data.fetch import resolve_beir

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Passage:
    id: str
    title: str
    text: str

    @property
    def full_text(self) -> str:
        """Title and text joined by a space, as BEIR/MTEB encode passages."""
        return f"{self.title} {self.text}".strip() if self.title else self.text


def iter_corpus(
    folder: str | Path, on_error: OnError = raise_error, allow_empty: bool = False, on_empty: OnError | None = None
) -> Iterator[Passage]:
    """Stream the passages of `folder/corpus.jsonl`, checking ids are unique and text non-empty
    (`allow_empty`: a passage whose title and text are both empty is yielded as it is, and
    `on_empty`, when given, is also told of it with its line)."""
    path = resolve_beir(folder) / "corpus.jsonl"
    seen: set[str] = set()
    for lineno, obj in iter_jsonl(path, on_error):
        try:
            pid = require_text(obj, "_id", path, lineno)
            title = obj.get("title") or ""
            if not isinstance(title, str):
                raise DataError(path, lineno, f"field 'title' must be a string, got {type(title).__name__}")
            text = require_text(obj, "text", path, lineno, allow_empty=allow_empty or bool(title.strip()))
            if pid in seen:
                raise DataError(path, lineno, f"duplicate id '{pid}'")
        except DataError as e:
            on_error(e)
            continue
        seen.add(pid)
        if on_empty is not None and not (title.strip() or text.strip()):
            on_empty(DataError(path, lineno, f"passage '{pid}' is empty (no title, no text)"))
        yield Passage(pid, title, text)


def load_queries(folder: str | Path, on_error: OnError = raise_error) -> dict[str, str]:
    """Read `folder/queries.jsonl` into {query id: text}."""
    path = Path(folder) / "queries.jsonl"
    queries: dict[str, str] = {}
    for lineno, obj in iter_jsonl(path, on_error):
        try:
            qid = require_text(obj, "_id", path, lineno)
            text = require_text(obj, "text", path, lineno)
            if qid in queries:
                raise DataError(path, lineno, f"duplicate id '{qid}'")
        except DataError as e:
            on_error(e)
            continue
        queries[qid] = text
    return queries


def load_qrels(folder: str | Path, split: str, on_error: OnError = raise_error) -> dict[str, dict[str, int]]:
    """Read `folder/qrels/<split>.tsv` (header line, tab-separated, CRLF accepted)."""
    path = Path(folder) / "qrels" / f"{split}.tsv"
    if not path.is_file():
        raise DataError(path, None, f"file not found (no qrels for split '{split}')")
    qrels: dict[str, dict[str, int]] = {}
    lines: dict[tuple[str, str], int] = {}
    for lineno, line in iter_lines(path, on_error):
        row = next(csv.reader([line.rstrip("\r\n")], delimiter="\t"), [])
        if not row or (lineno == 1 and row[0].strip().lower() in {"query-id", "query_id", "qid"}):
            continue
        try:
            if len(row) != 3:
                raise DataError(path, lineno, f"expected 3 tab-separated columns, got {len(row)}")
            qid, pid, score = (c.strip() for c in row)
            if not qid or not pid:
                raise DataError(path, lineno, "empty query-id or corpus-id")
            try:
                relevance = int(score)
            except ValueError:
                raise DataError(path, lineno, f"score '{score}' is not an integer") from None
            known = qrels.get(qid, {}).get(pid)
            if known is not None and known != relevance:
                raise DataError(
                    path, lineno, f"({qid}, {pid}) has relevance {relevance} here and {known} on line {lines[qid, pid]}"
                )
        except DataError as e:
            on_error(e)
            continue
        lines.setdefault((qid, pid), lineno)
        qrels.setdefault(qid, {})[pid] = relevance
    return qrels


@dataclass
class BeirDataset:
    """A validated BEIR split: corpus, the split's queries and their qrels, ids cross-checked."""

    folder: Path
    split: str
    corpus: dict[str, Passage]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    problems: list[DataError] = field(default_factory=list)
    empty_passages: list[str] = field(default_factory=list)
    # query id -> the texts that stand for its positives in training instead of the corpus's: a
    # generation-free synthetic query's source passage with the query cut out (`peg.llm.synth`)
    positive_texts: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def load(
        cls, folder: str | Path, split: str, on_error: OnError = raise_error, allow_empty: bool = False
    ) -> BeirDataset:
        """Load and cross-check; queries are restricted to those with qrels in `split`.

        `allow_empty`: passages whose title and text are both empty are kept (encoded as the empty
        string, as peers do, so metrics stay comparable with trec_eval on the full qrels) and
        counted in `empty_passages` with a logged warning; otherwise the first one is an error.
        """
        folder = resolve_beir(folder)
        if not folder.is_dir():
            raise DataError(folder, None, "not a directory (expected a BEIR folder)")
        corpus = {p.id: p for p in iter_corpus(folder, on_error, allow_empty)}
        empty = [pid for pid, p in corpus.items() if not p.full_text.strip()]
        if empty:
            logger.warning(
                "%s: %d passage(s) with empty title and text (first: '%s') are encoded as empty strings",
                folder / "corpus.jsonl", len(empty), empty[0],
            )
        all_queries = load_queries(folder, on_error)
        qrels = load_qrels(folder, split, on_error)
        check_qrels_ids(folder, split, qrels, all_queries, corpus, on_error)
        queries = {qid: all_queries[qid] for qid in qrels if qid in all_queries}
        return cls(folder, split, corpus, queries, qrels, empty_passages=empty)


def check_qrels_ids(
    folder: Path,
    split: str,
    qrels: dict[str, dict[str, int]],
    queries: dict[str, str],
    corpus: dict[str, Passage],
    on_error: OnError = raise_error,
) -> None:
    """Every qrels query id must be in queries.jsonl and every corpus id in corpus.jsonl."""
    path = folder / "qrels" / f"{split}.tsv"
    lines = _qrels_line_numbers(path)
    for qid, docs in qrels.items():
        if qid not in queries:
            on_error(DataError(path, lines.get((qid, None)), f"query id '{qid}' is not in queries.jsonl"))
        for pid in docs:
            if pid not in corpus:
                on_error(DataError(path, lines.get((qid, pid)), f"corpus id '{pid}' is not in corpus.jsonl"))


def _qrels_line_numbers(path: Path) -> dict[tuple[str, str | None], int]:
    lines: dict[tuple[str, str | None], int] = {}
    with path.open(encoding="utf-8-sig", errors="replace", newline="") as f:
        for lineno, row in enumerate(csv.reader(f, delimiter="\t"), start=1):
            if len(row) == 3:
                qid, pid = row[0].strip(), row[1].strip()
                lines.setdefault((qid, None), lineno)
                lines.setdefault((qid, pid), lineno)
    return lines
