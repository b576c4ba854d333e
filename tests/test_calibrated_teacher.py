"""The llm_biencoder teacher: per-query z-scores of the LLM's and the bi-encoder's scores, mixed."""

from __future__ import annotations

import numpy as np
import pytest

from peg.config import ScoreConfig
from peg.llm.teacher import CalibratedTeacher, load_teacher, score_examples, zscore_by_query
from peg.data import TrainingExample


class FixedScorer:
    def __init__(self, table: dict[tuple[str, str], float]):
        self.table = table

    def score(self, queries, passages, show_progress=False):
        return np.array([self.table[q, p] for q, p in zip(queries, passages)], dtype=np.float32)


class FixedEncoder:
    """2-d embeddings: queries on the x axis, passages at given angles."""

    def __init__(self, passages: dict[str, float]):
        self.passages = passages

    def encode(self, texts, kind):
        if kind == "query":
            return np.array([[1.0, 0.0] for _ in texts])
        return np.array([[np.cos(self.passages[t]), np.sin(self.passages[t])] for t in texts])


def test_zscore_by_query_normalises_each_query_separately():
    z = zscore_by_query(["a", "a", "b", "b", "b", "c"], np.array([1.0, 3.0, 10.0, 10.0, 10.0, 5.0]))
    assert z.tolist() == [-1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0])
def test_calibrated_teacher_mixes_the_z_scores(weight):
    llm = {("q1", "p1"): -1.0, ("q1", "p2"): -3.0, ("q1", "p3"): -2.0, ("q2", "p1"): -5.0, ("q2", "p2"): -4.0}
    angles = {"p1": 1.0, "p2": 0.2, "p3": 0.5}
    teacher = CalibratedTeacher(ScoreConfig(teacher="llm_biencoder", biencoder_weight=weight), None,
                                llm=FixedScorer(llm), encoder=FixedEncoder(angles))
    queries, passages = zip(*llm)
    got = teacher.score(list(queries), list(passages))
    cosine = np.cos([angles[p] for p in passages])
    expected = (1 - weight) * zscore_by_query(queries, np.array(list(llm.values()))) + weight * zscore_by_query(queries, cosine)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_score_examples_gives_the_calibrated_teacher_whole_lists():
    llm = {("q", "pos"): -1.0, ("q", "n1"): -2.0, ("q", "n2"): -0.5}
    teacher = CalibratedTeacher(ScoreConfig(teacher="llm_biencoder", biencoder_weight=0.0), None,
                                llm=FixedScorer(llm), encoder=FixedEncoder({}))
    [scored] = score_examples([TrainingExample(query="q", pos=["pos"], neg=["n1", "n2"])], teacher.score, list_size=3)
    z = zscore_by_query(["q"] * 3, np.array([-1.0, -2.0, -0.5]))
    np.testing.assert_allclose(scored.pos_scores + scored.neg_scores, z, rtol=1e-6)


def test_llm_biencoder_teacher_needs_the_run_model():
    with pytest.raises(Exception, match="needs the run's model"):
        load_teacher(ScoreConfig(teacher="llm_biencoder"))
