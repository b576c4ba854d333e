"""Evaluation: metrics equal an independent trec_eval implementation on the same run file."""

import random

import numpy as np
import pytest
from reference_metrics import reference_metrics
from typer.testing import CliRunner

from peg.cli import app
from peg.data import BeirDataset
from peg.config import ConfigError, parse_config
from peg.eval import compute_metrics, evaluate_embeddings, evaluate_model, read_run, write_run
from peg.model import model_config_for
from shared_data import SCIFACT



def assert_same(actual, expected):
    assert actual.keys() == expected.keys()
    for name in expected:
        assert actual[name] == pytest.approx(expected[name], abs=1e-9), name


def test_metrics_match_reference_with_grades_ties_and_missing_queries(tmp_path):
    rng = random.Random(0)
    docs = [f"d{i}" for i in range(300)]
    qrels = {f"q{i}": {d: rng.choice([1, 1, 2, 3]) for d in rng.sample(docs, rng.randint(1, 6))} for i in range(40)}
    qrels["q_unretrieved"] = {"d1": 1}
    run = {
        qid: {d: round(rng.random(), 1) for d in rng.sample(docs, 150)}  # rounded scores: many ties
        for qid in qrels
        if qid != "q_unretrieved"
    }
    for qid in list(run)[:10]:  # make sure some relevant documents are retrieved
        run[qid].update({d: 0.95 for d in qrels[qid]})
    expected = reference_metrics(qrels, run)
    assert 0 < expected["ndcg@10"] < 1
    assert_same(compute_metrics(qrels, run), expected)
    path = tmp_path / "run.trec"
    write_run(path, run)
    assert_same(compute_metrics(qrels, read_run(path)), expected)


def test_reported_cut_offs_follow_eval_k_values():
    rng = random.Random(1)
    docs = [f"d{i}" for i in range(60)]
    qrels = {f"q{i}": {d: 1 for d in rng.sample(docs, 4)} for i in range(20)}
    run = {qid: {d: rng.random() for d in rng.sample(docs, 30)} for qid in qrels}
    metrics = compute_metrics(qrels, run, (5, 20))
    assert list(metrics) == ["ndcg@10", "map@20", "mrr@10", "recall@5", "recall@20"]  # no recall@100 on a top-20 run
    assert_same(metrics, reference_metrics(qrels, run, (5, 20)))

    # evaluate_embeddings searches max(10, max k) deep and reports at the configured cut-offs
    vectors = np.random.default_rng(0).normal(size=(60, 8)).astype(np.float32)
    result = evaluate_embeddings(list(qrels), vectors[:20], docs, vectors, qrels, k_values=(1, 3))
    assert list(result.metrics) == ["ndcg@10", "map@3", "mrr@10", "recall@1", "recall@3"]
    assert {len(docs_) for docs_ in result.run.values()} == {10}
    assert_same(result.metrics, reference_metrics(qrels, result.run, (1, 3)))
    assert load_config_text("eval: {k_values: [5, 20]}").eval.k_values == [5, 20]
    with pytest.raises(ConfigError, match="k_values must be distinct positive integers"):
        load_config_text("eval: {k_values: [5, 5]}")


def load_config_text(text: str):
    return parse_config("model: {name_or_path: m}\n" + text, "cfg.yaml")


def test_run_file_ranks_in_trec_eval_order(tmp_path):
    path = tmp_path / "run.trec"
    write_run(path, {"q": {"a": 0.5, "b": 0.5, "c": 0.9}})
    assert [line.split()[2:4] for line in path.read_text().splitlines()] == [["c", "1"], ["b", "2"], ["a", "3"]]


def test_malformed_run_file(tmp_path):
    path = tmp_path / "run.trec"
    path.write_text("q Q0 d 1 0.5 tag\nq Q0 d2 2 tag\n")
    with pytest.raises(ValueError, match=rf"{path}:2: expected 6 fields"):
        read_run(path)


@pytest.mark.slow
def test_minilm_on_scifact_slice_matches_reference_from_run_file(tmp_path):
    """Real model, real data: 40 test queries against their positives plus 400 other passages."""
    full = BeirDataset.load(SCIFACT, "test")
    qids = sorted(full.qrels)[:40]
    keep = {d for q in qids for d in full.qrels[q]} | set(sorted(full.corpus)[:400])
    full.queries = {q: full.queries[q] for q in qids}
    full.qrels = {q: full.qrels[q] for q in qids}
    full.corpus = {d: full.corpus[d] for d in sorted(keep)}
    result = evaluate_model(model_config_for("sentence-transformers/all-MiniLM-L6-v2"), full, show_progress=False)
    paths = result.write(tmp_path / "eval")
    expected = reference_metrics(full.qrels, read_run(paths["run"]))
    assert_same(result.metrics, expected)
    assert expected["ndcg@10"] > 0.6  # MiniLM is a real retriever here, not noise


def test_cli_eval_errors_name_the_file(tmp_path):
    args = ["eval", "--model", "sentence-transformers/all-MiniLM-L6-v2", "--data", str(SCIFACT), "--split", "dev"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "no qrels for split 'dev'" in result.output
