"""Teacher scoring of candidate lists for listwise distillation (docs/methods.md §6).

The teacher is a cross-encoder from a local folder (any AutoModelForSequenceClassification:
ms-marco-MiniLM, bge-reranker...; the production choice), the LLM scorer (`score.llm`, either
mode; the offline default), `llm_biencoder`, the LLM's and the run's bi-encoder's scores
z-normalised per query and mixed with `score.biencoder_weight` (`CalibratedTeacher`), or
`bm25_biencoder`, the same mix with BM25 over the corpus's statistics in place of the LLM
(`peg.llm.lexical.BM25Scorer`; no model to run). Each
query's list is its positives followed by its negatives, cut to `score.list_size` candidates;
the scores go into the training JSONL as `pos_scores`/`neg_scores`.

Artifacts (keys under `<run name>/score/`): `shard-NNNNN.{stats.json,jsonl}` per shard, then
`train.jsonl` and `report.json`.
"""

from __future__ import annotations

import itertools
import json
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

from peg.config import DataConfig, ModelConfig, RunConfig, ScoreConfig
from peg.data import TrainingExample, iter_corpus
from peg.llm.judge import load_input_examples
from peg.llm.loading import LLMError, check_model_source
from peg.model import clip_text
from peg.store.scope import StageScope
from peg.runtime.sharded import ShardedStage, StageReport, run_sharded
from peg.progress import progress_bar

ScoreFn = Callable[[Sequence[str], Sequence[str]], np.ndarray]
PASSAGE_VECTORS_KEPT = 200_000  # a calibrated teacher's passage vectors kept between calls (~300 MB at 384-d)
PARTS = ("stats.json", "jsonl")


class CrossEncoderTeacher:
    """A sequence-classification model scoring (query, passage) pairs: one logit, or the
    log-odds logit[1] - logit[0] of a two-label model."""

    def __init__(self, path: str, batch_size: int = 16, max_length: int = 512, model=None, tokenizer=None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if model is None and not (Path(path) / "config.json").is_file():
            raise LLMError(f"score.cross_encoder_path: {path} is not a transformers model directory (no config.json)")
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(path)
        self.model = (model or AutoModelForSequenceClassification.from_pretrained(path)).eval()
        if model is None and torch.cuda.is_available():
            self.model.to("cuda")
        if self.model.config.num_labels not in (1, 2):
            raise LLMError(
                f"score.cross_encoder_path: {path} has {self.model.config.num_labels} labels; a reranker has 1 (or 2)"
            )
        self.batch_size = batch_size
        self.max_length = max_length

    @torch.no_grad()
    def score(self, queries: Sequence[str], passages: Sequence[str], show_progress: bool = False) -> np.ndarray:
        out = np.empty(len(queries), dtype=np.float32)
        device = next(self.model.parameters()).device
        with progress_bar(len(queries), "cross-encoder", enabled=show_progress, unit="pairs") as advance:
            for start in range(0, len(queries), self.batch_size):
                stop = start + self.batch_size
                batch = self.tokenizer(
                    [clip_text(q, self.max_length) for q in queries[start:stop]],
                    [clip_text(p, self.max_length) for p in passages[start:stop]], padding=True, truncation="only_second",
                    max_length=self.max_length, return_tensors="pt",
                )
                logits = self.model(**{k: v.to(device) for k, v in batch.items()}).logits.float()
                scores = logits[:, 0] if logits.shape[1] == 1 else logits[:, 1] - logits[:, 0]
                out[start:stop] = scores.cpu().numpy()
                advance(len(scores))
        return out


def zscore_by_query(queries: Sequence[str], scores: np.ndarray) -> np.ndarray:
    """Scores z-normalised among the pairs that share a query (0 where a query has one pair or
    equal scores)."""
    scores = np.asarray(scores, dtype=np.float64)
    out = np.zeros_like(scores)
    groups: dict[str, list[int]] = {}
    for i, query in enumerate(queries):
        groups.setdefault(query, []).append(i)
    for rows in groups.values():
        values = scores[rows]
        std = values.std()
        out[rows] = (values - values.mean()) / std if std > 0 else 0.0
    return out


class CalibratedTeacher:
    """An offline teacher from two signals, calibrated per query: (1 - w) x z(scorer's score) +
    w x z(bi-encoder cosine), each z-normalised over the query's candidates in the call. The scorer
    is the LLM (`llm_biencoder`) or BM25 (`bm25_biencoder`, which needs `corpus_texts`).

    A call must hold each query's whole candidate list (score_examples and score_candidates do).
    """

    def __init__(self, config: ScoreConfig, model: ModelConfig | None, scorer=None, encoder=None,
                 corpus_texts: Iterable[str] | None = None):
        from peg.model import Encoder

        self.weight = config.biencoder_weight
        self.scorer = scorer or (other_scorer(config, corpus_texts) if self.weight < 1 else None)
        self.encoder = encoder or Encoder(model)
        self.passage_vectors: dict[str, np.ndarray] = {}

    def biencoder_scores(self, queries: Sequence[str], passages: Sequence[str]) -> np.ndarray:
        """Cosines of the pairs. Passage vectors are kept between calls (the newest
        PASSAGE_VECTORS_KEPT): a corpus's passages recur in many queries' lists, so an actor
        encodes each about once instead of once per list it is in."""
        unique_q = list(dict.fromkeys(queries))
        q = dict(zip(unique_q, self.encoder.encode(unique_q, "query"), strict=True))
        new = [text for text in dict.fromkeys(passages) if text not in self.passage_vectors]
        if new:
            self.passage_vectors.update(zip(new, self.encoder.encode(new, "passage"), strict=True))
        scores = np.array([float(q[a] @ self.passage_vectors[b]) for a, b in zip(queries, passages, strict=True)])
        for oldest in list(itertools.islice(self.passage_vectors, max(0, len(self.passage_vectors) - PASSAGE_VECTORS_KEPT))):
            del self.passage_vectors[oldest]
        return scores

    def score(self, queries: Sequence[str], passages: Sequence[str], show_progress: bool = False) -> np.ndarray:
        other = self.scorer.score(queries, passages, show_progress) if self.weight < 1 else np.zeros(len(queries))
        bi = self.biencoder_scores(queries, passages) if self.weight > 0 else np.zeros(len(queries))
        combined = (1 - self.weight) * zscore_by_query(queries, other) + self.weight * zscore_by_query(queries, bi)
        return combined.astype(np.float32)


def other_scorer(config: ScoreConfig, corpus_texts: Iterable[str] | None):
    """The half of a calibrated teacher that is not the bi-encoder: BM25 over `corpus_texts`
    (bm25_biencoder) or the LLM scorer (llm_biencoder)."""
    if config.teacher == "bm25_biencoder":
        if corpus_texts is None:
            raise LLMError("score.teacher 'bm25_biencoder' needs the corpus (data.beir) for its BM25 statistics")
        from peg.llm.lexical import BM25Scorer

        return BM25Scorer(corpus_texts)
    from peg.llm.scorer import LLMScorer

    return LLMScorer(config.llm)


def check_teacher(config: ScoreConfig) -> None:
    """Raise LLMError naming the key/path if the configured teacher cannot be loaded."""
    if config.teacher in ("llm", "llm_biencoder"):
        check_model_source(config.llm)
    elif config.teacher == "bm25_biencoder":
        return
    elif not config.cross_encoder_path:
        raise LLMError("score.cross_encoder_path: required when score.teacher is 'cross_encoder'")
    elif not (Path(config.cross_encoder_path) / "config.json").is_file():
        raise LLMError(
            f"score.cross_encoder_path: {config.cross_encoder_path} is not a transformers model directory (no config.json)"
        )


def load_teacher(config: ScoreConfig, model: ModelConfig | None = None, corpus_texts: Iterable[str] | None = None):
    """The configured teacher: an object with `.score(queries, passages) -> np.ndarray`.
    `model` (the run's encoder) is the bi-encoder half of `llm_biencoder` and `bm25_biencoder`;
    `corpus_texts` (every passage's text) gives `bm25_biencoder` its statistics."""
    check_teacher(config)
    if config.teacher == "cross_encoder":
        return CrossEncoderTeacher(config.cross_encoder_path, config.batch_size, config.max_length)
    if config.teacher in ("llm_biencoder", "bm25_biencoder"):
        if model is None:
            raise LLMError(f"score.teacher {config.teacher!r} needs the run's model for its bi-encoder scores")
        return CalibratedTeacher(config, model, corpus_texts=corpus_texts)
    from peg.llm.scorer import LLMScorer

    return LLMScorer(config.llm)


def score_candidates(
    score: ScoreFn, queries: Mapping[str, str], passages: Mapping[str, str], candidates: Mapping[str, Sequence[str]]
) -> dict[str, list[float]]:
    """Teacher scores of a run (query id -> candidate passage ids), in one batched call.

    Unknown query or passage ids raise LLMError naming them."""
    unknown = [q for q in candidates if q not in queries]
    if unknown:
        raise LLMError(f"unknown query id(s) {unknown[:5]}: not among the {len(queries)} queries given")
    unknown = sorted({p for ids in candidates.values() for p in ids if p not in passages})
    if unknown:
        raise LLMError(f"unknown passage id(s) {unknown[:5]}: not among the {len(passages)} passages given")
    pairs = [(q, p) for q, ids in candidates.items() for p in ids]
    flat = np.asarray(score([queries[q] for q, _ in pairs], [passages[p] for _, p in pairs])).tolist() if pairs else []
    out, offset = {}, 0
    for q, ids in candidates.items():
        out[q] = flat[offset : offset + len(ids)]
        offset += len(ids)
    return out


def score_examples(examples: Sequence[TrainingExample], score: ScoreFn, list_size: int) -> list[TrainingExample]:
    """Cut each list to `list_size` (positives first) and attach teacher scores, in one batched call."""
    cut = []
    for ex in examples:
        n_neg = max(0, list_size - len(ex.pos))
        cut.append(replace(
            ex,
            neg=ex.neg[:n_neg],
            neg_ids=ex.neg_ids[:n_neg] if ex.neg_ids is not None else None,
        ))
    queries = [ex.query for ex in cut for _ in range(len(ex.pos) + len(ex.neg))]
    passages = [text for ex in cut for text in (*ex.pos, *ex.neg)]
    scores = np.asarray(score(queries, passages), dtype=np.float64).tolist()
    out, offset = [], 0
    for ex in cut:
        n_pos, n_neg = len(ex.pos), len(ex.neg)
        out.append(replace(
            ex, pos_scores=scores[offset : offset + n_pos], neg_scores=scores[offset + n_pos : offset + n_pos + n_neg]
        ))
        offset += n_pos + n_neg
    return out


class ScoreProcessor:
    """Shard processor for Ray actors: loads the teacher once, scores shards of examples. `data`
    (the run's data section) gives a BM25 teacher its corpus."""

    def __init__(self, score: dict, model: dict, data: dict):
        self.config = ScoreConfig(**score)
        self.teacher = load_teacher(self.config, ModelConfig(**model), corpus_texts_for(self.config, DataConfig(**data)))

    def __call__(self, shard: int, examples: list[TrainingExample]) -> dict[str, str]:
        scored = score_examples(examples, self.teacher.score, self.config.list_size)
        stats = {"examples": len(scored), "pairs": sum(len(ex.pos) + len(ex.neg) for ex in scored)}
        return {"stats.json": json.dumps(stats), "jsonl": "".join(ex.to_json() + "\n" for ex in scored)}


def corpus_texts_for(config: ScoreConfig, data: DataConfig) -> Iterator[str] | None:
    """The corpus's passage texts where the teacher takes statistics from them (bm25_biencoder),
    else None. RunConfig refuses that teacher without data.beir."""
    if config.teacher != "bm25_biencoder":
        return None
    return (p.full_text for p in iter_corpus(data.beir, allow_empty=data.allow_empty_passages))


def score_headline(s: dict) -> list[str]:
    return [f"scored {s['pairs']:,} pairs of {s['examples']:,} queries with the {s['teacher']} teacher; "
            f"shards: {s['shards_computed']} computed, {s['shards_reused']} reused"]


def run_score(config: RunConfig, scope: StageScope, show_progress: bool = True) -> StageReport:
    """The `score` stage: teacher scores for every candidate list of the judge's training file (the
    mine stage's without a judge), on Ray."""
    check_teacher(config.score)  # a bad path fails here, not once per Ray actor
    input_key = scope.key_of("judge" if config.judge.enabled else "mine", "train.jsonl")
    with tempfile.TemporaryDirectory(prefix="peg-score-") as tmp:
        examples = load_input_examples(scope.store, input_key, Path(tmp))
    build = partial(ScoreProcessor, config.score.model_dump(mode="json"), config.model.model_dump(mode="json"),
                    config.data.model_dump(mode="json"))
    declaration = ShardedStage(PARTS, build, pool=config.score.llm, shard_size=config.score.llm.shard_size, unit="lists")
    shards = run_sharded(scope, declaration, examples, show_progress)
    stats = {"examples": 0, "pairs": 0, **shards.summed(), "teacher": config.score.teacher,
             "list_size": config.score.list_size, "input": input_key, **shards.counts()}
    outputs = {"report.json": stats, "train.jsonl": shards.joined("jsonl")}
    return StageReport(stats, shards.put(outputs), score_headline)
