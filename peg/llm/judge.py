"""LLM false-negative judge: drop mined negatives the LLM finds relevant to their query (docs/methods.md §6).

Every negative is scored with the query by the LLM scorer (`judge.llm`), as are the query's
positives. A negative is judged a false negative, and dropped, when its score passes the threshold:
- absolute (`judge.relative: false`): score >= `judge.threshold`;
- relative (`judge.relative: true`): score >= (lowest positive score of the query) + `judge.threshold`,
  which works on any score scale (probabilities in yes_no mode, mean log-probs in query_likelihood).
Every judgment is recorded with its score; the report gives the drop rate.

Artifacts (keys under `<run name>/judge/`): `shard-NNNNN.{judgments.jsonl,stats.json,jsonl}` per
shard, then `train.jsonl` (the examples, false negatives removed), `judgments.jsonl` and
`report.json`.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np

from peg.config import JudgeConfig, RunConfig
from peg.data import DataError, TrainingExample, iter_examples
from peg.llm.loading import check_model_source
from peg.store.scope import StageScope
from peg.runtime.sharded import ShardedStage, StageReport, run_sharded
from peg.store import ArtifactStore

ScoreFn = Callable[[Sequence[str], Sequence[str]], np.ndarray]
PARTS = ("judgments.jsonl", "stats.json", "jsonl")


def is_false_negative(score: float, min_positive_score: float, threshold: float, relative: bool) -> bool:
    """The judge's rule: does a negative with `score` pass the threshold?"""
    bar = min_positive_score + threshold if relative else threshold
    return score >= bar


@dataclass
class JudgeResult:
    examples: list[TrainingExample]
    judgments: list[dict]
    stats: dict


def judge_examples(examples: Sequence[TrainingExample], score: ScoreFn, config: JudgeConfig) -> JudgeResult:
    """Score every positive and negative with its query in one batched call; drop false negatives."""
    queries, passages = [], []
    for ex in examples:
        for text in (*ex.pos, *ex.neg):
            queries.append(ex.query)
            passages.append(text)
    scores = np.asarray(score(queries, passages), dtype=np.float64)
    kept_examples, judgments = [], []
    offset = 0
    dropped = 0
    for ex in examples:
        pos_scores = scores[offset : offset + len(ex.pos)]
        neg_scores = scores[offset + len(ex.pos) : offset + len(ex.pos) + len(ex.neg)]
        offset += len(ex.pos) + len(ex.neg)
        min_pos = float(pos_scores.min())
        keep = []
        for j, s in enumerate(neg_scores.tolist()):
            false_negative = is_false_negative(s, min_pos, config.threshold, config.relative)
            judgments.append({
                "query_id": ex.query_id,
                "query": ex.query,
                "neg_index": j,
                "neg_id": ex.neg_ids[j] if ex.neg_ids else None,
                "score": s,
                "min_positive_score": min_pos,
                "dropped": false_negative,
            })
            if false_negative:
                dropped += 1
            else:
                keep.append(j)
        kept_examples.append(replace(
            ex,
            neg=[ex.neg[j] for j in keep],
            neg_ids=[ex.neg_ids[j] for j in keep] if ex.neg_ids is not None else None,
            neg_scores=[ex.neg_scores[j] for j in keep] if ex.neg_scores is not None else None,
        ))
    stats = {"examples": len(examples), "negatives": len(judgments), "dropped": dropped}
    return JudgeResult(kept_examples, judgments, stats)


class JudgeProcessor:
    """Shard processor for Ray actors: loads the LLM scorer once, judges shards of examples."""

    def __init__(self, judge: dict):
        from peg.llm.scorer import LLMScorer

        self.config = JudgeConfig(**judge)
        self.scorer = LLMScorer(self.config.llm)

    def __call__(self, shard: int, examples: list[TrainingExample]) -> dict[str, str]:
        result = judge_examples(examples, self.scorer.score, self.config)
        return {
            "judgments.jsonl": "".join(json.dumps(j, ensure_ascii=False) + "\n" for j in result.judgments),
            "stats.json": json.dumps(result.stats),
            "jsonl": "".join(ex.to_json() + "\n" for ex in result.examples),
        }


def judge_headline(s: dict) -> list[str]:
    return [f"judged {s['negatives']:,} negatives of {s['examples']:,} queries ({s['mode']}): dropped "
            f"{s['dropped']:,} (drop rate {s['drop_rate']:.1%}); shards: {s['shards_computed']} computed, "
            f"{s['shards_reused']} reused"]


def load_input_examples(store: ArtifactStore, key: str, tmp: Path) -> list[TrainingExample]:
    if not store.exists(key):
        raise DataError(key, None, "input artifact not found in the store (run the stage that writes it first)")
    return list(iter_examples(store.materialise(key, tmp)))


def run_judge(config: RunConfig, scope: StageScope, show_progress: bool = True) -> StageReport:
    """The `judge` stage: judge the negatives of the mine stage's training file on Ray."""
    check_model_source(config.judge.llm)  # a bad path fails here, not once per Ray actor
    input_key = scope.key_of("mine", "train.jsonl")
    with tempfile.TemporaryDirectory(prefix="peg-judge-") as tmp:
        examples = load_input_examples(scope.store, input_key, Path(tmp))
    declaration = ShardedStage(PARTS, partial(JudgeProcessor, config.judge.model_dump(mode="json")),
                               pool=config.judge.llm, shard_size=config.judge.llm.shard_size, unit="queries")
    shards = run_sharded(scope, declaration, examples, show_progress)
    stats = {"examples": 0, "negatives": 0, "dropped": 0, **shards.summed()}
    stats.update({
        "drop_rate": stats["dropped"] / stats["negatives"] if stats["negatives"] else 0.0,
        "mode": config.judge.llm.mode,
        "threshold": config.judge.threshold,
        "relative": config.judge.relative,
        "input": input_key,
        **shards.counts(),
    })
    outputs = {"judgments.jsonl": shards.joined("judgments.jsonl"), "report.json": stats, "train.jsonl": shards.joined("jsonl")}
    return StageReport(stats, shards.put(outputs), judge_headline)
