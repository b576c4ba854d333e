"""Teacher quality: the offline teachers as rerankers of the base model's top 20 on SciFact.

A teacher that ranks worse than the student cannot teach it. For a seeded subset of SciFact
TEST queries, the base MiniLM retrieves the top `--depth` passages; each teacher reorders them
and nDCG@10 is computed on the same queries before (bi-encoder order) and after:
- `llm`: LLM query likelihood (`peg.llm.scorer`; `--llm`, default SmolLM2-135M-Instruct, the score
  stage's offline default; e.g. `--llm google/gemma-3-270m`, or a model folder or .gguf file);
- `llm_biencoder`: (1 - w) z(LLM) + w z(cosine), z per query (`peg.llm.teacher.CalibratedTeacher`),
  with w chosen on a dev split of SciFact TRAIN queries (never on test).
LLM scores are appended to `<store>/teacher_quality/llm_scores-<llm>-<max chars>.jsonl` as they
are computed (one file per LLM), so an interrupted run resumes. Results: `<out>.json` and `<out>.md`,
with the LLM's pairs/s over the pairs this run scored.

    PEG_SCIFACT=../shared/data/scifact nice -n 19 .venv/bin/python bench/teacher_quality.py \\
        [--llm HuggingFaceTB/SmolLM2-135M-Instruct] [--test-queries 100] [--dev-queries 50] [--depth 20] \\
        [--store /tmp/peg-quality] [--out bench/results/teacher_quality]
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import time
from pathlib import Path

import numpy as np

from bench.scifact import DEFAULT_STORE, ROOT, SCIFACT, bench_config, dev_split, embed_split, seeded_subset, top_k
from peg.config import LLMConfig, ScoreConfig
from peg.data import BeirDataset
from peg.eval.metrics import compute_metrics
from peg.llm.teacher import zscore_by_query

WEIGHTS = [round(0.1 * i, 1) for i in range(11)]


def ndcg10(qrels: dict, rankings: dict[str, dict[str, float]]) -> float:
    return compute_metrics({q: qrels[q] for q in rankings}, rankings)["ndcg@10"]


def candidates_for(config, data: BeirDataset, ids: list[str], depth: int) -> dict[str, list[tuple[str, float]]]:
    q_ids, q_emb, p_ids, p_emb = embed_split(config, data)
    rows = {q: i for i, q in enumerate(q_ids)}
    lists = top_k(q_emb[[rows[q] for q in ids]], p_emb, p_ids, depth)
    return dict(zip(ids, lists, strict=True))


def llm_config_for(llm: str, base: LLMConfig) -> LLMConfig:
    """`base` with the model `llm` names: a packaged id or model folder (llm.path), or a .gguf file."""
    if llm.endswith(".gguf"):
        return base.model_copy(update={"path": str(Path(llm).parent), "gguf_file": Path(llm).name})
    return base.model_copy(update={"path": llm, "gguf_file": None})


def cache_name(llm: str, max_passage_chars: int) -> str:
    """The score cache's file name for one LLM (the name made file-safe) and passage cut."""
    return f"llm_scores-{re.sub(r'[^A-Za-z0-9._-]+', '_', llm).strip('_')}-{max_passage_chars}.jsonl"


def llm_scores(scorer_config: LLMConfig, cache: Path, todo: dict[str, tuple[str, list[str]]], corpus, timing: dict) -> dict:
    """{(qid, pid): score}, reading the cache and scoring (and appending) what it lacks; `timing`
    gets the pairs scored, their seconds (model loading excluded) and the load seconds."""
    scores: dict[tuple[str, str], float] = {}
    if cache.exists():
        for line in cache.read_text().splitlines():
            r = json.loads(line)
            scores[r["qid"], r["pid"]] = r["score"]
    missing = {q: (text, [p for p in pids if (q, p) not in scores]) for q, (text, pids) in todo.items()}
    missing = {q: v for q, v in missing.items() if v[1]}
    if not missing:
        return scores
    from peg.llm.scorer import LLMScorer

    loading = time.monotonic()
    scorer = LLMScorer(scorer_config)
    timing["load_seconds"] = round(time.monotonic() - loading, 1)
    cache.parent.mkdir(parents=True, exist_ok=True)
    started, done = time.monotonic(), 0
    total = sum(len(p) for _, p in missing.values())
    with cache.open("a") as f:
        for qid, (text, pids) in missing.items():
            values = scorer.score([text] * len(pids), [corpus[p].full_text for p in pids])
            for pid, value in zip(pids, values.tolist(), strict=True):
                scores[qid, pid] = value
                f.write(json.dumps({"qid": qid, "pid": pid, "score": value}) + "\n")
            f.flush()
            done += len(pids)
            rate = done / (time.monotonic() - started)
            print(f"LLM scored {done}/{total} pairs, {rate:.2f} pairs/s, ETA {(total - done) / rate / 60:.1f} min", flush=True)
    timing.update(pairs=done, seconds=round(time.monotonic() - started, 1), pairs_per_second=round(rate, 3))
    return scores


def reranked(cands: dict, llm: dict, weight: float | None) -> dict[str, dict[str, float]]:
    """Rankings: weight None = base cosine order; else (1 - w) z(LLM) + w z(cosine) per query."""
    out = {}
    for qid, items in cands.items():
        pids = [p for p, _ in items]
        cosine = np.array([s for _, s in items])
        if weight is None:
            out[qid] = dict(zip(pids, cosine.tolist(), strict=True))
            continue
        llm_values = np.array([llm[qid, p] for p in pids])
        same = [qid] * len(pids)
        mixed = (1 - weight) * zscore_by_query(same, llm_values) + weight * zscore_by_query(same, cosine)
        out[qid] = dict(zip(pids, mixed.tolist(), strict=True))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=DEFAULT_STORE)
    parser.add_argument("--llm", default=ScoreConfig().llm.path,
                        help="The teacher LLM: a packaged id (peg.llm.loading.PACKAGED_LLMS), a model folder or a .gguf file.")
    parser.add_argument("--test-queries", type=int, default=100, help="Seeded subset of the 300 test queries.")
    parser.add_argument("--dev-queries", type=int, default=50, help="Seeded subset of the train queries (dev).")
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-passage-chars", type=int, default=LLMConfig().max_passage_chars)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "teacher_quality"))
    args = parser.parse_args()

    import torch

    torch.set_num_threads(2)
    config = bench_config(args.store)
    llm_config = llm_config_for(
        args.llm, ScoreConfig().llm.model_copy(update={"mode": "query_likelihood", "max_passage_chars": args.max_passage_chars})
    )
    splits = {"dev": BeirDataset.load(SCIFACT, "train"), "test": BeirDataset.load(SCIFACT, "test")}
    ids = {"dev": dev_split(splits["dev"], args.dev_queries, args.seed),
           "test": seeded_subset(list(splits["test"].queries), args.test_queries, args.seed)}
    cands = {name: candidates_for(config, splits[name], ids[name], args.depth) for name in splits}
    cache = Path(args.store) / "teacher_quality" / cache_name(args.llm, args.max_passage_chars)
    # dev and test queries interleaved: an interrupted run has scored a prefix of both subsets
    order = [(name, q) for pair in itertools.zip_longest(ids["dev"], ids["test"]) for name, q in zip(("dev", "test"), pair) if q]
    todo = {f"{name}:{q}": (splits[name].queries[q], [p for p, _ in cands[name][q]]) for name, q in order}
    started = time.monotonic()
    timing: dict = {}
    flat = llm_scores(llm_config, cache, todo, splits["test"].corpus, timing)
    llm = {name: {(q, p): flat[f"{name}:{q}", p] for q in ids[name] for p, _ in cands[name][q]} for name in splits}

    curves = {name: {w: ndcg10(splits[name].qrels, reranked(cands[name], llm[name], w)) for w in WEIGHTS} for name in splits}
    best_w = max(WEIGHTS, key=lambda w: (curves["dev"][w], w))
    result = {
        "queries": {name: len(ids[name]) for name in splits},
        "seed": args.seed,
        "depth": args.depth,
        "max_passage_chars": args.max_passage_chars,
        "teacher_llm": f"{args.llm} ({llm_config.mode})",
        "llm_backend": llm_config.backend,
        "llm_batch_size": llm_config.batch_size,
        "student": config.model.name_or_path,
        "ndcg@10": {
            name: {
                "base (bi-encoder order)": ndcg10(splits[name].qrels, reranked(cands[name], llm[name], None)),
                "llm": curves[name][0.0],
                f"llm_biencoder (w={best_w}, chosen on dev)": curves[name][best_w],
            }
            for name in splits
        },
        "biencoder_weight_chosen_on_dev": best_w,
        "ndcg@10_by_weight": {name: {str(w): v for w, v in curves[name].items()} for name in splits},
        "llm_seconds_this_run": round(time.monotonic() - started, 1),
        # pairs this run scored (none when all came from the cache), model loading excluded
        "llm_scoring_this_run": timing,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    q = result["queries"]
    lines = [
        f"# Teacher quality: reranking the base model's top {result['depth']} on SciFact",
        "",
        f"Seeded subsets (seed {result['seed']}): {q['test']} TEST queries, {q['dev']} dev queries carved from TRAIN. "
        f"LLM: {result['teacher_llm']}, passages cut to {result['max_passage_chars']} characters. "
        f"The bi-encoder weight w = {result['biencoder_weight_chosen_on_dev']} was chosen on dev; test never chose anything.",
        "",
        *([f"Scoring speed: {t['pairs_per_second']:.2f} pairs/s ({t['pairs']} pairs in {t['seconds']:.0f} s, "
           f"{result.get('llm_backend', 'transformers')} backend, batch {result.get('llm_batch_size')}, 2 CPU threads; "
           f"model load {t['load_seconds']:.0f} s).", ""]
          if (t := result.get("llm_scoring_this_run")) and t.get("pairs") else []),
        "| teacher | nDCG@10 dev | nDCG@10 test |",
        "|---|---:|---:|",
    ]
    for name in result["ndcg@10"]["test"]:
        lines.append(f"| {name} | {result['ndcg@10']['dev'][name]:.4f} | {result['ndcg@10']['test'][name]:.4f} |")
    lines += ["", "nDCG@10 by bi-encoder weight w (0 = LLM alone, 1 = bi-encoder order):", "",
              "| w | " + " | ".join(result["ndcg@10_by_weight"]["dev"]) + " |",
              "|---|" + "---:|" * len(result["ndcg@10_by_weight"]["dev"])]
    for name in ("dev", "test"):
        lines.append(f"| {name} | " + " | ".join(f"{v:.4f}" for v in result["ndcg@10_by_weight"][name].values()) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
