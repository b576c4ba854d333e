"""Synthetic queries (Tamber et al.): an LLM writes queries of several types per passage
(docs/methods.md §7).

For each source passage and each LLM type in `synth.query_types` (question, claim, keywords, title,
web_query) the LLM gets a few-shot prompt (two worked examples, then the passage cut to
`synth.llm.max_passage_chars`): a chat through the tokenizer's chat template for an instruct model,
or, for a base model without one (e.g. google/gemma-3-270m), the same examples as plain text
ending in the query's label, to be continued. It samples one query (`synth.temperature`, at most
`synth.max_new_tokens`), batched `generate` with left padding. The round-trip filter keeps a query
only if dense retrieval with the run's encoder (`model`) over the whole corpus finds its source in
the top `synth.filter_top_k`, and (with `synth.filter_teacher`) the teacher (`score`) ranks the
source first among those retrieved candidates.

The teacher gate (`synth.gate_fraction`, with a teacher): a seeded fraction of the generated
queries is held out of training before any filtering (outcome `held_out`); for each, the source's
rank in the student's top `synth.filter_top_k` and in the teacher's reordering of it are recorded,
and the report's `teacher_gate` compares the two MRRs. The stage warns when the teacher does not
beat the student, before anything trains on its scores.

The generation-free types (`PSEUDO_QUERY_TYPES`, no LLM call) cut the query from the passage itself
and train on what remains, so the pair is not an exact-match shortcut: `passage_title` (the title;
positive: the text), `inverse_cloze` (one sentence of >= 4 words; positive: the other sentences,
Lee et al. 2019), `span_crop` (`synth.span_words` consecutive words; positive: the passage without
them, a Contriever-style crop). The pick is seeded by (`synth.seed`, passage id, type); a passage
without a title, with fewer than two sentences or fewer than 2 x `span_words` words gives an
`empty` query for that type. They pass the same round-trip filter and teacher. Sampling is seeded per shard and batch (`synth.seed` +
shard number + batch number).

Artifacts (keys under `<run name>/synth/`): `shard-NNNNN.{queries.jsonl,stats.json,jsonl}` per
passage shard (every generated query with its fate; counts by type; kept examples), then
`train.jsonl` (TrainingExample JSONL with `query_type`), `queries.jsonl` and `report.json`.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np

from peg.config import ConfigError, LLMConfig, RunConfig, ScoreConfig, SynthConfig
from peg.data import DataError, Passage, TrainingExample, iter_corpus
from peg.llm.backends import as_backend, load_lm
from peg.llm.loading import check_model_source
from peg.store.scope import StageScope
from peg.runtime.sharded import ShardedStage, StageReport, run_sharded
from peg.runtime.shards import missing_shards
from peg.llm.teacher import CalibratedTeacher, check_teacher, load_teacher, score_candidates

PARTS = ("queries.jsonl", "stats.json", "jsonl")
OUTCOMES = ("empty", "held_out", "not_retrieved", "not_top_teacher", "kept")
logger = logging.getLogger(__name__)

_EXAMPLE_PASSAGES = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It was designed "
    "by Gustave Eiffel's engineering company and built from 1887 to 1889 as the entrance arch of the 1889 "
    "World's Fair.",
    "Regular aerobic exercise lowers resting blood pressure in adults with hypertension. In a meta-analysis "
    "of 93 randomised trials, endurance training reduced systolic blood pressure by about 8 mmHg.",
)

# query type -> (instruction, outputs for the two example passages)
FEW_SHOT: dict[str, tuple[str, tuple[str, str]]] = {
    "question": (
        "Write one question that the passage answers. Reply with the question only.",
        ("When was the Eiffel Tower built?", "Does aerobic exercise lower blood pressure in people with hypertension?"),
    ),
    "claim": (
        "Write one factual claim, a single sentence, that the passage supports. Reply with the claim only.",
        ("The Eiffel Tower was built for the 1889 World's Fair.",
         "Endurance training lowers systolic blood pressure in hypertensive adults."),
    ),
    "keywords": (
        "Write a keyword query of three to six words for which the passage is relevant. Reply with the keywords only.",
        ("Eiffel Tower construction 1889", "aerobic exercise hypertension blood pressure"),
    ),
    "title": (
        "Write a short title for the passage. Reply with the title only.",
        ("History of the Eiffel Tower", "Aerobic Exercise and Blood Pressure in Hypertension"),
    ),
    "web_query": (
        "Write a short web search query that someone would type to find the passage. Reply with the query only.",
        ("who built the eiffel tower", "does cardio lower blood pressure"),
    ),
}

_LABEL = re.compile(r"^(question|claim|keywords?|title|query|web query|search query)\s*:\s*", re.IGNORECASE)


def few_shot_messages(query_type: str, passage: str, max_chars: int) -> list[dict[str, str]]:
    """The chat for one (passage, query type): two worked examples, then the passage."""
    instruction, outputs = FEW_SHOT[query_type]
    messages = []
    for example, output in zip(_EXAMPLE_PASSAGES, outputs, strict=True):
        messages.append({"role": "user", "content": f"{instruction}\n\nPassage: {example}"})
        messages.append({"role": "assistant", "content": output})
    messages.append({"role": "user", "content": f"{instruction}\n\nPassage: {passage[:max_chars]}"})
    return messages


# query type -> the label that introduces a query in the plain-text prompt (models without a chat template)
PLAIN_LABELS = {"question": "Question", "claim": "Claim", "keywords": "Keywords", "title": "Title", "web_query": "Query"}


def few_shot_text(query_type: str, passage: str, max_chars: int) -> str:
    """The plain-text prompt for one (passage, query type), for a base model without a chat
    template: the instruction, two worked examples as 'Passage: ...' / '<Label>: ...', then the
    passage and its label, for the model to continue (`clean_query` keeps the first line)."""
    instruction, outputs = FEW_SHOT[query_type]
    label = PLAIN_LABELS[query_type]
    blocks = [f"Passage: {example}\n{label}: {output}" for example, output in zip(_EXAMPLE_PASSAGES, outputs, strict=True)]
    blocks.append(f"Passage: {passage[:max_chars]}\n{label}:")
    return f"{instruction}\n\n" + "\n\n".join(blocks)


def clean_query(text: str) -> str:
    """First non-empty line of a generation, without a 'Question:'-style label or wrapping quotes."""
    for line in text.splitlines():
        line = _LABEL.sub("", line.strip()).strip().strip('"').strip()
        if line:
            return line
    return ""


PSEUDO_QUERY_TYPES = ("passage_title", "inverse_cloze", "span_crop")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def pseudo_query(passage: Passage, query_type: str, rng: random.Random, span_words: int) -> tuple[str, str]:
    """(query, positive text) cut from `passage` for a generation-free type; ('', '') when the
    passage is too short for it (see the module doc)."""
    if query_type == "passage_title":
        return (passage.title.strip(), passage.text.strip()) if passage.title.strip() and passage.text.strip() else ("", "")
    if query_type == "inverse_cloze":
        sentences = [s for s in _SENTENCE_END.split(passage.text.strip()) if s]
        usable = [i for i, s in enumerate(sentences) if len(s.split()) >= 4]
        if len(sentences) < 2 or not usable:
            return "", ""
        pick = rng.choice(usable)
        rest = " ".join(s for i, s in enumerate(sentences) if i != pick)
        return sentences[pick], f"{passage.title} {rest}".strip() if passage.title else rest
    if query_type == "span_crop":
        words = passage.full_text.split()
        if len(words) < 2 * span_words:
            return "", ""
        start = rng.randrange(len(words) - span_words + 1)
        return " ".join(words[start : start + span_words]), " ".join(words[:start] + words[start + span_words :])
    raise ValueError(f"not a generation-free query type: {query_type!r}")


def teacher_rank(source_id: str, retrieved_ids: Sequence[str], teacher_scores: Sequence[float]) -> int | None:
    """1-based rank of the source among the retrieved candidates in the teacher's order (ties rank
    the source first, as the round-trip filter does); None if the source was not retrieved."""
    if source_id not in retrieved_ids:
        return None
    source_score = teacher_scores[list(retrieved_ids).index(source_id)]
    return 1 + sum(score > source_score for score in teacher_scores)


def teacher_gate(records: Sequence[dict]) -> dict:
    """The teacher gate over the held-out records (`outcome` 'held_out', with `retrieved_rank` in
    the student's top k and `teacher_rank` after the teacher reorders that top k): both MRR@k of
    the source passage, and whether the teacher beats the student (a strictly higher MRR). A
    teacher that does not cannot be expected to teach the student."""
    held = [r for r in records if r["outcome"] == "held_out"]
    if not held:
        return {"queries": 0, "student_mrr": None, "teacher_mrr": None, "teacher_beats_student": None}

    def mrr(key: str) -> float:
        return sum(1 / r[key] for r in held if r.get(key)) / len(held)

    student, teacher = mrr("retrieved_rank"), mrr("teacher_rank")
    return {"queries": len(held), "student_mrr": student, "teacher_mrr": teacher, "teacher_beats_student": teacher > student}


def log_teacher_gate(gate: dict, teacher: str, top_k: int) -> None:
    """Log the gate's verdict: a warning when the teacher does not beat the student, else info."""
    if gate["teacher_beats_student"] is None:
        return
    figures = (gate["queries"], gate["teacher_mrr"], gate["student_mrr"])
    if gate["teacher_beats_student"]:
        logger.info("teacher gate: the teacher beats the student on %d held-out synthetic queries (MRR %.3f vs %.3f)", *figures)
        return
    logger.warning(
        "teacher gate: the teacher (%s) does not beat the student at reranking its top %d on %d held-out synthetic "
        "queries (MRR %.3f vs %.3f): its scores may teach the student nothing, or harm it",
        teacher, top_k, *figures,
    )


def round_trip_outcome(source_id: str, retrieved_ids: Sequence[str], teacher_scores: Sequence[float] | None) -> str:
    """'not_retrieved' if the source is not among `retrieved_ids` (the top k); 'not_top_teacher' if
    some other candidate has a higher teacher score than the source; else 'kept' (ties keep).
    Without teacher scores (`synth.filter_teacher` off) a retrieved source is kept."""
    if source_id not in retrieved_ids:
        return "not_retrieved"
    if teacher_scores is None:
        return "kept"
    source_score = teacher_scores[list(retrieved_ids).index(source_id)]
    return "kept" if source_score >= max(teacher_scores) else "not_top_teacher"


class QueryWriter:
    """Batched few-shot query generation on `synth.llm.backend`: a chat for a model with a chat
    template, a plain-text continuation for a base model without one (`few_shot_text`); `model` is
    a backend (peg.llm.backends) or a transformers causal LM."""

    def __init__(self, config: SynthConfig, model=None, tokenizer=None):
        self.config = config
        if model is None or tokenizer is None:
            model, tokenizer = load_lm(config.llm)
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self.lm, self.tokenizer = as_backend(model, tokenizer), tokenizer

    def prompt_ids(self, passage: str, query_type: str) -> list[int]:
        """The prompt's token ids for one job (special tokens as the chat template or tokenizer adds them)."""
        max_chars = self.config.llm.max_passage_chars
        if not self.has_chat_template:
            return self.tokenizer.encode(few_shot_text(query_type, passage, max_chars), add_special_tokens=True)
        text = self.tokenizer.apply_chat_template(
            few_shot_messages(query_type, passage, max_chars), tokenize=False, add_generation_prompt=True
        )
        return self.tokenizer.encode(text, add_special_tokens=False)

    def write(self, jobs: Sequence[tuple[str, str]], seed: int) -> list[str]:
        """One query per (passage text, query type) job, in input order ('' when nothing usable came out)."""
        ids = [self.prompt_ids(p, t) for p, t in jobs]
        order = np.argsort([-len(i) for i in ids], kind="stable")
        out = [""] * len(jobs)
        size = self.config.llm.batch_size
        for batch_number, start in enumerate(range(0, len(order), size)):
            idx = order[start : start + size]
            generated = self.lm.generate(
                [ids[i] for i in idx], self.config.max_new_tokens, self.config.temperature, seed=seed + batch_number
            )
            texts = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
            for i, text in zip(idx, texts, strict=True):
                out[i] = clean_query(text)
        return out


class SynthProcessor:
    """Shard processor for Ray actors: writes queries for a shard of passages and filters them."""

    def __init__(self, synth: dict, score: dict, model: dict, corpus_texts: dict[str, str], index):
        from peg.config import ModelConfig
        from peg.llm.scorer import LLMScorer
        from peg.model import Encoder

        self.config = SynthConfig(**synth)
        score_config = ScoreConfig(**score)
        needs_llm = any(t not in PSEUDO_QUERY_TYPES for t in self.config.query_types)
        self.writer = QueryWriter(self.config) if needs_llm else None
        self.encoder = Encoder(ModelConfig(**model))
        shared_llm = (
            self.writer is not None
            and score_config.teacher in ("llm", "llm_biencoder")
            and _same_model(score_config.llm, self.config.llm)
        )
        if not self.config.filter_teacher:
            self.teacher = None
        elif shared_llm:  # the writer's model scores too: one copy per actor
            llm = LLMScorer(score_config.llm, self.writer.lm, self.writer.tokenizer)
            self.teacher = llm if score_config.teacher == "llm" else CalibratedTeacher(score_config, None, llm, self.encoder)
        else:
            self.teacher = load_teacher(score_config, ModelConfig(**model), corpus_texts.values())
        self.corpus_texts = corpus_texts
        self.index = index

    def __call__(self, shard: int, passages: list[Passage]) -> dict[str, str]:
        types = self.config.query_types
        jobs = [(p, t) for p in passages for t in types]
        llm_jobs = [(p.full_text, t) for p, t in jobs if t not in PSEUDO_QUERY_TYPES]
        written = iter(self.writer.write(llm_jobs, seed=self.config.seed + shard) if llm_jobs else [])
        records, positives = [], []
        for p, t in jobs:
            if t in PSEUDO_QUERY_TYPES:
                rng = random.Random(f"{self.config.seed}/{p.id}/{t}")
                query, positive = pseudo_query(p, t, rng, self.config.span_words)
            else:
                query, positive = next(written), p.full_text
            records.append({"passage_id": p.id, "query_type": t, "query": query, "outcome": "empty" if not query else None})
            positives.append(positive)
        live = {f"{r['passage_id']}/{r['query_type']}": r for r in records if r["outcome"] is None}
        held_out = {key for key, r in live.items() if self._held_out(r)}
        if live:
            emb = self.encoder.encode([r["query"] for r in live.values()], "query")
            retrieved = dict(zip(live, self.index.search(emb, self.config.filter_top_k)[0], strict=True))
            # only queries whose source was retrieved need the teacher
            candidates = {key: ids for key, ids in retrieved.items() if live[key]["passage_id"] in ids}
            queries = {key: r["query"] for key, r in live.items()}
            scores = {} if self.teacher is None else score_candidates(self.teacher.score, queries, self.corpus_texts, candidates)
            for key, r in live.items():
                ids = retrieved[key]
                r["retrieved_rank"] = ids.index(r["passage_id"]) + 1 if r["passage_id"] in ids else None
                if key in held_out:
                    r["outcome"] = "held_out"
                    r["teacher_rank"] = teacher_rank(r["passage_id"], ids, scores[key]) if key in scores else None
                else:
                    r["outcome"] = round_trip_outcome(r["passage_id"], ids, scores.get(key))
        stats = {t: dict.fromkeys(OUTCOMES, 0) for t in types}
        for r in records:
            stats[r["query_type"]][r["outcome"]] += 1
        kept = [
            TrainingExample(
                query=r["query"], pos=[positive], query_id=f"synth-{r['passage_id']}-{r['query_type']}",
                pos_ids=[r["passage_id"]], query_type=r["query_type"],
            )
            for r, positive in zip(records, positives, strict=True) if r["outcome"] == "kept"
        ]
        return {
            "queries.jsonl": "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
            "stats.json": json.dumps(stats),
            "jsonl": "".join(ex.to_json() + "\n" for ex in kept),
        }


    def _held_out(self, record: dict) -> bool:
        """Whether a query is held out for the teacher gate: a seeded draw per (passage, type),
        with a teacher only (the gate compares it with the student)."""
        if self.teacher is None or self.config.gate_fraction == 0:
            return False
        draw = random.Random(f"{self.config.seed}/gate/{record['passage_id']}/{record['query_type']}").random()
        return draw < self.config.gate_fraction


def _same_model(a: LLMConfig, b: LLMConfig) -> bool:
    return (a.path, a.gguf_file, a.backend, a.compute_type) == (b.path, b.gguf_file, b.backend, b.compute_type)


def synth_headline(r: dict) -> list[str]:
    return [f"{r['passages']:,} passages: kept {r['kept']:,}, dropped {r['dropped']:,}; shards: "
            f"{r['shards_computed']} computed, {r['shards_reused']} reused",
            *(f"{t:<10} " + ", ".join(f"{k}={v}" for k, v in c.items()) for t, c in r["by_type"].items())]


def run_synth(config: RunConfig, scope: StageScope, show_progress: bool = True) -> StageReport:
    """The `synth` stage over `data.beir`'s corpus: generate, filter, store; resumable per shard."""
    from peg.runtime import ShardedIndex, encode_corpus, ray_session

    if any(t not in PSEUDO_QUERY_TYPES for t in config.synth.query_types):
        check_model_source(config.synth.llm)  # bad paths fail here, not once per Ray actor
    if config.synth.filter_teacher:
        check_teacher(config.score)
    if not config.data.beir:
        raise ConfigError("data.beir: synth needs a BEIR corpus; set data.beir in the run config")
    corpus = list(iter_corpus(config.data.beir, allow_empty=config.data.allow_empty_passages))
    if not corpus:
        raise DataError(Path(config.data.beir) / "corpus.jsonl", None, "the corpus has no passages")
    sources = corpus[: config.synth.num_passages] if config.synth.num_passages else corpus
    llm = config.synth.llm
    with ray_session():
        index = None
        if missing_shards(scope.store, scope.prefix, len(sources), llm.shard_size, PARTS, scope.shard_hash):
            embeddings = encode_corpus(config, scope.store, corpus, show_progress)
            index = ShardedIndex(
                embeddings.matrix, embeddings.ids, config.mining.num_shards, config.mining.index,
                actor_cpus=config.mining.actor_cpus,
            )
        build = partial(
            SynthProcessor, config.synth.model_dump(mode="json"), config.score.model_dump(mode="json"),
            config.model.model_dump(mode="json"), {p.id: p.full_text for p in corpus}, index,
        )
        try:
            shards = run_sharded(scope, ShardedStage(PARTS, build, llm, llm.shard_size, "passages"), sources, show_progress)
        finally:
            if index is not None:
                index.close()
    counts = {t: dict.fromkeys(OUTCOMES, 0) for t in config.synth.query_types}
    for text in shards.texts["stats.json"]:
        for t, by_outcome in json.loads(text).items():
            for outcome, n in by_outcome.items():
                counts[t][outcome] += n
    gate = teacher_gate([json.loads(line) for text in shards.texts["queries.jsonl"] for line in text.splitlines()])
    log_teacher_gate(gate, config.score.teacher, config.synth.filter_top_k)
    report = {
        "passages": len(sources),
        "teacher_gate": gate,
        "by_type": counts,
        "kept": sum(c["kept"] for c in counts.values()),
        "dropped": sum(c[o] for c in counts.values() for o in OUTCOMES if o not in ("kept", "held_out")),
        "filter_top_k": config.synth.filter_top_k,
        "teacher": config.score.teacher,
        **shards.counts(),
    }
    outputs = {"queries.jsonl": shards.joined("queries.jsonl"), "report.json": report, "train.jsonl": shards.joined("jsonl")}
    return StageReport(report, shards.put(outputs), synth_headline)
