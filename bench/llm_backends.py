"""LLM stages' speed: the transformers backend (float32, bfloat16) vs CTranslate2 (float32 and
int8), same model, inputs and batch, in ONE run.

    PEG_SCIFACT=../shared/data/scifact nice -n 10 .venv/bin/python bench/llm_backends.py \\
        [--pairs 16 --passages 4 --batch 8 --new-tokens 24 --rounds 2]

Model: SmolLM2-135M-Instruct (the packaged GGUF, expanded to fp32; CTranslate2 converts that folder
once). Inputs: SciFact TRAIN queries, each with its relevant passage and one passage drawn at
random (so the scores' ordering can be checked: AUC of relevant over random), and the first
`--passages` corpus passages for generation. Scoring is `query_likelihood` (the offline teacher
and the round-trip filter's scorer); generation is greedy few-shot `question` writing
(peg.llm.synth.QueryWriter), `--new-tokens` at most. The backends take turns over `--rounds`
slices of the inputs, so a load change on a shared machine falls on all of them alike. Writes
bench/results/llm_backends.json / .md: pairs/s, queries/s, the ratio to transformers, the largest
score difference, rank agreement and greedy generations identical to transformers'.

With `--lists FILE` (a score stage's lists, e.g. `<run>/score/train.jsonl`: query, pos, neg) it
also scores the pairs a teacher scores there: `--list-passages` passages drawn at random and every
(query, passage) pair of the file that holds one of them, so each passage comes with as many
queries as it has in the whole file. There a passage's prompt is shared by its queries, which the
transformers backend reuses (peg/llm/backends.py, `shared_prefix_log_probs`); the rows are the
transformers path without that reuse (every pair a whole prompt, as before), with it, CTranslate2
int8, and transformers in bfloat16 (`llm.compute_type: bfloat16`: native bf16 matrix products
where the CPU has AMX or AVX512-BF16) without and with the reuse, in turns. Writes bench/results/llm_scoring_lists.json / .md.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Results  # noqa: E402

BACKENDS = {
    "transformers": {"backend": "transformers"},
    "transformers bf16": {"backend": "transformers", "compute_type": "bfloat16"},
    "ctranslate2 float32": {"backend": "ctranslate2", "compute_type": "float32"},
    "ctranslate2 int8": {"backend": "ctranslate2", "compute_type": "int8"},
}


def scifact_pairs(count: int, seed: int = 0) -> tuple[list[str], list[str], list[int]]:
    """`count` (query, passage, relevant?) triples: half relevant pairs from the train qrels, half
    the same queries with a random passage."""
    from scifact import SCIFACT

    from peg.data import BeirDataset

    data = BeirDataset.load(SCIFACT, "train")
    rng = random.Random(seed)
    qids = sorted(q for q in data.queries if data.qrels.get(q))
    rng.shuffle(qids)
    pids = sorted(data.corpus)
    queries, passages, labels = [], [], []
    for qid in qids[: count // 2]:
        relevant = sorted(data.qrels[qid])[0]
        other = rng.choice([p for p in pids if p not in data.qrels[qid]][:1000])
        for pid, label in ((relevant, 1), (other, 0)):
            queries.append(data.queries[qid])
            passages.append(data.corpus[pid].full_text)
            labels.append(label)
    return queries, passages, labels


def auc(scores: np.ndarray, labels: list[int]) -> float:
    """P(score of a relevant pair > score of a random pair), ties count half."""
    pos = scores[np.array(labels) == 1]
    neg = scores[np.array(labels) == 0]
    return float(((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean())


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--passages", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--lists", type=Path, default=None, help="A score stage's lists (JSONL: query, pos, neg).")
    parser.add_argument("--list-passages", type=int, default=12)
    parser.add_argument("--lists-only", action="store_true", help="Measure only the lists workload.")
    args = parser.parse_args()

    from peg.config import LLMConfig, SynthConfig
    from peg.llm.backends import load_lm
    from peg.llm.scorer import LLMScorer
    from peg.llm.synth import QueryWriter

    queries, passages, labels = scifact_pairs(args.pairs)
    sources = passages[::2][: args.passages]
    scorers, writers, load_s = {}, {}, {}
    for name, settings in BACKENDS.items():
        config = LLMConfig(mode="query_likelihood", batch_size=args.batch, **settings)
        start = time.perf_counter()
        lm, tokenizer = load_lm(config)
        load_s[name] = time.perf_counter() - start
        scorers[name] = LLMScorer(config, lm, tokenizer)
        synth = SynthConfig(llm=config, temperature=0.0, max_new_tokens=args.new_tokens, query_types=["question"])
        writers[name] = QueryWriter(synth, lm, tokenizer)

    if not args.lists_only:
        score_pairs_and_generate(args, queries, passages, labels, sources, scorers, writers, load_s)
    if args.lists:
        score_lists(args, scorers)


def score_pairs_and_generate(args, queries, passages, labels, sources, scorers, writers, load_s) -> None:
    """The pairs workload (each passage once) and few-shot generation, backends in turns."""
    import torch

    settings = {**vars(args), "model": "SmolLM2-135M-Instruct (GGUF Q4_1 -> fp32)", "threads": torch.get_num_threads(),
                "mode": "query_likelihood", "generation": "greedy, few-shot question"}  # fmt: skip
    results = Results("llm_backends", "LLM stages: transformers vs CTranslate2 (SmolLM2-135M, CPU)", settings,
                      ["backend", "rounds", "load_s", "score_pairs_per_s", "score_vs_transformers", "max_abs_diff",
                       "spearman_vs_transformers", "auc", "gen_queries_per_s", "gen_vs_transformers",
                       "gen_identical"])  # fmt: skip
    score_s = dict.fromkeys(BACKENDS, 0.0)
    gen_s = dict.fromkeys(BACKENDS, 0.0)
    scores = {name: np.empty(len(queries), dtype=np.float32) for name in BACKENDS}
    generated: dict[str, list[str]] = {name: [] for name in BACKENDS}
    pair_slices = np.array_split(np.arange(len(queries)), args.rounds)
    passage_slices = np.array_split(np.arange(len(sources)), args.rounds)
    ref = "transformers"
    for r in range(args.rounds):  # the backends take turns, slice by slice; the table is rewritten after each
        for name in BACKENDS:
            idx = pair_slices[r]
            start = time.perf_counter()
            scores[name][idx] = scorers[name].score([queries[i] for i in idx], [passages[i] for i in idx])
            score_s[name] += time.perf_counter() - start
            jobs = [(sources[i], "question") for i in passage_slices[r]]
            start = time.perf_counter()
            generated[name] += writers[name].write(jobs, seed=0)
            gen_s[name] += time.perf_counter() - start
        done = np.concatenate(pair_slices[: r + 1])
        n_pairs, n_sources = len(done), len(generated[ref])
        results.data["rows"] = [{
            "backend": name, "rounds": f"{r + 1}/{args.rounds}", "load_s": load_s[name],
            "score_pairs_per_s": n_pairs / score_s[name], "score_vs_transformers": score_s[ref] / score_s[name],
            "max_abs_diff": float(np.abs(scores[name][done] - scores[ref][done]).max()),
            "spearman_vs_transformers": spearman(scores[name][done], scores[ref][done]),
            "auc": auc(scores[name][done], [labels[i] for i in done]),
            "gen_queries_per_s": n_sources / gen_s[name], "gen_vs_transformers": gen_s[ref] / gen_s[name],
            "gen_identical": f"{sum(a == b for a, b in zip(generated[name], generated[ref]))}/{n_sources}",
        } for name in BACKENDS]  # fmt: skip
        results.write()
    results.note(f"first generations: {{{', '.join(f'{n!r}: {g[:2]!r}' for n, g in generated.items())}}}")
    results.note("load_s includes the one-time conversions (GGUF -> fp32 folder; fp32 folder -> CTranslate2) "
                 "when the cache was cold")  # fmt: skip


def list_pairs(path: Path, passages: int, seed: int = 0) -> list[tuple[str, str]]:
    """Every (query, passage) pair of the lists file whose passage is one of `passages` drawn at random."""
    import json

    pairs = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        pairs += [(row["query"], text) for text in row["pos"] + row.get("neg", [])]
    drawn = set(random.Random(seed).sample(sorted({p for _, p in pairs}), passages))
    return [(q, p) for q, p in pairs if p in drawn]


def score_lists(args: argparse.Namespace, scorers: dict) -> None:
    """The teacher's workload: lists whose passages recur across queries, scored in turns."""
    import copy

    from peg.llm.scorer import LLMScorer

    pairs = list_pairs(args.lists, args.list_passages)
    reference = scorers["transformers"]

    def whole_prompts(scorer: LLMScorer) -> LLMScorer:
        lm = copy.copy(scorer.lm)
        lm.reuses_prefix = False
        return LLMScorer(scorer.config, lm, scorer.tokenizer)

    bf16 = scorers["transformers bf16"]
    rows = {"transformers, whole prompts": whole_prompts(reference), "transformers, prefix reuse": reference,
            "ctranslate2 int8": scorers["ctranslate2 int8"], "transformers bf16, whole prompts": whole_prompts(bf16),
            "transformers bf16, prefix reuse": bf16}
    base = "transformers, whole prompts"
    results = Results("llm_scoring_lists", "Scoring a teacher's lists: passages shared by queries (SmolLM2-135M, CPU)",
                      {"lists": str(args.lists), "list_passages": args.list_passages, "pairs": len(pairs),
                       "distinct_passages": len({p for _, p in pairs}), "batch": args.batch, "rounds": args.rounds},
                      ["scorer", "rounds", "pairs_per_s", "vs_whole_prompts", "max_abs_diff", "spearman_vs_whole_prompts"])
    seconds = dict.fromkeys(rows, 0.0)
    scores = {name: np.empty(len(pairs), dtype=np.float32) for name in rows}
    by_passage: dict[str, list[int]] = {}
    for i, (_, passage) in enumerate(pairs):
        by_passage.setdefault(passage, []).append(i)
    groups = list(by_passage.values())
    done: list[int] = []
    for r, part in enumerate(np.array_split(np.arange(len(groups)), args.rounds)):
        idx = [i for g in part for i in groups[g]]  # a round holds whole passages, so reuse is kept
        for name, scorer in rows.items():
            start = time.perf_counter()
            scores[name][idx] = scorer.score([pairs[i][0] for i in idx], [pairs[i][1] for i in idx])
            seconds[name] += time.perf_counter() - start
        done += idx
        results.data["rows"] = [{
            "scorer": name, "rounds": f"{r + 1}/{args.rounds}", "pairs_per_s": len(done) / seconds[name],
            "vs_whole_prompts": seconds[base] / seconds[name],
            "max_abs_diff": float(np.abs(scores[name][done] - scores[base][done]).max()),
            "spearman_vs_whole_prompts": spearman(scores[name][done], scores[base][done]),
        } for name in rows]  # fmt: skip
        results.write()


if __name__ == "__main__":
    main()
