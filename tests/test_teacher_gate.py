"""The teacher gate: held-out synthetic queries compare the teacher's reranking of the student's
top k with the student's own order, and a teacher that does not beat the student is warned about.

The synth processor runs in-process (no Ray) with the packaged MiniLM as the student over an
exact in-memory index; the corpus is built so that the student confuses near-duplicate passages
that differ only in a number. Teachers are stand-ins with known quality: one scores lexical
overlap (the span-crop query is cut verbatim from its source, so it ranks the source first), the
other the negated overlap (ranks the source last).
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from peg.config import ModelConfig, SynthConfig
from peg.data import Passage
from peg.llm.synth import SynthProcessor, log_teacher_gate, teacher_gate, teacher_rank
from peg.model import Encoder

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
SUBJECTS = ["aspirin", "insulin", "caffeine", "melatonin"]
PASSAGES = [
    Passage(f"{s}-{n}", "", f"In trial number {n} the dose of {s} was {n * 7} mg given to {n * 11} patients "
            f"over {n + 2} weeks, and the observed response rate was {n * 3} percent in cohort {n}.")
    for s in SUBJECTS for n in range(1, 6)
]  # fmt: skip


class ExactIndex:
    """The ShardedIndex.search contract over an in-memory matrix: (ids [Q][k], scores [Q, k])."""

    def __init__(self, ids: list[str], matrix: np.ndarray):
        self.ids, self.matrix = ids, matrix

    def search(self, queries: np.ndarray, k: int):
        scores = queries @ self.matrix.T
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return [[self.ids[j] for j in row] for row in order], np.take_along_axis(scores, order, 1)


class OverlapTeacher:
    """Scores a pair by the fraction of query words in the passage (negated: `sign` -1)."""

    def __init__(self, sign: float):
        self.sign = sign

    def score(self, queries, passages, show_progress=False) -> np.ndarray:
        return np.array([self.sign * np.mean([w in p.split() for w in q.split()]) for q, p in zip(queries, passages)])


def test_teacher_rank_and_gate_figures():
    assert teacher_rank("b", ["a", "b", "c"], [0.1, 0.9, 0.5]) == 1
    assert teacher_rank("b", ["a", "b", "c"], [0.95, 0.9, 0.9]) == 2  # ties rank the source first
    assert teacher_rank("z", ["a", "b"], [1.0, 0.0]) is None
    records = [
        {"outcome": "held_out", "retrieved_rank": 2, "teacher_rank": 1},
        {"outcome": "held_out", "retrieved_rank": None, "teacher_rank": None},
        {"outcome": "kept", "retrieved_rank": 5, "teacher_rank": None},
    ]
    assert teacher_gate(records) == {"queries": 2, "student_mrr": 0.25, "teacher_mrr": 0.5, "teacher_beats_student": True}
    assert teacher_gate(records[2:])["teacher_beats_student"] is None  # nothing held out: no verdict


@pytest.fixture(scope="module")
def processor():
    synth = SynthConfig(query_types=["span_crop"], span_words=6, filter_top_k=20, gate_fraction=0.5, seed=1)
    encoder = Encoder(ModelConfig(name_or_path=MINILM))
    matrix = encoder.encode([p.full_text for p in PASSAGES], "passage")
    made = SynthProcessor.__new__(SynthProcessor)  # no model loading: the test provides student and teacher
    made.config, made.writer, made.encoder = synth, None, encoder
    made.corpus_texts = {p.id: p.full_text for p in PASSAGES}
    made.index = ExactIndex([p.id for p in PASSAGES], matrix)
    return made


@pytest.mark.slow
@pytest.mark.parametrize("sign, beats", [(1.0, True), (-1.0, False)])
def test_gate_tells_a_better_teacher_from_a_worse_one(processor, sign, beats, caplog):
    processor.teacher = OverlapTeacher(sign)
    out = processor(0, PASSAGES)
    records = [json.loads(line) for line in out["queries.jsonl"].splitlines()]
    held = [r for r in records if r["outcome"] == "held_out"]
    assert 0 < len(held) < len(records)  # about gate_fraction of the queries
    trained = {json.loads(line)["query_id"] for line in out["jsonl"].splitlines()}
    assert trained and not trained & {f"synth-{r['passage_id']}-span_crop" for r in held}  # held out: never trained on
    gate = teacher_gate(records)
    assert gate["student_mrr"] < 1.0  # the student confuses the near-duplicates
    assert gate["teacher_beats_student"] is beats
    with caplog.at_level(logging.INFO, logger="peg.llm.synth"):
        log_teacher_gate(gate, "cross_encoder", 20)
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "teacher gate" in r.getMessage()]
    assert bool(warned) is (not beats)


@pytest.mark.slow
def test_no_teacher_holds_nothing_out(processor):
    processor.teacher = None
    out = processor(0, PASSAGES)
    assert '"held_out"' not in out["queries.jsonl"]
