"""Mixed datasets on SciFact: the human train pairs alone vs mixed with generation-free pseudo-queries.

Two `peg train` runs of the quickstart's settings (packaged all-MiniLM-L6-v2, progressive InfoNCE,
32 queries x (1 + 1) a step, GradCache chunk 16, 2 ranks ZeRO-2, lr 2e-5), the same seed, the
same number of optimizer steps and the same dev set (`data.dev_queries` train queries held out by
`train.seed`, scored every `train.eval_every` steps; the best checkpoint by dev nDCG@10 is exported):

- human: the SciFact train queries' pairs (`bench/train_selection.py`'s mining: the base model's
  first non-positive passage in its top 30 scoring below 0.95 x the positive);
- mixed: the same file plus a second dataset made by `peg synth` with a generation-free query type
  (`synth.query_types [inverse_cloze]` by default: one sentence of a passage is the query, the
  rest of the passage the positive; no LLM; round-trip filtered by the base model, no teacher) over
  the first `--passages` corpus passages, each kept query given one hard negative the same way (the
  source passage is its positive). The two files share the batches by `data.sampling`; every batch
  comes from one of them (peg's one-dataset-per-batch rule).

The step count is one epoch of the mixed data (both runs may repeat data: `train.epochs` 3, capped
by `train.max_steps`), so the mixed run sees every human pair once and the human run sees its pairs
about (human + synthetic) / human times. Outputs `bench/results/train_mixed.{json,md}`, rewritten as
each run finishes: steps, training pairs per dataset, the dev curve's best step, SciFact test
nDCG@10 / Recall@100 of the dev-selected model, the dev curve, wall time, load. (The last model's
test figure is not computed: each costs a corpus encode, and `bench/train_selection.py` measures
selected vs last.)

    PEG_SCIFACT=../shared/data/scifact nice -n 10 python bench/train_mixed.py \\
        [--sampling proportional] [--seeds 42] [--passages 350] [--query-type inverse_cloze]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import Results
from bench.scifact import MINILM, ROOT, RUN_NAME, SCIFACT, bench_config, embed_split
from bench.train_selection import embed, hard_negative, mine_pairs
from peg.config import ModelConfig
from peg.data import BeirDataset, iter_examples
from peg.eval import evaluate_embeddings
from peg.eval.retrieval import search
from peg.model.encoder import Encoder
from peg.store import artifact_key, open_store
from peg.train.metrics import read_metrics

QUERIES_PER_STEP = 32
COLUMNS = ["arm", "sampling", "seed", "steps", "pairs (human + synthetic)", "best dev step", "best dev nDCG@10",
           "test nDCG@10", "test R@100", "dev nDCG@10 by step", "train wall s",
           "load 1 min (start, end)"]  # fmt: skip


def synth_pairs(config_path: Path, store_uri: str, passages: dict, pids: list[str], p, path: Path) -> tuple[int, dict]:
    """Run `peg synth` on `config_path`, give each kept pseudo-query one hard negative from the base
    model's corpus embeddings `p` (its source passage is the positive to avoid), write the pairs to
    `path`; returns (rows written, the synth report)."""
    proc = subprocess.run([sys.executable, "-m", "peg", "synth", str(config_path)], cwd=ROOT)
    if proc.returncode:
        sys.exit(f"peg synth failed ({proc.returncode})")
    store = open_store(bench_config(store_uri).store)
    report = store.read_json(artifact_key(RUN_NAME, "synth", "report.json"))
    (path.parent / "synth").mkdir(exist_ok=True)
    examples = list(iter_examples(store.materialise(artifact_key(RUN_NAME, "synth", "train.jsonl"), path.parent / "synth")))
    q = Encoder(ModelConfig(name_or_path=MINILM)).encode([ex.query for ex in examples], "query", 32)
    scores, rows_ = search(q, p, 30)
    rows = 0
    with path.open("w") as f:
        for ex, sc, idx in zip(examples, scores, rows_):
            neg = hard_negative(sc, idx, pids, list(ex.pos_ids))
            if neg is None:
                continue
            f.write(json.dumps({"query": ex.query, "pos": ex.pos, "neg": [passages[neg].full_text]}) + "\n")
            rows += 1
    return rows, report


def train(work: Path, files: list[Path], sampling: str, seed: int, steps: int, eval_every: int) -> tuple[Path, dict]:
    """One `peg train` run; returns (its output folder, its config)."""
    config = {
        "name": "train-mixed",
        "data": {"beir": str(SCIFACT), "train_files": [str(f) for f in files], "dev_queries": 100, "sampling": sampling},
        "model": {"name_or_path": MINILM, "query_max_length": 64, "passage_max_length": 256},
        "loss": {"kind": "infonce", "temperature": 0.05, "progressive": {"enabled": True}},
        "batch": {"queries_per_step": QUERIES_PER_STEP, "hard_negatives": 1, "chunk_size": 16},
        "train": {"epochs": 3, "max_steps": steps, "learning_rate": 2e-5, "warmup_ratio": 0.1, "nproc_per_node": 2,
                  "zero_stage": 2, "seed": seed, "eval_every": eval_every, "select_metric": "ndcg@10"},
        "encode": {"batch_size": 32},
    }  # fmt: skip
    work.mkdir(parents=True, exist_ok=True)
    config_path = work / "config.json"
    config_path.write_text(json.dumps(config))
    out_dir = work / "out"
    proc = subprocess.run([sys.executable, "-m", "peg", "train", str(config_path), "--output", str(out_dir)], cwd=ROOT)
    if proc.returncode:
        sys.exit(f"peg train failed ({proc.returncode})")
    return out_dir, config


def test_metrics(folder: Path, test: BeirDataset) -> dict[str, float]:
    qids, q, pids, p = embed(Encoder(ModelConfig(name_or_path=str(folder))), test)
    return evaluate_embeddings(qids, q, pids, p, test.qrels, (10, 100)).metrics


def figures(prefix: str, metrics: dict[str, float]) -> dict:
    """Row cells `<prefix> nDCG@10` (and R@100) to 4 decimals for the table, the exact values under
    `<prefix> ndcg@10` / `recall@100` for the JSON."""
    names = {"ndcg@10": "nDCG@10", "recall@100": "R@100"}
    return {f"{prefix} {k}": metrics[k] for k in names if k in metrics} | {
        f"{prefix} {label}": f"{metrics[k]:.4f}" for k, label in names.items() if k in metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sampling", default="proportional", choices=["proportional", "round_robin"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--passages", type=int, default=350, help="corpus passages peg synth cuts pseudo-queries from")
    parser.add_argument("--query-type", default="inverse_cloze", choices=["inverse_cloze", "span_crop", "passage_title"])
    parser.add_argument("--arms", nargs="+", default=["human", "mixed"], choices=["human", "mixed"])
    parser.add_argument("--evals", type=int, default=2, help="dev evaluations per run (the last at the end)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/peg-train-mixed"))
    parser.add_argument("--name", default="train_mixed", help="bench/results/<name>.{json,md}")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    store_uri = str(args.work / "store")
    train_set, test = BeirDataset.load(SCIFACT, "train"), BeirDataset.load(SCIFACT, "test")

    t0 = time.perf_counter()
    base = bench_config(store_uri)
    tqids, tq, pids, p = embed_split(base, train_set)  # peg's encode cache: peg synth reuses the corpus's
    human = args.work / "human.jsonl"
    human_rows = mine_pairs(train_set, tqids, tq, pids, p, human)
    synth_config = base.model_dump(mode="json")
    synth_config["synth"] = {"enabled": True, "query_types": [args.query_type], "num_passages": args.passages,
                             "filter_teacher": False, "gate_fraction": 0.0, "filter_top_k": 20}  # fmt: skip
    config_path = args.work / "synth.json"
    config_path.write_text(json.dumps(synth_config))
    synthetic = args.work / "synthetic.jsonl"
    synth_rows, report = synth_pairs(config_path, store_uri, train_set.corpus, pids, p, synthetic)
    prep_s = time.perf_counter() - t0
    held_out = min(100, human_rows)  # data.dev_queries: those train queries' pairs are not trained on
    steps = (human_rows - held_out) // QUERIES_PER_STEP + synth_rows // QUERIES_PER_STEP
    eval_every = -(-steps // args.evals)  # the last evaluation is the end's
    print(f"{human_rows} human pairs, {synth_rows} synthetic ({report['by_type']}); {steps} steps; {prep_s:.0f} s",
          flush=True)  # fmt: skip

    settings = {"quickstart": "MiniLM, progressive InfoNCE, 32 x (1 + 1), GradCache 16, 2 ranks ZeRO-2, lr 2e-5",
                "steps": steps, "eval_every": eval_every, "dev_queries": 100, "query_type": args.query_type,
                "passages": args.passages, "synth_report": report, "human_pairs": human_rows,
                "synthetic_pairs": synth_rows, "prep_s": round(prep_s)}  # fmt: skip
    results = Results(args.name, "Mixed datasets on SciFact: human pairs alone vs + pseudo-queries", settings, COLUMNS)
    base_test = evaluate_embeddings(*embed_split(base, test), test.qrels, (10, 100)).metrics
    results.add({"arm": "base model (no training)", **figures("test", base_test)})
    for seed in args.seeds:
        for arm in args.arms:
            files = [human] if arm == "human" else [human, synthetic]
            load_start = os.getloadavg()[0]
            t0 = time.perf_counter()
            out_dir, _ = train(args.work / f"{arm}-{args.sampling}-{seed}", files, args.sampling, seed, steps, eval_every)
            wall = time.perf_counter() - t0
            load_end = os.getloadavg()[0]
            best = json.loads((out_dir / "best.json").read_text())
            metrics = read_metrics(out_dir / "metrics.jsonl")
            curve = {r["step"]: round(r["dev_ndcg@10"], 4) for r in metrics if "dev_ndcg@10" in r}
            selected = test_metrics(out_dir / "model", test)
            results.add({"arm": arm, "sampling": args.sampling if arm == "mixed" else "-", "seed": seed,
                         "steps": max(r["step"] for r in metrics), "pairs (human + synthetic)": f"{human_rows - held_out} + "
                         f"{synth_rows if arm == 'mixed' else 0}", "best dev step": best["step"],
                         **figures("best dev", {"ndcg@10": best["value"]}), **figures("test", selected), "dev nDCG@10 by step": curve,
                         "train wall s": round(wall), "load 1 min (start, end)": f"{load_start:.1f}, {load_end:.1f}"})  # fmt: skip
    print((ROOT / "bench" / "results" / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
