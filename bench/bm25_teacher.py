"""The bm25_biencoder teacher as a reranker of the base model's candidates, per collection, on dev.

A corpus-only run's teacher reorders the lists the student mined (its top `--depth`, the mine
stage's `top_k`). This measures, on each collection's dev queries (its own dev split, else a
seeded subset of its TRAIN queries; never test), nDCG@10 of the base MiniLM's order (the student)
and of peg's `CalibratedTeacher` with `score.teacher: bm25_biencoder` (BM25 with the corpus's
statistics, `peg.llm.lexical.BM25Scorer`, z-mixed per query with the model's cosine) at
biencoder_weight w in 0, 0.1, ..., 1 (w 0: BM25 alone; w 1: the student's own order). The weight
the recipes use is the one with the best mean dev nDCG@10 over the collections measured.

    PEG_SCIFACT=../shared/data/scifact .venv/bin/python bench/bm25_teacher.py \\
        --collections ../shared/data/scifact bench/data/nfcorpus [--dev-queries 100] [--depth 30]

Results: `<out>.json` and `<out>.md` (default bench/results/bm25_teacher).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from bench.effectiveness import dev_set
from bench.scifact import DEFAULT_STORE, ROOT, bench_config, embed_split, top_k
from peg.config import ScoreConfig
from peg.eval.metrics import compute_metrics
from peg.llm.lexical import BM25Scorer
from peg.llm.teacher import CalibratedTeacher

WEIGHTS = [round(0.1 * i, 1) for i in range(11)]


class Cosines:
    """The base model's cosines as the teacher's bi-encoder half: the encode cache's embeddings,
    looked up by text (the same vectors the student ranked by)."""

    def __init__(self, texts: dict[str, np.ndarray]):
        self.texts = texts

    def encode(self, texts, kind):
        return np.stack([self.texts[t] for t in texts])


def measure(collection: Path, args: argparse.Namespace) -> dict:
    dev = dev_set(collection, args.dev_queries)
    if dev is None:
        return {"collection": collection.name, "dev": None}
    config = bench_config(args.store, beir=collection)
    q_ids, q_emb, p_ids, p_emb = embed_split(config, dev)
    started = time.monotonic()
    bm25 = BM25Scorer(p.full_text for p in dev.corpus.values())
    index_seconds = time.monotonic() - started
    lists = dict(zip(q_ids, top_k(q_emb, p_emb, p_ids, args.depth), strict=True))
    vectors = {dev.queries[q]: v for q, v in zip(q_ids, q_emb, strict=True)}
    vectors.update({dev.corpus[p].full_text: v for p, v in zip(p_ids, p_emb, strict=True)})
    queries = [dev.queries[q] for q, cands in lists.items() for _ in cands]
    passages = [dev.corpus[p].full_text for cands in lists.values() for p, _ in cands]
    result = {"collection": collection.name, "dev": dev.split, "queries": len(lists), "depth": args.depth,
              "bm25_index_seconds": round(index_seconds, 2), "ndcg@10": {}}

    def ndcg(scores) -> float:
        run, offset = {}, 0
        for q, cands in lists.items():
            run[q] = {p: float(s) for (p, _), s in zip(cands, scores[offset : offset + len(cands)], strict=True)}
            offset += len(cands)
        return compute_metrics({q: dev.qrels[q] for q in run}, run)["ndcg@10"]

    result["ndcg@10"]["student"] = ndcg([s for cands in lists.values() for _, s in cands])
    for w in WEIGHTS:
        teacher = CalibratedTeacher(ScoreConfig(teacher="bm25_biencoder", biencoder_weight=w), None,
                                    scorer=bm25, encoder=Cosines(vectors))
        started = time.monotonic()
        scores = teacher.score(queries, passages)
        result.setdefault("pairs_per_second", {})[str(w)] = round(len(queries) / (time.monotonic() - started))
        result["ndcg@10"][f"w={w}"] = ndcg(scores)
    return result


def markdown(results: list[dict], chosen: float, args: argparse.Namespace) -> str:
    measured = [r for r in results if r["dev"]]
    lines = [
        "# The bm25_biencoder teacher on dev",
        "",
        f"Reranking the base MiniLM's top {args.depth} (the mine stage's candidates) of each collection's dev "
        f"queries; nDCG@10. w: score.biencoder_weight (0: BM25 alone, 1: the student's own order). "
        f"`{' '.join(['python bench/bm25_teacher.py --collections', *[str(c) for c in args.collections]])}`.",
        "",
        "| collection | dev | queries | student | " + " | ".join(f"w {w}" for w in WEIGHTS) + " |",
        "|---|---|---:|---:|" + "---:|" * len(WEIGHTS),
    ]
    for r in measured:
        cells = [f"{r['ndcg@10'][f'w={w}']:.4f}" for w in WEIGHTS]
        head = f"| {r['collection']} | {r['dev']} | {r['queries']} | {r['ndcg@10']['student']:.4f} | "
        lines.append(head + " | ".join(cells) + " |")
    for r in results:
        if not r["dev"]:
            lines.append(f"| {r['collection']} | none (no dev or train qrels: nothing chosen there) | | | " + " | " * len(WEIGHTS))
    speeds = "; ".join(f"{r['collection']} {r['pairs_per_second'][str(chosen)]:,} pairs/s (BM25 statistics of the "
                       f"corpus in {r['bm25_index_seconds']} s)" for r in measured)
    lines += ["", f"Chosen: **w = {chosen}**, the best mean dev nDCG@10 over {', '.join(r['collection'] for r in measured)}. "
              f"Teacher speed: {speeds} on this machine's CPU, cosines from the encode cache.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--collections", nargs="+", type=Path, required=True)
    parser.add_argument("--store", default=DEFAULT_STORE)
    parser.add_argument("--dev-queries", type=int, default=100, help="Where a collection has no dev split: TRAIN queries.")
    parser.add_argument("--depth", type=int, default=30)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "bm25_teacher"))
    args = parser.parse_args()
    results = [measure(c.resolve(), args) for c in args.collections]
    measured = [r for r in results if r["dev"]]
    chosen = max(WEIGHTS, key=lambda w: statistics.mean(r["ndcg@10"][f"w={w}"] for r in measured))
    Path(f"{args.out}.json").write_text(json.dumps({"results": results, "chosen_weight": chosen}, indent=2) + "\n")
    Path(f"{args.out}.md").write_text(markdown(results, chosen, args))
    print(Path(f"{args.out}.md").read_text())


if __name__ == "__main__":
    main()
