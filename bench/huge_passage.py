"""Peak memory of `peg encode` on a corpus with one huge passage: text is cut before tokenisation.

    nice -n 19 python bench/huge_passage.py [--mib 200] [--baseline-root DIR --baseline-mib 20]

Writes a small BEIR folder (60 short passages, 6 train queries) plus one passage of `--mib` MiB
of words, runs `peg encode` on a tiny BERT (64 positions, passages cut at 64 tokens) in a fresh store, and samples
every 0.2 s the resident memory of peg and all its descendants (Ray's raylet, GCS and encode
actors included). Writes bench/results/huge_passage.json / .md: exit code, wall time, the peak
of the summed RSS and the peak of the largest single process. `--baseline-root` also runs
another checkout's peg (e.g. a worktree of fc691a9) for the before figure: there a 200 MiB
passage grew the encode process past 21 GB until the kernel killed it, so give it a small
`--baseline-mib`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, WORDS, Results  # noqa: E402
from stream_memory import tiny_model  # noqa: E402


def write_beir(path: Path, huge_mib: int) -> Path:
    rng = random.Random(0)
    (path / "qrels").mkdir(parents=True)
    with (path / "corpus.jsonl").open("w") as f:
        for i in range(60):
            f.write(json.dumps({"_id": f"p{i}", "title": "", "text": " ".join(rng.choices(WORDS, k=40))}) + "\n")
        chunk = " ".join(rng.choices(WORDS, k=200_000)) + " "
        f.write('{"_id": "huge", "title": "", "text": "')
        for _ in range(huge_mib * 2**20 // len(chunk) + 1):
            f.write(chunk)
        f.write('"}\n')
    queries = [{"_id": f"q{i}", "text": " ".join(rng.choices(WORDS, k=6))} for i in range(6)]
    (path / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (path / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\tp{i}\t1\n" for i in range(6)))
    return path


def encode_and_watch(config: Path, env: dict, root: str) -> dict:
    """Run `peg encode` of checkout `root`; the peaks of the summed and of the largest RSS of its process tree."""
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "peg", "encode", str(config)], env={**env, "PYTHONPATH": root}, cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    root = psutil.Process(proc.pid)
    peak_sum = peak_one = 0
    while proc.poll() is None:
        rss = []
        for process in [root, *root.children(recursive=True)]:
            try:
                rss.append(process.memory_info().rss)
            except psutil.Error:
                pass
        peak_sum, peak_one = max(peak_sum, sum(rss)), max(peak_one, max(rss, default=0))
        time.sleep(0.2)
    output = proc.stdout.read()
    return {"rc": proc.returncode, "wall_s": time.monotonic() - start, "peak_tree_gib": peak_sum / 2**30,
            "peak_process_gib": peak_one / 2**30, "last_line": output.strip().splitlines()[-1] if output.strip() else ""}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=200)
    parser.add_argument("--baseline-root", help="another checkout (e.g. a worktree of fc691a9) to run as well")
    parser.add_argument("--baseline-mib", type=int, default=20, help="its passage size: keep it small")
    args = parser.parse_args()
    runs = [(str(REPO), args.mib)] + ([(args.baseline_root, args.baseline_mib)] if args.baseline_root else [])
    results = Results("huge_passage", "peg encode: one huge passage among 60 short ones (tiny BERT, 64 positions)",
                      {"passage_max_length": 64},
                      ["checkout", "huge_mib", "rc", "wall_s", "peak_tree_gib", "peak_process_gib", "last_line"])  # fmt: skip
    for root, mib in runs:
        with tempfile.TemporaryDirectory(prefix="peg-bench-huge-") as tmp:
            tmp = Path(tmp)
            config = tmp / "config.yaml"
            config.write_text(json.dumps({
                "name": "bench-huge", "data": {"beir": str(write_beir(tmp / "beir", mib))},
                "model": {"name_or_path": tiny_model(tmp / "tiny"), "query_max_length": 32, "passage_max_length": 64},
                "encode": {"num_actors": 1, "actor_cpus": 0.5}, "store": {"uri": str(tmp / "store")},
            }))  # fmt: skip
            env = {**os.environ, "PEG_WORK_DIR": str(tmp / "work"), "TOKENIZERS_PARALLELISM": "false"}
            commit = subprocess.run(["git", "-C", root, "describe", "--always", "--dirty"], capture_output=True, text=True)
            label = root if root != str(REPO) else "this checkout"
            results.add({"checkout": f"{label} ({commit.stdout.strip()})", "huge_mib": mib, **encode_and_watch(config, env, root)})


if __name__ == "__main__":
    main()
