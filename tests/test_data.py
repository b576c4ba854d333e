"""BEIR and training-pair IO: every bad-input case names the file and line."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from peg.cli import app
from peg.data import BeirDataset, DataError, TrainingExample, iter_corpus, iter_examples, load_qrels, write_examples
from peg.data.check import check_path
from shared_data import SCIFACT



def make_beir(root: Path, corpus=None, queries=None, qrels="query-id\tcorpus-id\tscore\r\nq1\td1\t1\r\nq2\td2\t1\r\n"):
    corpus = corpus or [{"_id": "d1", "title": "T1", "text": "one"}, {"_id": "d2", "title": "", "text": "two"}]
    queries = queries or [{"_id": "q1", "text": "first?"}, {"_id": "q2", "text": "second?"}]
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in corpus))
    (root / "queries.jsonl").write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in queries))
    (root / "qrels" / "test.tsv").write_text(qrels)
    return root


def test_valid_folder_with_crlf_qrels(tmp_path):
    data = BeirDataset.load(make_beir(tmp_path), "test")
    assert data.qrels == {"q1": {"d1": 1}, "q2": {"d2": 1}}
    assert data.corpus["d1"].full_text == "T1 one" and data.corpus["d2"].full_text == "two"


@pytest.mark.parametrize(
    "corpus, line, message",
    [
        ([{"_id": "d1", "text": "one"}, '{"_id": "d2", "text": '], 2, "malformed JSON"),
        ([{"_id": "d1", "text": "one"}, {"text": "two"}], 2, "missing field '_id'"),
        ([{"_id": "d1", "text": "one"}, {"_id": "d2", "title": "", "text": "  "}], 2, "field 'text' is empty"),
        ([{"_id": "d1", "text": "one"}, {"_id": "d1", "text": "again"}], 2, "duplicate id 'd1'"),
        ([{"_id": "d1", "text": "one"}, {"_id": "d2", "text": 5}], 2, "field 'text' must be a string"),
        ([{"_id": "d1", "text": "one"}, "[1, 2]"], 2, "expected a JSON object"),
    ],
)
def test_bad_corpus_names_file_and_line(tmp_path, corpus, line, message):
    root = make_beir(tmp_path, corpus=corpus)
    with pytest.raises(DataError) as err:
        list(iter_corpus(root))
    assert str(err.value).startswith(f"{root / 'corpus.jsonl'}:{line}: ")
    assert message in str(err.value)


def test_bad_queries(tmp_path):
    root = make_beir(tmp_path, queries=[{"_id": "q1", "text": "first?"}, {"_id": "q2", "text": ""}])
    with pytest.raises(DataError, match=rf"{root / 'queries.jsonl'}:2: field 'text' is empty"):
        BeirDataset.load(root, "test")


@pytest.mark.parametrize(
    "qrels, line, message",
    [
        ("query-id\tcorpus-id\tscore\nq1\td1\n", 2, "expected 3 tab-separated columns, got 2"),
        ("query-id\tcorpus-id\tscore\nq1\td1\thigh\n", 2, "score 'high' is not an integer"),
        ("query-id\tcorpus-id\tscore\nq1\td1\t1\nq9\td1\t1\n", 3, "query id 'q9' is not in queries.jsonl"),
        ("query-id\tcorpus-id\tscore\r\nq1\td1\t1\r\nq2\td7\t1\r\n", 3, "corpus id 'd7' is not in corpus.jsonl"),
    ],
)
def test_bad_qrels_names_file_and_line(tmp_path, qrels, line, message):
    root = make_beir(tmp_path, qrels=qrels)
    with pytest.raises(DataError) as err:
        BeirDataset.load(root, "test")
    assert str(err.value) == f"{root / 'qrels' / 'test.tsv'}:{line}: {message}"


def test_missing_split_and_folder(tmp_path):
    root = make_beir(tmp_path / "b")
    with pytest.raises(DataError, match="no qrels for split 'dev'"):
        load_qrels(root, "dev")
    with pytest.raises(DataError, match="not a directory"):
        BeirDataset.load(tmp_path / "missing", "test")


def test_check_collects_every_problem(tmp_path):
    root = make_beir(
        tmp_path,
        corpus=[{"_id": "d1", "text": "one"}, "{bad", {"_id": "d1", "text": "dup"}],
        qrels="query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\n",
    )
    report = check_path(root)
    found = [str(p) for p in report.problems]
    assert any("corpus.jsonl:2: malformed JSON" in p for p in found)
    assert any("corpus.jsonl:3: duplicate id 'd1'" in p for p in found)
    assert any("test.tsv:3: corpus id 'd2' is not in corpus.jsonl" in p for p in found)
    assert report.counts["passages"] == 1
    result = CliRunner().invoke(app, ["data", "check", str(root)])
    assert result.exit_code == 1 and "3 problem(s)" in result.output


def test_training_pairs_round_trip(tmp_path):
    examples = [
        TrainingExample("q?", ["p"], ["n1", "n2"], query_id="1", pos_ids=["a"], neg_ids=["b", "c"], neg_scores=[0.1, 0.2]),
        TrainingExample("q2?", ["p2"]),
    ]
    path = tmp_path / "train.jsonl"
    assert write_examples(path, examples) == 2
    assert list(iter_examples(path)) == examples


@pytest.mark.parametrize(
    "record, message",
    [
        ({"pos": ["p"]}, "missing field 'query'"),
        ({"query": "q", "pos": []}, "field 'pos' is empty"),
        ({"query": "q", "pos": ["p", ""]}, "pos[1] is empty text"),
        ({"query": "q", "pos": ["p"], "neg": [3]}, "neg[0] must be a string"),
        ({"query": "q", "pos": ["p"], "neg": ["n"], "neg_scores": [1, 2]}, "field 'neg_scores' must be a list aligned"),
        ({"query": "q", "pos": ["p"], "negs": ["n"]}, "unknown field(s) ['negs']"),
    ],
)
def test_bad_training_pairs_name_file_and_line(tmp_path, record, message):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"query": "ok", "pos": ["fine"]}) + "\n\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError) as err:
        list(iter_examples(path))
    assert str(err.value).startswith(f"{path}:3: ")
    assert message in str(err.value)


def test_scifact_is_valid():
    report = check_path(SCIFACT)
    assert report.problems == []
    assert report.counts["passages"] == 5183 and report.counts["queries"] == 1109
    assert report.counts["qrels[test] pairs"] == 339 and report.counts["qrels[train] pairs"] == 919
