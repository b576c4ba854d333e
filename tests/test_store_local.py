"""LocalStore: atomic writes, manifests, verified reads, listing and deletion by prefix."""

from __future__ import annotations

import hashlib
import os

import pytest

from peg.config import StoreConfig
from peg.store import LocalStore, StoreError, open_store
from peg.store.base import MANIFEST_SUFFIX


@pytest.fixture
def store(tmp_path):
    return open_store(StoreConfig(uri=str(tmp_path / "artifacts")))


def test_open_store_picks_local_for_a_path(tmp_path):
    store = open_store(StoreConfig(uri=str(tmp_path / "a")))
    assert isinstance(store, LocalStore)
    assert store.root == tmp_path / "a"


def test_round_trip_with_manifest(store, tmp_path):
    data = os.urandom(3 * (1 << 20) + 17)  # several read chunks
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    m = store.put_file("run/mine/shard-00000.jsonl", src, producer="mine", config_hash="abc")
    assert (m.key, m.size, m.sha256, m.producer, m.config_hash) == (
        "run/mine/shard-00000.jsonl", len(data), hashlib.sha256(data).hexdigest(), "mine", "abc"
    )
    assert store.manifest("run/mine/shard-00000.jsonl") == m
    assert store.exists("run/mine/shard-00000.jsonl")
    assert store.local_path("run/mine/shard-00000.jsonl").read_bytes() == data
    out = store.get_file("run/mine/shard-00000.jsonl", tmp_path / "out" / "copy.bin")
    assert out.read_bytes() == data
    assert store.get_bytes("run/mine/shard-00000.jsonl") == data


def test_put_bytes_and_open_text_stream_lines(store):
    store.put_bytes("run/prepare/meta.jsonl", b'{"a": 1}\n{"a": 2}\n', producer="prepare")
    with store.open_text("run/prepare/meta.jsonl") as f:
        assert [line.strip() for line in f] == ['{"a": 1}', '{"a": 2}']


def test_exists_needs_the_manifest_and_a_consistent_size(store, tmp_path):
    store.put_bytes("run/x/a.bin", b"hello", producer="x")
    manifest_file = store.root / ("run/x/a.bin" + MANIFEST_SUFFIX)
    object_file = store.root / "run/x/a.bin"
    object_file.write_bytes(b"hello world")  # size no longer matches the manifest
    assert not store.exists("run/x/a.bin")
    object_file.write_bytes(b"hello")
    assert store.exists("run/x/a.bin")
    manifest_file.unlink()
    assert not store.exists("run/x/a.bin")
    assert store.manifest("run/x/a.bin") is None
    assert store.list("run") == []  # an object without a manifest is not an artifact
    with pytest.raises(StoreError, match="run/x/a.bin.*manifest is missing"):
        store.get_file("run/x/a.bin", tmp_path / "o")


def test_corruption_is_detected_on_read_and_leaves_no_output(store, tmp_path):
    store.put_bytes("run/x/a.bin", b"0123456789", producer="x")
    (store.root / "run/x/a.bin").write_bytes(b"0123456780")  # same size, different bytes
    assert store.exists("run/x/a.bin")  # exists checks size only; reads check content
    with pytest.raises(StoreError, match=r"run/x/a\.bin: sha256 mismatch"):
        store.get_file("run/x/a.bin", tmp_path / "out.bin")
    assert not (tmp_path / "out.bin").exists()
    assert list(tmp_path.glob(".peg-tmp-*")) == []
    with pytest.raises(StoreError, match="sha256 mismatch"):
        store.get_bytes("run/x/a.bin")


def test_failure_mid_write_leaves_no_file_and_no_manifest(store, tmp_path, monkeypatch):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(1 << 20))

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("peg.store.local.os.fsync", disk_full)
    with pytest.raises(StoreError, match="cannot write 'run/x/new.bin'.*No space left"):
        store.put_file("run/x/new.bin", src, producer="x")
    monkeypatch.undo()
    assert sorted(p.name for p in (store.root / "run/x").iterdir()) == []
    assert not store.exists("run/x/new.bin")


def test_failed_overwrite_keeps_the_previous_artifact(store, tmp_path, monkeypatch):
    store.put_bytes("run/x/a.bin", b"version 1", producer="x", config_hash="h1")
    src = tmp_path / "v2.bin"
    src.write_bytes(b"version 2, longer")
    monkeypatch.setattr("peg.store.local.os.fsync", lambda fd: (_ for _ in ()).throw(OSError(5, "I/O error")))
    with pytest.raises(StoreError):
        store.put_file("run/x/a.bin", src, producer="x", config_hash="h2")
    monkeypatch.undo()
    assert store.get_bytes("run/x/a.bin") == b"version 1"
    assert store.manifest("run/x/a.bin").config_hash == "h1"
    assert sorted(p.name for p in (store.root / "run/x").iterdir()) == ["a.bin", "a.bin" + MANIFEST_SUFFIX]


def test_list_and_delete_by_path_prefix(store):
    for key in ["run/mine/s0", "run/mine/s1", "run/miner/s0", "run/train/model.bin", "other/x"]:
        store.put_bytes(key, key.encode(), producer="t")
    assert store.list("run/mine") == ["run/mine/s0", "run/mine/s1"]
    assert store.list("run/mine/s1") == ["run/mine/s1"]
    assert store.list() == sorted(["run/mine/s0", "run/mine/s1", "run/miner/s0", "run/train/model.bin", "other/x"])
    store.delete("run/mine")
    assert store.list("run") == ["run/miner/s0", "run/train/model.bin"]
    store.delete("run/train/model.bin")
    assert store.list("run") == ["run/miner/s0"]
    assert not (store.root / ("run/train/model.bin" + MANIFEST_SUFFIX)).exists()
    store.delete("")
    assert store.list() == []


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b", "a/", "x.manifest.json", "a/.peg-tmp-1", "a b"])
def test_invalid_keys_are_rejected(store, key):
    with pytest.raises(StoreError, match="invalid artifact key"):
        store.put_bytes(key, b"x", producer="t")


def test_unsupported_scheme_is_a_clear_error():
    with pytest.raises(StoreError, match="unsupported scheme"):
        open_store(StoreConfig(uri="gs://bucket/prefix"))


def test_cli_store_ls_lists_artifacts_with_size_and_producer(tmp_path):
    from typer.testing import CliRunner

    from peg.cli import app

    store = LocalStore(tmp_path / "artifacts")
    store.put_bytes("demo/mine/shard-00000.jsonl", b"x" * 1234, producer="mine")
    store.put_bytes("demo/train/model.bin", b"y" * 10, producer="train")
    config = tmp_path / "run.yaml"
    config.write_text("name: demo\nmodel: {name_or_path: m}\nstore: {uri: ./artifacts}\n")
    result = CliRunner().invoke(app, ["store", "ls", str(config), "demo/mine"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    assert lines[0].split()[0] == "1,234" and lines[0].split()[1] == "mine"
    assert lines[0].endswith("demo/mine/shard-00000.jsonl")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name_or_path: m}\nstore: {uri: 's3://b/p'}\n")
    result = CliRunner().invoke(app, ["store", "ls", str(bad)])
    assert result.exit_code == 2 and "store.endpoint is required" in result.output
