"""Real collections: passages with an empty title and text load with a warning that counts them
(runs proceed, qrels stay whole), `data.empty_passages: error` refuses them, `peg data check` lists them."""

from __future__ import annotations

import json
import logging

import pytest
from tiny import make_tiny_model
from typer.testing import CliRunner

from peg.cli import app
from peg.config import parse_config
from peg.data import BeirDataset, DataError
from peg.mine.stage import load_train_split


@pytest.fixture
def beir(tmp_path):
    root = tmp_path / "beir"
    (root / "qrels").mkdir(parents=True)
    rows = [{"_id": f"d{i}", "title": f"title {i}", "text": f"text about topic {i}"} for i in range(6)]
    rows[2] = {"_id": "d2", "title": "", "text": ""}
    rows[4] = {"_id": "d4", "text": ""}
    (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": f"topic {i}"}) + "\n" for i in range(4)))
    qrels = "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(4))  # q2 -> the empty d2
    for split in ("train", "test"):
        (root / "qrels" / f"{split}.tsv").write_text(qrels)
    return root


def test_empty_passages_load_with_a_counted_warning_and_keep_their_qrels(beir, caplog):
    with caplog.at_level(logging.WARNING, logger="peg"):
        data = BeirDataset.load(beir, "test", allow_empty=True)
    assert data.empty_passages == ["d2", "d4"] and data.corpus["d2"].full_text == ""
    assert data.qrels["q2"] == {"d2": 1}  # the qrels row pointing at an empty passage stays
    assert "2 passage(s) with empty title and text" in caplog.text
    with pytest.raises(DataError, match=r"corpus.jsonl:3: field 'text' is empty"):
        BeirDataset.load(beir, "test")


def test_the_config_switch_makes_empty_passages_an_error(beir):
    text = f"model: {{name_or_path: m}}\ndata: {{beir: {beir}}}\n"
    assert len(load_train_split(parse_config(text, "cfg.yaml"), scope=None).corpus) == 6  # human queries: no store read
    strict = parse_config(f"model: {{name_or_path: m}}\ndata: {{beir: {beir}, empty_passages: error}}\n", "cfg.yaml")
    with pytest.raises(DataError, match=r"corpus.jsonl:3: field 'text' is empty"):
        load_train_split(strict, scope=None)


def test_data_check_lists_them_and_eval_runs_on_the_whole_collection(beir, tmp_path):
    check = CliRunner().invoke(app, ["data", "check", str(beir)])
    assert check.exit_code == 1
    assert "corpus.jsonl:3: passage 'd2' is empty (no title, no text)" in check.output
    assert "corpus.jsonl:5: passage 'd4' is empty (no title, no text)" in check.output
    assert "not in corpus" not in check.output  # the qrels row of d2 names a passage that exists

    model = make_tiny_model(tmp_path / "model")
    result = CliRunner().invoke(app, ["eval", "--model", str(model), "--data", str(beir), "--output", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "warning: " in result.output and "2 passage(s) with empty title and text" in result.output
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written["num_passages"] == 6 and written["num_queries"] == 4
