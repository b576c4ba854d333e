"""The calibrated teachers: per-query z-scores of the LLM's (llm_biencoder) or BM25's (bm25_biencoder)
and the bi-encoder's scores, mixed; BM25 as bm25s scores a corpus."""

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
                                scorer=FixedScorer(llm), encoder=FixedEncoder(angles))
    queries, passages = zip(*llm)
    got = teacher.score(list(queries), list(passages))
    cosine = np.cos([angles[p] for p in passages])
    expected = (1 - weight) * zscore_by_query(queries, np.array(list(llm.values()))) + weight * zscore_by_query(queries, cosine)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_score_examples_gives_the_calibrated_teacher_whole_lists():
    llm = {("q", "pos"): -1.0, ("q", "n1"): -2.0, ("q", "n2"): -0.5}
    teacher = CalibratedTeacher(ScoreConfig(teacher="llm_biencoder", biencoder_weight=0.0), None,
                                scorer=FixedScorer(llm), encoder=FixedEncoder({}))
    [scored] = score_examples([TrainingExample(query="q", pos=["pos"], neg=["n1", "n2"])], teacher.score, list_size=3)
    z = zscore_by_query(["q"] * 3, np.array([-1.0, -2.0, -0.5]))
    np.testing.assert_allclose(scored.pos_scores + scored.neg_scores, z, rtol=1e-6)


def test_llm_biencoder_teacher_needs_the_run_model():
    with pytest.raises(Exception, match="needs the run's model"):
        load_teacher(ScoreConfig(teacher="llm_biencoder"))


CORPUS = [
    "The cat sat on the mat beside another cat.",
    "Dogs chase cats around the garden all day.",
    "Protein folding inside cells depends on the cell membrane.",
    "A quick brown fox jumps over the lazy dog.",
    "Cells divide by mitosis; the membrane splits in two.",
]


@pytest.mark.parametrize("query", ["cat on a mat", "cell membrane proteins", "lazy dogs in a garden", "jazz"])
def test_bm25_scores_pairs_as_bm25s_scores_the_indexed_corpus(query):
    import bm25s
    import Stemmer

    from peg.llm.lexical import BM25Scorer

    stemmer = Stemmer.Stemmer("english")
    index = bm25s.BM25()
    index.index(bm25s.tokenize(CORPUS, stopwords="en", stemmer=stemmer, show_progress=False), show_progress=False)
    tokens = bm25s.tokenize([query], stopwords="en", stemmer=stemmer, return_ids=False, show_progress=False)[0]
    expected = index.get_scores(tokens)
    np.testing.assert_allclose(BM25Scorer(CORPUS).score([query] * len(CORPUS), CORPUS), expected, rtol=1e-5, atol=1e-6)


def test_bm25_scores_a_passage_outside_the_corpus_with_the_corpus_statistics():
    from peg.llm.lexical import BM25Scorer

    scorer = BM25Scorer(CORPUS)
    # "mitosis" is in one passage of five: idf ln(1 + 4.5 / 1.5); the passage has 2 tokens; the
    # corpus 33 after stop words (e.g. "cat sat mat besid anoth cat"): avgdl 6.6
    norm = 1.5 * (1 - 0.75 + 0.75 * 2 / scorer.avgdl)
    expected = np.log(1 + 4.5 / 1.5) * 1 / (1 + norm)
    assert scorer.avgdl == pytest.approx(33 / 5)
    np.testing.assert_allclose(scorer.score(["mitosis"], ["mitosis explained"]), [expected], rtol=1e-6)


def test_bm25_biencoder_teacher_mixes_bm25_and_cosine_z_scores():
    from peg.llm.lexical import BM25Scorer

    angles = {p: 0.1 * i for i, p in enumerate(CORPUS)}
    teacher = CalibratedTeacher(ScoreConfig(teacher="bm25_biencoder", biencoder_weight=0.3), None,
                                encoder=FixedEncoder(angles), corpus_texts=iter(CORPUS))
    queries = ["cell membrane"] * len(CORPUS)
    bm25 = BM25Scorer(CORPUS).score(queries, CORPUS)
    expected = 0.7 * zscore_by_query(queries, bm25) + 0.3 * zscore_by_query(queries, np.cos([angles[p] for p in CORPUS]))
    np.testing.assert_allclose(teacher.score(queries, CORPUS), expected, rtol=1e-5)


def test_bm25_biencoder_teacher_needs_the_corpus():
    with pytest.raises(Exception, match="needs the corpus"):
        CalibratedTeacher(ScoreConfig(teacher="bm25_biencoder"), None, encoder=FixedEncoder({}))


def test_a_bm25_teacher_without_a_corpus_is_refused_by_the_config():
    from peg.config import RunConfig

    with pytest.raises(Exception, match="score.teacher 'bm25_biencoder' takes its BM25 statistics from a corpus"):
        RunConfig.model_validate({"name": "r", "model": {"name_or_path": "m"}, "store": {"uri": "s"},
                                  "score": {"enabled": True, "teacher": "bm25_biencoder"},
                                  "data": {"train_files": ["x.jsonl"]}})


class CountingEncoder(FixedEncoder):
    def __init__(self, passages):
        super().__init__(passages)
        self.passages_encoded = 0

    def encode(self, texts, kind):
        self.passages_encoded += len(texts) if kind == "passage" else 0
        return super().encode(texts, kind)


def test_the_calibrated_teacher_encodes_a_recurring_passage_once_and_scores_as_without_the_memo():
    angles = {p: 0.1 * i for i, p in enumerate(CORPUS)}
    config = ScoreConfig(teacher="bm25_biencoder", biencoder_weight=0.4)
    memo = CalibratedTeacher(config, None, encoder=CountingEncoder(angles), corpus_texts=CORPUS)
    lists = [("cat", CORPUS[:3]), ("cells", CORPUS[1:4]), ("dogs", CORPUS[2:5]), ("fox", CORPUS[:3])]
    for query, passages in lists:
        fresh = CalibratedTeacher(config, None, encoder=FixedEncoder(angles), corpus_texts=CORPUS)
        np.testing.assert_allclose(memo.score([query] * 3, passages), fresh.score([query] * 3, passages), rtol=1e-6)
    assert memo.encoder.passages_encoded == len(CORPUS)  # 12 pairs, 5 distinct passages
