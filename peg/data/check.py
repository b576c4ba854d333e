"""`peg data check`: validate a BEIR folder or a training-pair JSONL, collecting every problem."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from peg.data.beir import check_qrels_ids, iter_corpus, load_qrels, load_queries
from peg.data.errors import DataError, missing_file_reason
from peg.data.fetch import resolve_beir
from peg.data.pairs import iter_examples


@dataclass
class CheckReport:
    counts: dict[str, int] = field(default_factory=dict)
    problems: list[DataError] = field(default_factory=list)


def check_path(path: str | Path, splits: list[str] | None = None) -> CheckReport:
    """Check a BEIR folder or `beir:NAME` (all qrels splits unless `splits`; only its corpus when it
    has neither queries.jsonl nor qrels/) or a training-pair JSONL file."""
    path = resolve_beir(path)
    report = CheckReport()
    collect = report.problems.append
    if path.is_file():
        report.counts["examples"] = sum(1 for _ in iter_examples(path, collect))
        return report
    if not path.is_dir():
        reason = missing_file_reason(path)
        raise DataError(path, None, "not found (expected a BEIR folder or a training-pair JSONL file)"
                        if reason == "file not found" else reason)
    # an empty passage is named as empty (with its line), and its id still counts for the qrels
    corpus = {p.id: p for p in iter_corpus(path, collect, allow_empty=True, on_empty=collect)}
    report.counts["passages"] = len(corpus)
    if splits is None and not (path / "queries.jsonl").exists() and not (path / "qrels").exists():
        return report  # a corpus-only folder: valid input for training on synthetic queries
    queries = load_queries(path, collect)
    report.counts["queries"] = len(queries)
    if splits is None:
        splits = sorted(p.stem for p in (path / "qrels").glob("*.tsv"))
    if not splits:
        collect(DataError(path / "qrels", None, "no qrels/<split>.tsv files"))
    for split in splits:
        try:
            qrels = load_qrels(path, split, collect)
        except DataError as e:
            collect(e)
            continue
        report.counts[f"qrels[{split}] queries"] = len(qrels)
        report.counts[f"qrels[{split}] pairs"] = sum(len(d) for d in qrels.values())
        check_qrels_ids(path, split, qrels, queries, corpus, collect)
    return report
