"""WiSE-FT on finished corpus-only runs: the exported model's weights moved back toward the base
model's, `base + f * (trained - base)` (`peg.model.export.interpolate_weights`, what
`train.finetune_fraction` does at export), for each fraction f in `--fractions`, scored on each
collection's dev set (where it has one) and test. The fraction is chosen on dev only: the highest
mean paired dev gain over base, averaged over the collections that have a dev set; test is
reported, never used. Runs are read only when their export stage record says complete.

    PYTHONPATH=. python bench/interpolation.py \\
        --run ../shared/data/scifact /tmp/peg-fixed/effectiveness/recipe/store scifact-corpus-laptop-seed0 \\
        --run bench/data/nfcorpus /tmp/peg-quality/effectiveness/nfcorpus/recipe/store nfcorpus-corpus-laptop-seed0 \\
        --fractions 0.5 0.7 1.0 --out bench/results/interpolation

Dev: the collection's `qrels/dev.tsv`, else `--dev-queries` seeded TRAIN queries (as
bench/recipe_variants.py), else none. Each scored model is kept under `--store`, each row as JSON
beside it, so a rerun scores only what is missing. Writes `--out`.json / .md after every row.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine, paired_difference  # noqa: E402
from bench.effectiveness import dev_set  # noqa: E402
from bench.recipe_variants import evaluate  # noqa: E402
from bench.scifact import MINILM  # noqa: E402
from peg.data import BeirDataset  # noqa: E402


def exported_model(run_store: Path, run: str) -> Path:
    """The run's exported model folder, after checking its export stage record is complete."""
    from peg.pipeline.state import read_record
    from peg.store import LocalStore

    record = read_record(LocalStore(run_store), f"{run}/export")
    if record is None or record.status != "complete":
        raise SystemExit(f"{run_store / run / 'export'}: the export stage is not complete")
    return run_store / run / "export" / "model"


def interpolated_folder(model: Path, base: dict, fraction: float, out: Path) -> Path:
    """A copy of the sentence-transformers folder `model` with its weights interpolated toward
    `base` (`peg.model.export.interpolate_weights`); `out` is replaced."""
    from safetensors.torch import load_file, save_file

    from peg.model.export import interpolate_weights

    trained = load_file(model / "model.safetensors")
    weights = interpolate_weights(trained, {k: base[k] for k in trained}, fraction)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(model, out, ignore=shutil.ignore_patterns("*.manifest.json"))
    save_file({k: v.contiguous() for k, v in weights.items()}, out / "model.safetensors", metadata={"format": "pt"})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", nargs=3, action="append", required=True, metavar=("COLLECTION", "RUN_STORE", "RUN"),
                        help="A finished run: its BEIR folder, its local store and its name (repeat).")
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.5, 0.7, 1.0])
    parser.add_argument("--dev-queries", type=int, default=809)
    parser.add_argument("--cpu-backend", default="torch_bf16", choices=["torch_fp32", "torch_bf16"])
    parser.add_argument("--store", type=Path, default=Path("/tmp/peg-interpolation"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/interpolation"))
    args = parser.parse_args()

    from peg.config import ModelConfig
    from peg.model.export import base_weights

    base = base_weights(ModelConfig(name_or_path=MINILM))  # what every run trained from
    rows: list[dict] = []
    splits: dict[str, dict[str, BeirDataset]] = {}
    for collection, run_store, run in args.run:
        collection = Path(collection).resolve()
        name = collection.name
        if name not in splits:
            dev = dev_set(collection, args.dev_queries)
            splits[name] = {"test": BeirDataset.load(collection, "test"), **({"dev": dev} if dev else {})}
            rows.append(score(args, collection, "base", MINILM, None, splits[name]))
        model = exported_model(Path(run_store), run)
        for fraction in args.fractions:
            folder = model if fraction == 1.0 else args.store / "models" / f"{run}-f{fraction}"
            if fraction != 1.0 and not (args.store / "rows" / f"{run}-f{fraction}.json").exists():
                interpolated_folder(model, base, fraction, folder)
            rows.append(score(args, collection, run, str(folder), fraction, splits[name]))
            write_outputs(args, rows)


def score(args: argparse.Namespace, collection: Path, run: str, model: str, fraction: float | None,
          splits: dict[str, BeirDataset]) -> dict:
    """One row: the model's nDCG@10 / R@100 and per-query nDCG@10 on each split (cached as JSON)."""
    label = f"{collection.name}-base" if fraction is None else f"{run}-f{fraction}"
    done = args.store / "rows" / f"{label}.json"
    if done.exists():
        return json.loads(done.read_text())
    row = {"collection": collection.name, "run": run, "fraction": fraction}
    for split, data in splits.items():
        result = evaluate(str(args.store / "encode"), model, collection, args.cpu_backend, data)
        row.update({f"{split}_{k}": v for k, v in result.items()})
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(row) + "\n")
    return row


def summary(rows: list[dict]) -> tuple[list[dict], float | None]:
    """Per (collection, fraction): mean +- sd over runs of test and dev nDCG@10 and of the paired gain
    over base; and the fraction chosen on dev (None without a dev set)."""
    base = {r["collection"]: r for r in rows if r["fraction"] is None}
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in rows:
        if r["fraction"] is not None:
            groups.setdefault((r["collection"], r["fraction"]), []).append(r)
    table = []
    for (collection, fraction), group in groups.items():
        entry = {"collection": collection, "fraction": fraction, "runs": len(group)}
        for split in ("dev", "test"):
            if f"{split}_ndcg@10" not in group[0]:
                continue
            values = [r[f"{split}_ndcg@10"] for r in group]
            gains = [paired_difference(r[f"{split}_per_query_ndcg@10"], base[collection][f"{split}_per_query_ndcg@10"])["mean"]
                     for r in group]
            entry[split] = {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                            "gain": statistics.fmean(gains), "min_gain": min(gains)}
        table.append(entry)
    by_fraction: dict[float, list[float]] = {}
    for e in table:
        if "dev" in e:
            by_fraction.setdefault(e["fraction"], []).append(e["dev"]["gain"])
    chosen = max(by_fraction, key=lambda f: statistics.fmean(by_fraction[f])) if by_fraction else None
    return table, chosen


def write_outputs(args: argparse.Namespace, rows: list[dict]) -> None:
    table, chosen = summary(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"fractions": args.fractions, "cpu_backend": args.cpu_backend, "chosen_on_dev": chosen, "machine": machine(),
         "summary": table, "rows": [{k: v for k, v in r.items() if "per_query" not in k} for r in rows]}, indent=1) + "\n")
    base = {r["collection"]: r for r in rows if r["fraction"] is None}

    def paired(r: dict, split: str) -> str:
        if f"{split}_ndcg@10" not in r:
            return "-"
        d = paired_difference(r[f"{split}_per_query_ndcg@10"], base[r["collection"]][f"{split}_per_query_ndcg@10"])
        return f"{r[f'{split}_ndcg@10']:.4f} ({d['mean']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}])"

    lines = ["# WiSE-FT: a corpus-only run's weights interpolated toward the base model's", "",
             f"`base + f * (trained - base)`; encoder path {args.cpu_backend}. Chosen on dev (highest mean paired dev "
             f"gain over the collections with a dev set): **f = {chosen}**. Test shown, not used to choose. "
             "`python bench/interpolation.py` (its docstring has the command).", "",
             "| collection | f | runs | dev nDCG@10 (mean +- sd) | dev gain (mean, worst run) "
             "| test nDCG@10 (mean +- sd) | test gain (mean, worst run) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for collection, b in base.items():
        cells = [f"{b[f'{s}_ndcg@10']:.4f}" if f"{s}_ndcg@10" in b else "-" for s in ("dev", "test")]
        lines.append(f"| {collection} | base | - | {cells[0]} | | {cells[1]} | |")
        for e in sorted((e for e in table if e["collection"] == collection), key=lambda e: e["fraction"]):
            cell = {s: (f"{e[s]['mean']:.4f} +- {e[s]['sd']:.4f}", f"{e[s]['gain']:+.4f}, {e[s]['min_gain']:+.4f}")
                    if s in e else ("-", "-") for s in ("dev", "test")}
            lines.append(f"| {collection} | {e['fraction']} | {e['runs']} | {cell['dev'][0]} | {cell['dev'][1]} | "
                         f"{cell['test'][0]} | {cell['test'][1]} |")
    lines += ["", "Per run (nDCG@10, paired gain over base with its 95% bootstrap interval):", "",
              "| run | f | dev | test | test R@100 |", "|---|---:|---|---|---:|"]
    for r in rows:
        if r["fraction"] is not None:
            lines.append(f"| {r['run']} | {r['fraction']} | {paired(r, 'dev')} | {paired(r, 'test')} | {r['test_recall@100']:.4f} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
