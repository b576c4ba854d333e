"""Dev-selected checkpoint vs last, and nDCG@10 at each Matryoshka dimension, on SciFact test.

One `peg train` run of the quickstart's settings (packaged all-MiniLM-L6-v2, progressive InfoNCE,
32 queries x (1 + 1) a step, GradCache chunk 16, 2 ranks ZeRO-2, 1 epoch, lr 2e-5) plus
`loss.matryoshka_dims` [384, 256, 128, 64] and `train.eval_every` (dev: 100 train queries held
out by seed, `data.dev_queries`). Hard negatives: the base model's top-30 per train query, the
first passage that is not a positive and scores below 0.95 x the positive (TopK-PercPos, as the
quickstart's mining). Outputs `bench/results/train_selection.{json,md}`: the dev curve, which
step won, SciFact test nDCG@10 / Recall@100 of the selected (model/) and last (last-model/)
models at every dimension, and the base model's at every dimension (truncated, not trained for it).

    nice -n 10 python bench/train_selection.py [--eval-every 8] [--work /tmp/peg-train-selection]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import machine
from bench.scifact import MINILM, ROOT, SCIFACT
from peg.config import ModelConfig
from peg.data import BeirDataset
from peg.eval import evaluate_embeddings
from peg.eval.retrieval import search, truncate_embeddings
from peg.model.encoder import Encoder
from peg.train.metrics import read_metrics

DIMS = [384, 256, 128, 64]


def embed(encoder: Encoder, data: BeirDataset) -> tuple[list[str], np.ndarray, list[str], np.ndarray]:
    qids, pids = list(data.queries), list(data.corpus)
    q = encoder.encode([data.queries[i] for i in qids], "query", 32)
    p = encoder.encode([data.corpus[i].full_text for i in pids], "passage", 32)
    return qids, q, pids, p


def at_dims(qids, q, pids, p, qrels) -> dict[str, dict[str, float]]:
    out = {}
    for dim in DIMS:
        qd, pd = (q, p) if dim == q.shape[1] else (truncate_embeddings(q, dim, True), truncate_embeddings(p, dim, True))
        metrics = evaluate_embeddings(qids, qd, pids, pd, qrels, (10, 100)).metrics
        out[str(dim)] = {"ndcg@10": metrics["ndcg@10"], "recall@100": metrics["recall@100"]}
    return out


def hard_negative(scores, rows, pids: list[str], positives: list[str]) -> str | None:
    """TopK-PercPos over one query's ranked (scores, rows): the first passage that is not a positive
    and scores below 0.95 x the best positive's score (the top score if no positive was retrieved)."""
    retrieved = [float(s) for s, j in zip(scores, rows) if pids[j] in positives]
    pos_score = max(retrieved) if retrieved else float(scores[0])
    return next((pids[j] for s, j in zip(scores, rows) if pids[j] not in positives and s < 0.95 * pos_score), None)


def mine_pairs(train: BeirDataset, qids, q, pids, p, path: Path) -> int:
    """Write one training pair per train query that has a hard negative among the base model's top 30 (see
    `hard_negative`); returns the rows written."""
    scores, indices = search(q, p, 30)
    rows = 0
    with path.open("w") as f:
        for qid, sc, idx in zip(qids, scores, indices):
            positives = [d for d, rel in train.qrels[qid].items() if rel > 0]
            neg = hard_negative(sc, idx, pids, positives)
            if neg is None:
                continue
            row = {"query": train.queries[qid], "pos": [train.corpus[positives[0]].full_text],
                   "neg": [train.corpus[neg].full_text]}  # fmt: skip
            f.write(json.dumps(row) + "\n")
            rows += 1
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-every", type=int, default=8)
    parser.add_argument("--work", type=Path, default=Path("/tmp/peg-train-selection"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "train_selection")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    train = BeirDataset.load(SCIFACT, "train")
    test = BeirDataset.load(SCIFACT, "test")
    base = Encoder(ModelConfig(name_or_path=MINILM))
    t0 = time.perf_counter()
    tq = base.encode([train.queries[i] for i in train.queries], "query", 32)
    qids, q, pids, p = embed(base, test)
    pairs = args.work / "pairs.jsonl"
    rows = mine_pairs(train, list(train.queries), tq, pids, p, pairs)
    base_test = at_dims(qids, q, pids, p, test.qrels)
    print(f"base encoded and mined ({rows} pairs) in {time.perf_counter() - t0:.0f} s: {base_test}", flush=True)

    config = {
        "name": "train-selection",
        "data": {"beir": str(SCIFACT), "train_files": [str(pairs)], "dev_queries": 100},
        "model": {"name_or_path": MINILM, "query_max_length": 64, "passage_max_length": 256},
        "loss": {"kind": "infonce", "temperature": 0.05, "progressive": {"enabled": True}, "matryoshka_dims": DIMS},
        "batch": {"queries_per_step": 32, "hard_negatives": 1, "chunk_size": 16},
        "mining": {"negatives_per_query": 1},
        "train": {"epochs": 1, "learning_rate": 2e-5, "warmup_ratio": 0.1, "nproc_per_node": 2, "zero_stage": 2,
                  "eval_every": args.eval_every, "select_metric": "ndcg@10"},
        "encode": {"batch_size": 32},
    }
    config_path = args.work / "config.json"
    config_path.write_text(json.dumps(config))
    out_dir = args.work / "out"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "peg", "train", str(config_path), "--output", str(out_dir)], cwd=ROOT)
    train_s = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"peg train failed ({proc.returncode})")
    curve = [{k: r[k] for k in r if k == "step" or k.startswith("dev_")} for r in read_metrics(out_dir / "metrics.jsonl")
             if "dev_ndcg@10" in r]  # fmt: skip
    best = json.loads((out_dir / "best.json").read_text())
    results = {"base": base_test}
    for label, folder in (("selected", out_dir / "model"), ("last", out_dir / "last-model")):
        encoder = Encoder(ModelConfig(name_or_path=str(folder)))
        results[label] = at_dims(*embed(encoder, test), test.qrels)
    payload = {"started": started, "machine": machine(), "settings": config, "training_pairs": rows,
               "train_wall_s": round(train_s), "best": {k: best[k] for k in ("step", "metric", "value")},
               "dev_curve": curve, "test": results}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [f"SciFact test, {started}; training {round(train_s)} s wall (evaluations included); best dev "
             f"nDCG@10 {best['value']:.4f} at step {best['step']}", "",
             "| model | " + " | ".join(f"nDCG@10 @{d}" for d in DIMS) + " | " + " | ".join(f"R@100 @{d}" for d in DIMS) + " |",
             "|---|" + "---:|" * (2 * len(DIMS))]  # fmt: skip
    for label, rows_ in results.items():
        lines.append(f"| {label} | " + " | ".join(f"{rows_[str(d)]['ndcg@10']:.4f}" for d in DIMS) + " | "
                     + " | ".join(f"{rows_[str(d)]['recall@100']:.4f}" for d in DIMS) + " |")  # fmt: skip
    lines += ["", "| step | dev nDCG@10 | @256 | @128 | @64 |", "|---:|---:|---:|---:|---:|"]
    for r in curve:
        lines.append(f"| {r['step']} | {r['dev_ndcg@10']:.4f} | " + " | ".join(
            f"{r[f'dev_ndcg@10_dim{d}']:.4f}" for d in DIMS[1:]) + " |")  # fmt: skip
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
