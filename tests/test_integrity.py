"""Integrity pieces that need no pipeline run: verified reads, files written with the usual
umask, clean copies, the silent-endpoint fail-fast, paths relative to the config file, read-only
commands that create nothing. (The run lease: tests/test_lease.py; stored checkpoints that do not
verify: tests/test_checkpoint_store.py; the report's tables: tests/test_report.py.)"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from peg.config import load_config
from peg.pipeline.state import StageRecord, check_stage, write_record
from peg.store import IntegrityError, LocalStore, open_store
from peg.store.lease import read_lease
from tiny import flip_stored_byte


def test_every_read_verifies_and_names_the_key(store, tmp_path):
    store.put_json("run/mine/stats.json", {"kept": 3}, "mine")
    assert store.read_json("run/mine/stats.json") == {"kept": 3}
    assert store.verify("run/mine/stats.json").size == len(store.read_text("run/mine/stats.json"))
    flip_stored_byte(store, "run/mine/stats.json")
    for read in (store.read_text, store.read_json, store.verify, lambda k: store.materialise(k, tmp_path / "m")):
        with pytest.raises(IntegrityError) as caught:
            read("run/mine/stats.json")
        assert caught.value.key == "run/mine/stats.json"
    assert not (tmp_path / "m" / "stats.json").exists()


def test_a_damaged_stage_record_reads_as_partial(store):
    write_record(store, "run/mine", StageRecord("mine", "h", "complete", {}))
    assert check_stage(store, "run/mine", "h", {}).state == "complete"
    flip_stored_byte(store, "run/mine/_stage.json")
    check = check_stage(store, "run/mine", "h", {})
    assert (check.state, "damaged record" in check.detail) == ("partial", True)


def test_a_flipped_output_makes_its_stage_invalid_naming_the_artifact(store):
    manifest = store.put_text("run/mine/train.jsonl", '{"query": "q"}\n', "mine")
    write_record(store, "run/mine", StageRecord("mine", "h", "complete", {manifest.key: manifest.sha256}))
    flip_stored_byte(store, "run/mine/train.jsonl")
    check = check_stage(store, "run/mine", "h", {})
    assert (check.state, check.record.failed) == ("invalid", "run/mine/train.jsonl")
    assert "run/mine/train.jsonl" in check.detail


def test_files_are_written_with_the_usual_umask(tmp_path):
    old = os.umask(0o022)
    try:
        store = LocalStore(tmp_path / "store")
        store.put_text("run/export/model/config.json", "{}", "export")
        copy = store.materialise_prefix("run/export/model", tmp_path / "copy")
    finally:
        os.umask(old)
    for path in (store.local_path("run/export/model/config.json"),
                 Path(str(store.local_path("run/export/model/config.json")) + ".manifest.json"),
                 copy / "config.json"):
        assert path.stat().st_mode & 0o777 == 0o644, path


def test_a_clean_copy_has_no_manifests(tmp_path):
    store = LocalStore(tmp_path / "store")
    for name in ("config.json", "1_Pooling/config.json", "model.safetensors"):
        store.put_text(f"run/export/model/{name}", name, "export")
    copy = store.materialise_prefix("run/export/model", tmp_path / "copy")
    assert sorted(p.relative_to(copy).as_posix() for p in copy.rglob("*") if p.is_file()) == [
        "1_Pooling/config.json", "config.json", "model.safetensors"]


def _peg(*args, cwd=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "peg", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env={**os.environ, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"})


@pytest.mark.slow
def test_a_silent_endpoint_fails_fast_saying_what_it_waited_for(tmp_path):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held = []
    stop = threading.Event()

    def accept_and_say_nothing():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append((server.accept()[0], time.monotonic()))
            except OSError:
                continue

    thread = threading.Thread(target=accept_and_say_nothing, daemon=True)
    thread.start()
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": {"name_or_path": "m"}, "store": {
        "uri": "s3://bucket/run", "endpoint": f"127.0.0.1:{server.getsockname()[1]}", "secure": False}}))
    try:
        started = time.monotonic()
        result = _peg("store", "ls", str(config))
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        thread.join()
        for conn, _ in held:
            conn.close()
        server.close()
    assert result.returncode == 2, result.stderr
    assert held, "the probe never connected"
    # From the probe's connection to the error: the store.connect_timeout (5 s), no retry. Python's
    # start and imports come before it (about 1.5 s on an idle machine; more on a loaded one).
    waited = elapsed - (held[0][1] - started)
    assert waited < 10, (waited, elapsed)
    assert elapsed < 15 or waited < 10, elapsed
    message = " ".join(result.stderr.split())
    assert "sent no answer to a bucket listing within 5 s" in message and "Traceback" not in result.stderr


def test_relative_paths_follow_the_config_file_not_the_working_directory(tmp_path):
    (tmp_path / "proj" / "tiny").mkdir(parents=True)
    (tmp_path / "elsewhere" / "tiny").mkdir(parents=True)  # a decoy beside the working directory
    config = tmp_path / "proj" / "run.yaml"
    config.write_text(yaml.safe_dump({"data": {"beir": "tiny", "train_files": ["pairs.jsonl"]},
                                      "model": {"name_or_path": "org/hub-model"}, "store": {"uri": "out"}}))
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path / "elsewhere")
        loaded = load_config(config)
    finally:
        os.chdir(cwd)
    assert loaded.data.beir == str(tmp_path / "proj" / "tiny")
    assert loaded.data.train_files == [str(tmp_path / "proj" / "pairs.jsonl")]  # not yet there: still beside the config
    assert loaded.store.uri == str(tmp_path / "proj" / "out")
    assert loaded.model.name_or_path == "org/hub-model"  # a hub id stays one


def test_read_only_commands_create_nothing_and_say_when_empty(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"name": "r", "model": {"name_or_path": "m"}, "store": {"uri": "mistyped"}}))
    status = _peg("pipeline", "status", str(config))
    listing = _peg("store", "ls", str(config))
    assert status.returncode == 0 and "pending" in status.stdout, status.stderr
    assert listing.returncode == 0 and "no artifacts under '(the whole store)'" in listing.stderr
    assert not (tmp_path / "mistyped").exists()


@pytest.mark.slow
def test_a_failed_prepare_leaves_no_running_record(tmp_path):
    (tmp_path / "beir").mkdir()  # no corpus.jsonl
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"name": "r", "data": {"beir": "beir"}, "model": {"name_or_path": "m"},
                                      "store": {"uri": "store"}}))
    result = _peg("pipeline", "stage", "prepare", str(config))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    store = LocalStore(tmp_path / "store")
    assert store.list("r") == [] and read_lease(store, "r") is None
    assert "pending" in _peg("pipeline", "status", str(config)).stdout


@pytest.mark.slow
@pytest.mark.parametrize("store", ["s3"], indirect=True)  # a local store's lines were already its paths
def test_the_final_model_and_report_lines_are_usable_locations(store):
    from peg.config import RunConfig
    from peg.pipeline import pipeline_results

    config = RunConfig.model_validate({"name": "run", "model": {"name_or_path": "m"}, "store": {"uri": f"s3://{store.bucket}/p"}})
    scores = {"ndcg@10": 0.5, "map@100": 0.4, "mrr@10": 0.5, "recall@10": 0.6, "recall@100": 0.9}
    store.put_json("run/eval/summary.json", {"split": "test", "metrics": {"base": scores, "fine-tuned": scores}}, "eval")
    store.put_text("run/export/model/modules.json", "[]", "export")
    store.put_text("run/report/report.html", "<html></html>", "report")
    lines = pipeline_results(config, store)
    where = f"s3://{store.bucket}/p"
    assert lines[-2] == f"model: {where}/run/export/model/" and lines[-1] == f"report: {where}/run/report/report.html"


@pytest.mark.slow
def test_cached_embeddings_of_another_model_are_never_used(tmp_path):
    """A shard put under this model's cache key by anything else (here: another model's shard,
    with a manifest) is re-encoded, not read."""
    import numpy as np
    from tiny import make_tiny_model

    from peg.config import RunConfig
    from peg.data import Passage
    from peg.runtime import encode_corpus

    corpus = [Passage(f"p{i}", "", f"passage number {i} about topic {i % 3}") for i in range(6)]

    def config(model: Path) -> RunConfig:
        return RunConfig.model_validate({"name": "c", "model": {"name_or_path": str(model), "passage_max_length": 16},
                                         "encode": {"in_process_below": 100}, "store": {"uri": str(tmp_path / "store")}})

    first, second = config(make_tiny_model(tmp_path / "a", seed=0)), config(make_tiny_model(tmp_path / "b", seed=1))
    store = open_store(first.store)
    theirs = encode_corpus(first, store, corpus)
    wanted = encode_corpus(second, LocalStore(tmp_path / "clean"), corpus)
    shard = next(k for k in store.list(theirs.key) if k.endswith(".npz"))
    forged = wanted.key + shard[len(theirs.key):]
    store.put_file(forged, store.local_path(shard), producer="encode", config_hash=store.manifest(shard).config_hash)
    ours = encode_corpus(second, store, corpus)
    assert ours.key == wanted.key and not np.allclose(ours.matrix, theirs.matrix)
    np.testing.assert_array_equal(ours.matrix, wanted.matrix)


def test_an_s3_operation_warns_on_the_console_once_then_logs_its_retries(caplog):
    import types

    import urllib3

    from peg.store.s3 import S3Store

    fake = types.SimpleNamespace(backoff_seconds=0.001, max_attempts=5, describe=lambda: "S3 store x",
                                 _explain=lambda e: "connection reset")
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 4:
            raise urllib3.exceptions.ProtocolError("connection reset")
        return "ok"

    with caplog.at_level("INFO"):
        assert S3Store._call(fake, "put 'k'", flaky) == "ok"
    retries = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert [r.name for r in retries] == ["peg.store.s3", "root", "root"]  # the console shows the first only
    assert [r.levelname for r in retries] == ["WARNING", "INFO", "INFO"]
