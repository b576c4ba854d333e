"""Training-stage variants of a corpus-only recipe, chosen on dev: each variant trains on the lists
a finished recipe run stored (its teacher-scored `score/train.jsonl`, taken only when the score
stage's record says complete and the file's sha256 matches it), with the recipe's run config and
the variant's overrides, then is scored on the dev set and, reported but never used to choose,
on test. The base model is scored the same way in the same run, so every row shares the encoder
path (`--cpu-backend`, bf16 by default: 2.3x fp32 on AMX CPUs). The recipe's own training is the
variant `recipe`; the others override one setting of it.

    PYTHONPATH=. python bench/recipe_variants.py --recipe examples/corpus-laptop.yaml \\
        --run-store /tmp/peg-quality/effectiveness/recipe/store --run scifact-corpus-laptop-seed0 \\
        --variants recipe tt0.1 infonce --out bench/results/recipe_variants

Dev: the collection's `qrels/dev.tsv`, else `--dev-queries` seeded TRAIN queries (bench/effectiveness.py's
`dev_set`; its first 100 are the bench's dev queries). Each variant is compared with base query by query
(mean difference, 95% paired bootstrap interval). Each variant's model and result are kept under `--store`, so a rerun
measures only what is missing. Writes `--out`.json / .md after every variant.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import merged, paired_difference  # noqa: E402
from bench.effectiveness import dev_set  # noqa: E402
from bench.scifact import MINILM, SCIFACT, bench_config, embed_split  # noqa: E402
from peg.config import RunConfig  # noqa: E402
from peg.data import BeirDataset  # noqa: E402
from peg.eval import evaluate_embeddings  # noqa: E402
from peg.eval.metrics import per_query_metrics  # noqa: E402

# Overrides of the recipe's own settings, each a candidate to choose on dev: "recipe" is the
# recipe's training unchanged (which the run's own eval measured as well).
VARIANTS: dict[str, dict] = {
    "recipe": {},
    "tt0.1": {"loss": {"listwise": {"teacher_temperature": 0.1}}},
    "tt0.03": {"loss": {"listwise": {"teacher_temperature": 0.03}}},
    "nce0": {"loss": {"listwise": {"nce_weight": 0.0}}},
    "nce1": {"loss": {"listwise": {"nce_weight": 1.0}}},
    "infonce": {"loss": {"kind": "infonce"}},
    "lr1e-5": {"train": {"learning_rate": 1.0e-5}},
    "lr5e-5": {"train": {"learning_rate": 5.0e-5}},
    "96steps": {"train": {"max_steps": 96}},
    "144steps": {"train": {"max_steps": 144}},
}


def verified_lists(run_store: Path, run: str) -> Path:
    """The run's teacher-scored lists, after checking its score stage record is complete and names
    this file (sha256), as `bench/effectiveness.py --synthetic-from` does."""
    from peg.pipeline.state import read_record
    from peg.store import LocalStore

    store, key = LocalStore(run_store), f"{run}/score/train.jsonl"
    record = read_record(store, f"{run}/score")
    if record is None or record.status != "complete" or store.verify(key).sha256 != record.outputs.get(key):
        raise SystemExit(f"{run_store / run / 'score'}: the score stage is not complete or train.jsonl is not the file its record names")
    return store.local_path(key)


def evaluate(store: str, model: str, collection: Path, backend: str, data: BeirDataset) -> dict:
    """nDCG@10 and R@100 of `model` on `data`, and each query's nDCG@10 (for paired comparisons)."""
    config = bench_config(store, model=model, beir=collection)
    config.model.cpu_backend = backend
    q_ids, q_emb, p_ids, p_emb = embed_split(config, data)
    result = evaluate_embeddings(q_ids, q_emb, p_ids, p_emb, data.qrels)
    per_query = {qid: row["ndcg@10"] for qid, row in per_query_metrics(data.qrels, result.run).items()}
    return {"ndcg@10": result.metrics["ndcg@10"], "recall@100": result.metrics["recall@100"], "per_query_ndcg@10": per_query}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, required=True)
    parser.add_argument("--run-store", type=Path, required=True, help="The finished recipe run's local store.")
    parser.add_argument("--run", required=True, help="The finished recipe run's name in that store.")
    parser.add_argument("--collection", type=Path, default=SCIFACT)
    parser.add_argument("--extra-lists", nargs=2, action="append", default=[], metavar=("RUN_STORE", "RUN"),
                        help="Another finished run whose lists are trained on after --run's (a mixed dataset, "
                             "data.sampling as the recipe says; repeat).")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dev-queries", type=int, default=100,
                        help="Seeded train queries as dev where the collection has no dev split (a corpus-only "
                             "recipe trains on none of them, so all may serve: SciFact has 809).")
    parser.add_argument("--cpu-backend", default="torch_bf16", choices=["torch_fp32", "torch_bf16"])
    parser.add_argument("--store", default="/tmp/peg-variants")
    parser.add_argument("--out", type=Path, default=Path("bench/results/recipe_variants"))
    args = parser.parse_args()

    from peg.train import train

    lists = verified_lists(args.run_store, args.run)
    extra = [verified_lists(Path(store), run) for store, run in args.extra_lists]
    recipe = yaml.safe_load(args.recipe.read_text())
    dev, test = dev_set(args.collection, args.dev_queries), BeirDataset.load(args.collection, "test")
    root = Path(args.store) / "variants" / "+".join([args.run, *(run for _, run in args.extra_lists)])
    root.mkdir(parents=True, exist_ok=True)
    splits = {"dev": dev, "test": test} if dev is not None else {"test": test}  # NQ-UTD has no dev split
    rows = []
    for name in ["base", *args.variants]:
        done = root / f"{name}-seed{args.seed}-dev{len(dev.queries) if dev is not None else 0}.json"
        if done.exists():
            rows.append(json.loads(done.read_text()))
            continue
        model, overrides, trained_s = MINILM, {}, 0.0
        if name != "base":
            overrides = VARIANTS[name]
            output = root / f"{name}-seed{args.seed}"
            trained = output / "train_s.json"  # written after the export, which replaces `model` whole
            if not trained.exists():
                raw = merged(recipe, merged(overrides, {"name": f"{args.run}-{name}".replace(".", "-"), "train": {"seed": args.seed}}))
                raw["data"] = {**{k: v for k, v in recipe["data"].items() if k in ("sampling", "dataset_weights")},
                               "beir": str(args.collection), "train_files": [str(p) for p in [lists, *extra]]}
                raw["store"] = {"uri": str(Path(args.store) / "store")}
                config = RunConfig.model_validate({k: v for k, v in raw.items() if k not in ("synth", "score", "mining")})
                started = time.monotonic()
                train(config, output, resume=(output / "checkpoints" / "latest").exists())
                trained.write_text(json.dumps(time.monotonic() - started))
            model, trained_s = str(output / "model"), json.loads(trained.read_text())
        row = {"variant": name, "seed": args.seed, "overrides": overrides, "train_s": round(trained_s),
               **{f"{split}_{k}": v for split, data in splits.items()
                  for k, v in evaluate(args.store, model, args.collection, args.cpu_backend, data).items()}}
        done.write_text(json.dumps(row) + "\n")
        rows.append(row)
        write_outputs(args, lists, rows)
    write_outputs(args, lists, rows)


def write_outputs(args: argparse.Namespace, lists: Path, rows: list[dict]) -> None:
    base = rows[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"recipe": str(args.recipe), "run": args.run, "lists": str(lists),
         "extra_lists": [run for _, run in args.extra_lists], "collection": args.collection.name,
         "cpu_backend": args.cpu_backend, "rows": rows}, indent=1) + "\n")
    dev_queries = len(base.get("dev_per_query_ndcg@10", {}))
    dev = f"{dev_queries} queries" if dev_queries else "none (the collection has no dev split or train queries)"
    runs = " + ".join([args.run, *(run for _, run in args.extra_lists)])
    lines = [f"# Recipe variants: {args.recipe.name}'s training on run {runs}'s lists ({args.collection.name})", "",
             f"Encoder path for every row: {args.cpu_backend}. Dev: {dev}; chosen on dev only, test shown, not used. "
             "*vs base*: the mean per-query nDCG@10 difference with its 95% paired bootstrap interval (queries "
             "resampled) and how many queries rose / fell.", "",
             "| variant | overrides | train s | dev nDCG@10 | dev vs base | test nDCG@10 | test vs base | test R@100 |",
             "|---|---|---:|---:|---|---:|---|---:|"]

    def versus(row: dict, split: str) -> str:
        if row is base or f"{split}_per_query_ndcg@10" not in row:
            return ""
        d = paired_difference(row[f"{split}_per_query_ndcg@10"], base[f"{split}_per_query_ndcg@10"])
        return f"{d['mean']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}] ({d['better']}/{d['worse']})"

    for r in rows:
        dev_ndcg = f"{r['dev_ndcg@10']:.4f}" if "dev_ndcg@10" in r else ""
        lines.append(f"| {r['variant']} | `{json.dumps(r['overrides'])}` | {r['train_s']} | {dev_ndcg} | "
                     f"{versus(r, 'dev')} | {r['test_ndcg@10']:.4f} | {versus(r, 'test')} | {r['test_recall@100']:.4f} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
