"""Shared pieces of the benchmarks: generated texts, the machine, and writing JSON + markdown + PNG.

Each benchmark runs peg and its peer in ONE run on the same machine and writes
bench/results/<name>.json, .md and .png as rows finish (a cut-short run keeps what it measured).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import random
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]

WORDS = (
    "cell protein gene expression patients study results increased associated treatment disease clinical "
    "risk analysis data model effect levels response group control human mice tumor cancer receptor "
    "signaling pathway activity function role factor development significant observed reduced compared "
    "trial therapy dose outcome population infection immune virus mutation sequence binding structure "
    "mechanism regulation growth tissue blood brain neurons memory learning network method approach"
).split()


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def passage_lengths(rng: random.Random, count: int, mean_words: int) -> list[int]:
    """Word counts spread like abstracts (log-normal around `mean_words`, 10..4x mean)."""
    return [max(10, min(4 * mean_words, int(rng.lognormvariate(0, 0.6) * mean_words))) for _ in range(count)]


def training_pairs(path: Path, queries: int, negatives: int, query_words: int, mean_words: int, seed: int = 0) -> Path:
    """A training-pair JSONL of generated texts: queries of `query_words` words, passages spread around `mean_words`."""
    import numpy as np

    rng = random.Random(seed)
    picks = np.random.default_rng(seed)
    vocab = np.array(WORDS)

    def text(n: int) -> str:
        return " ".join(vocab[picks.integers(0, len(vocab), n)])

    with path.open("w") as f:
        for i in range(queries):
            lengths = passage_lengths(rng, 1 + negatives, mean_words)
            row = {"query": f"{i} " + text(query_words), "pos": [f"{i} " + text(lengths[0])],
                   "neg": [f"{i}.{j} " + text(n) for j, n in enumerate(lengths[1:])]}  # fmt: skip
            f.write(json.dumps(row) + "\n")
    return path


def merged(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` applied key by key, nested sections merged (neither is changed)."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merged(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def paired_difference(new: dict[str, float], old: dict[str, float], resamples: int = 10_000, seed: int = 0) -> dict:
    """Mean of `new[q] - old[q]` over the queries both score, with a 95% paired bootstrap interval
    (queries resampled with replacement, `seed` fixed) and the counts of queries that rose / fell."""
    shared = sorted(new.keys() & old.keys())
    if not shared:
        raise ValueError("the two per-query score sets share no query")
    diffs = np.array([new[q] - old[q] for q in shared])
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, len(diffs), size=(resamples, len(diffs)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": float(diffs.mean()), "ci95": [float(low), float(high)], "queries": len(shared),
            "better": int((diffs > 0).sum()), "worse": int((diffs < 0).sum())}


def machine() -> dict:
    info = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), "python": platform.python_version(),
            "cpus": os.cpu_count(), "load_1min": round(os.getloadavg()[0], 1)}  # fmt: skip
    try:
        import torch

        from peg.llm.loading import native_bf16

        info["torch"] = torch.__version__
        info["native_bf16"] = native_bf16()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_json(args: list[str], env: dict | None = None, timeout: int = 1800) -> dict:
    """Run `python args...` in a fresh process; its last stdout line is a JSON object."""
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=REPO)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"{args} failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


class Results:
    """Rows of one benchmark, rewritten to results/<name>.json and .md after every row."""

    def __init__(self, name: str, title: str, settings: dict, columns: list[str]):
        RESULTS.mkdir(parents=True, exist_ok=True)
        self.name, self.title, self.columns = name, title, columns
        self.data = {"benchmark": name, "machine": machine(), "settings": settings, "rows": [], "notes": []}

    def add(self, row: dict) -> None:
        self.data["rows"].append(row)
        self.write()

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        self.write()

    def write(self) -> None:
        (RESULTS / f"{self.name}.json").write_text(json.dumps(self.data, indent=1, default=str) + "\n")  # Paths as text
        m = self.data["machine"]
        lines = [f"## {self.title}", "", f"{m['date']}, {m.get('gpu') or str(m['cpus']) + ' CPUs'}, load {m['load_1min']} "
                 f"at start; settings: `{json.dumps(self.data['settings'], default=str)}`", "",
                 "| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]  # fmt: skip
        for row in self.data["rows"]:
            lines.append("| " + " | ".join(_cell(row.get(c)) for c in self.columns) + " |")
        lines += [""] + [f"- {n}" for n in self.data["notes"]]
        (RESULTS / f"{self.name}.md").write_text("\n".join(lines) + "\n")

    def bar_chart(self, label: str, value: str, ylabel: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [r for r in self.data["rows"] if isinstance(r.get(value), (int, float))]
        fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(rows)), 3.4))
        bars = ax.bar([str(r[label]) for r in rows], [r[value] for r in rows], color="#4878a8")
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(self.title, fontsize=10)
        plt.setp(ax.get_xticklabels(), rotation=20, ha="right", fontsize=8)
        fig.tight_layout()
        fig.savefig(RESULTS / f"{self.name}.png", dpi=100)
        plt.close(fig)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return "" if value is None else str(value)
