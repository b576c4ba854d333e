"""bench/data/assemble.py: a collection is written only when every file has its pinned sha256,
and appears whole (one rename) or not at all."""

from __future__ import annotations

import hashlib
import io
import zipfile

import pytest

from bench.data import assemble


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()


@pytest.fixture
def toy(monkeypatch):
    corpus, qrels = b'{"_id": "d1", "title": "", "text": "x"}\n', b"query-id\tcorpus-id\tscore\r\nq1\td1\t1\r\n"
    files = {"corpus.jsonl": ("corpus/human.jsonl", hashlib.sha256(corpus).hexdigest()),
             "qrels/test.tsv": ("qrels/test.tsv", hashlib.sha256(qrels).hexdigest())}
    monkeypatch.setitem(assemble.COLLECTIONS, "toy", assemble.Collection("dataset/toy.zip", "0" * 40, files))
    return {"corpus/human.jsonl": corpus, "qrels/test.tsv": qrels, "corpus/llm.jsonl": b"not used\n"}


def test_writes_the_pinned_members_byte_for_byte(tmp_path, toy):
    folder = assemble.assemble("toy", _zip(toy), tmp_path)
    assert folder == tmp_path / "toy"
    assert (folder / "corpus.jsonl").read_bytes() == toy["corpus/human.jsonl"]
    assert (folder / "qrels" / "test.tsv").read_bytes() == toy["qrels/test.tsv"]  # CRLF kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy"]  # no temporary folder left


def test_a_changed_member_is_refused_and_nothing_is_written(tmp_path, toy):
    toy["qrels/test.tsv"] = toy["qrels/test.tsv"].replace(b"\t1", b"\t2")
    with pytest.raises(SystemExit, match="qrels/test.tsv in the toy zip: sha256"):
        assemble.assemble("toy", _zip(toy), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_reassembling_keeps_the_folders_own_files_and_replaces_the_collections(tmp_path, toy):
    folder = tmp_path / "toy"
    (folder / "qrels").mkdir(parents=True)
    (folder / "SOURCE.md").write_text("provenance\n")  # committed beside the data
    (folder / "corpus.jsonl").write_bytes(b"stale\n")
    assemble.assemble("toy", _zip(toy), tmp_path)
    assert (folder / "SOURCE.md").read_text() == "provenance\n"
    assert (folder / "corpus.jsonl").read_bytes() == toy["corpus/human.jsonl"]
