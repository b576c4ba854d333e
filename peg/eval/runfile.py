"""TREC run files: `qid Q0 docid rank score tag`, one line per retrieved document."""

from __future__ import annotations

from pathlib import Path

from peg.data.errors import DataError
from peg.eval.metrics import Run, top_k
from peg.store.files import atomic_output


def write_run(path: str | Path, run: Run, tag: str = "peg") -> None:
    """Write `run` atomically; ranks follow trec_eval's order (score desc, docid desc)."""
    with atomic_output(path, "w", encoding="utf-8") as f:
        for qid, docs in top_k(run, max((len(d) for d in run.values()), default=0)).items():
            for rank, (docid, score) in enumerate(docs.items(), start=1):
                f.write(f"{qid} Q0 {docid} {rank} {score!r} {tag}\n")


def read_run(path: str | Path) -> Run:
    """Read a TREC run file; malformed lines raise DataError naming file and line."""
    path = Path(path)
    run: Run = {}
    with path.open() as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 6:
                raise DataError(path, lineno, f"expected 6 fields 'qid Q0 docid rank score tag', got {len(parts)}")
            qid, _, docid, _, score, _ = parts
            try:
                run.setdefault(qid, {})[docid] = float(score)
            except ValueError:
                raise DataError(path, lineno, f"score '{score}' is not a number") from None
    return run
