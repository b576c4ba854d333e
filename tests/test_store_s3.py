"""S3Store against a real S3 server (SeaweedFS `weed mini` on 127.0.0.1, keys enforced)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager

import pytest
import urllib3
from minio.error import S3Error

from peg.config import StoreConfig
from peg.store import StoreError, open_store
from peg.store.s3 import S3Store, load_credentials
from s3server import ADMIN, READER, WeedS3
from datetime import UTC

AK_ENV, SK_ENV = "PEG_TEST_S3_ACCESS_KEY", "PEG_TEST_S3_SECRET_KEY"


@pytest.fixture(scope="module")
def bucket(s3_server):
    name = f"peg-{uuid.uuid4().hex[:8]}"
    s3_server.client().make_bucket(name)
    return name


def s3_config(server: WeedS3, bucket: str, prefix: str = "", **overrides) -> StoreConfig:
    uri = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    fields = dict(uri=uri, endpoint=server.endpoint, secure=False, access_key_env=AK_ENV, secret_key_env=SK_ENV)
    fields.update(overrides)
    return StoreConfig(**fields)


@pytest.fixture
def credentials(monkeypatch):
    def use(access_key: str, secret_key: str) -> None:
        monkeypatch.setenv(AK_ENV, access_key)
        monkeypatch.setenv(SK_ENV, secret_key)

    use(*ADMIN)
    return use


@pytest.fixture
def store(s3_server, bucket, credentials):
    return open_store(s3_config(s3_server, bucket, f"t-{uuid.uuid4().hex[:8]}", part_size_mib=5))


def write_random(path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


def test_small_round_trip_with_manifest(store, s3_server, bucket, tmp_path):
    assert isinstance(store, S3Store)
    data = write_random(tmp_path / "in.jsonl", 1000)
    m = store.put_file("run/mine/shard-00000.jsonl", tmp_path / "in.jsonl", producer="mine", config_hash="h1")
    assert (m.size, m.sha256, m.producer, m.config_hash) == (1000, hashlib.sha256(data).hexdigest(), "mine", "h1")
    assert store.manifest("run/mine/shard-00000.jsonl") == m
    assert store.exists("run/mine/shard-00000.jsonl")
    assert store.list() == ["run/mine/shard-00000.jsonl"]
    assert store.local_path("run/mine/shard-00000.jsonl") is None
    out = store.get_file("run/mine/shard-00000.jsonl", tmp_path / "out" / "copy.jsonl")
    assert out.read_bytes() == data
    # The layout in the bucket: object and manifest side by side under the prefix.
    admin = s3_server.client()
    names = sorted(o.object_name for o in admin.list_objects(bucket, prefix=store.prefix + "/", recursive=True))
    assert names == [f"{store.prefix}/run/mine/shard-00000.jsonl", f"{store.prefix}/run/mine/shard-00000.jsonl.manifest.json"]
    stored = json.loads(admin.get_object(bucket, names[1]).read())
    assert stored["sha256"] == m.sha256 and stored["size"] == 1000 and stored["key"] == "run/mine/shard-00000.jsonl"


def test_multipart_round_trip(store, s3_server, bucket, tmp_path):
    data = write_random(tmp_path / "big.bin", 12 << 20)  # 3 parts of 5 MiB
    m = store.put_file("run/train/model.bin", tmp_path / "big.bin", producer="train")
    stat = s3_server.client().stat_object(bucket, f"{store.prefix}/run/train/model.bin")
    assert stat.size == 12 << 20
    assert stat.etag.endswith("-3"), f"expected a 3-part multipart upload, etag {stat.etag}"
    assert m.sha256 == hashlib.sha256(data).hexdigest()
    assert store.exists("run/train/model.bin")
    assert store.get_file("run/train/model.bin", tmp_path / "back.bin").read_bytes() == data


def test_streaming_text_and_bytes(store):
    store.put_bytes("run/prepare/queries.jsonl", b'{"q": 1}\n{"q": 2}\n', producer="prepare")
    with store.open_text("run/prepare/queries.jsonl") as f:
        assert [json.loads(line)["q"] for line in f] == [1, 2]
    assert store.get_bytes("run/prepare/queries.jsonl") == b'{"q": 1}\n{"q": 2}\n'


def test_overwrite_replaces_object_and_manifest(store):
    store.put_bytes("run/x/a", b"v1", producer="x", config_hash="h1")
    store.put_bytes("run/x/a", b"version 2", producer="x", config_hash="h2")
    assert store.get_bytes("run/x/a") == b"version 2"
    assert store.manifest("run/x/a").config_hash == "h2"


def test_list_and_delete_by_path_prefix(store, s3_server, bucket):
    for key in ["run/mine/s0", "run/mine/s1", "run/miner/s0", "run/train/m"]:
        store.put_bytes(key, key.encode(), producer="t")
    # An object without a manifest (a crash between the two puts) is not an artifact...
    s3_server.client().put_object(bucket, f"{store.prefix}/run/mine/s2", io.BytesIO(b"x"), 1)
    assert store.list("run/mine") == ["run/mine/s0", "run/mine/s1"]
    assert not store.exists("run/mine/s2")
    # ...but delete removes it with the rest of the prefix.
    store.delete("run/mine")
    assert store.list("run") == ["run/miner/s0", "run/train/m"]
    left = {o.object_name for o in s3_server.client().list_objects(bucket, prefix=store.prefix + "/", recursive=True)}
    assert not any("/run/mine/" in name for name in left)
    store.delete("run/train/m")
    assert store.list() == ["run/miner/s0"]


def test_corruption_behind_the_stores_back_is_detected(store, s3_server, bucket, tmp_path):
    store.put_bytes("run/x/data.bin", b"0123456789", producer="x")
    name = f"{store.prefix}/run/x/data.bin"
    s3_server.client().put_object(bucket, name, io.BytesIO(b"0123456780"), 10)  # same size
    assert store.exists("run/x/data.bin")  # exists compares sizes; reads compare content
    with pytest.raises(StoreError, match=r"bucket '.*': run/x/data\.bin: sha256 mismatch"):
        store.get_file("run/x/data.bin", tmp_path / "out.bin")
    assert not (tmp_path / "out.bin").exists()
    with pytest.raises(StoreError, match="sha256 mismatch"):
        store.get_bytes("run/x/data.bin")
    s3_server.client().put_object(bucket, name, io.BytesIO(b"012345"), 6)  # truncated
    assert not store.exists("run/x/data.bin")


def test_wrong_secret_fails_at_open_naming_endpoint_and_bucket(s3_server, bucket, credentials):
    credentials(ADMIN[0], "not-the-secret")
    with pytest.raises(StoreError) as e:
        open_store(s3_config(s3_server, bucket))
    message = str(e.value)
    assert f"http://{s3_server.endpoint}" in message and repr(bucket) in message
    assert "authentication failed (SignatureDoesNotMatch" in message and AK_ENV in message


def test_unknown_access_key_fails_at_open(s3_server, bucket, credentials):
    credentials("NOSUCHKEY", "whatever")
    with pytest.raises(StoreError, match=rf"http://{s3_server.endpoint} bucket '{bucket}'.*InvalidAccessKeyId"):
        open_store(s3_config(s3_server, bucket))


def test_read_only_identity_cannot_put(s3_server, bucket, credentials, tmp_path):
    credentials(*READER)
    store = open_store(s3_config(s3_server, bucket, "ro", max_attempts=3))
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(StoreError, match=r"put 'k' failed: access denied"):
        store.put_file("k", tmp_path / "f", producer="t")


def test_missing_bucket_fails_at_open(s3_server, credentials):
    with pytest.raises(StoreError, match=rf"http://{s3_server.endpoint} bucket 'no-such-bucket'.*does not exist"):
        open_store(s3_config(s3_server, "no-such-bucket"))


def test_unreachable_endpoint_fails_at_once(credentials):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = StoreConfig(
        uri="s3://bucket/p", endpoint=f"127.0.0.1:{port}", secure=False,
        access_key_env=AK_ENV, secret_key_env=SK_ENV, max_attempts=5, backoff_seconds=5.0,
    )  # fmt: skip
    start = time.monotonic()
    with pytest.raises(StoreError, match=rf"http://127\.0\.0\.1:{port} bucket 'bucket'.*open failed: cannot reach the endpoint"):
        open_store(config)
    assert time.monotonic() - start < 3.0  # one attempt: a retry alone would sleep 5 s


def test_transient_errors_are_retried_with_backoff(store, monkeypatch, tmp_path):
    real_put = store._transfer.fput_object
    attempts = []

    def flaky_put(*args, **kwargs):
        attempts.append(time.monotonic())
        if len(attempts) == 1:
            raise urllib3.exceptions.ProtocolError("Connection aborted.", ConnectionResetError(104, "reset by peer"))
        if len(attempts) == 2:
            raise S3Error(urllib3.HTTPResponse(status=503), "SlowDown", "Please reduce your request rate.", "/", "r", "h")
        return real_put(*args, **kwargs)

    monkeypatch.setattr(store._transfer, "fput_object", flaky_put)
    store.backoff_seconds = 0.05
    data = write_random(tmp_path / "f", 100)
    store.put_file("run/x/flaky", tmp_path / "f", producer="x")
    assert len(attempts) == 3
    assert attempts[2] - attempts[1] >= 2 * (attempts[1] - attempts[0]) * 0.9  # the delay doubles
    assert store.get_bytes("run/x/flaky") == data


def test_persistent_transient_errors_give_up_after_max_attempts(store, monkeypatch, tmp_path):
    attempts = []

    def always_busy(*args, **kwargs):
        attempts.append(1)
        raise S3Error(urllib3.HTTPResponse(status=503), "SlowDown", "Please reduce your request rate.", "/", "r", "h")

    monkeypatch.setattr(store._transfer, "fput_object", always_busy)
    store.backoff_seconds, store.max_attempts = 0.01, 4
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(StoreError, match=r"put 'run/x/busy' failed after 4 attempts: SlowDown"):
        store.put_file("run/x/busy", tmp_path / "f", producer="x")
    assert len(attempts) == 4
    assert not store.exists("run/x/busy")


@pytest.mark.slow
def test_server_killed_mid_upload_leaves_no_partial_object(tmp_path, credentials):
    server = WeedS3(tmp_path / "server")
    server.start()
    try:
        server.client().make_bucket("crash")
        store = open_store(s3_config(server, "crash", "run", part_size_mib=5, max_attempts=3, backoff_seconds=0.1))
        store.put_bytes("kept/a.txt", b"survives", producer="t")
        write_random(tmp_path / "big.bin", 30 << 20)  # 6 parts
        real_upload_part = store._transfer._upload_part
        parts_sent = []

        def upload_part_then_crash(*args):
            parts_sent.append(args[5])
            if len(parts_sent) == 2:
                server.kill()  # the server dies while the multipart upload is in flight
            return real_upload_part(*args)

        store._transfer._upload_part = upload_part_then_crash
        expected = rf"http://{server.endpoint} bucket 'crash'.*put 'big/model.bin' failed after 3 attempts: cannot reach the endpoint"
        with pytest.raises(StoreError, match=expected):
            store.put_file("big/model.bin", tmp_path / "big.bin", producer="train")
        assert len(parts_sent) >= 2

        server.start()  # same data directory and ports
        names = sorted(o.object_name for o in server.client().list_objects("crash", recursive=True))
        assert names == ["run/kept/a.txt", "run/kept/a.txt.manifest.json"]
        store = open_store(s3_config(server, "crash", "run"))
        assert not store.exists("big/model.bin")
        assert store.list() == ["kept/a.txt"]
        assert store.get_bytes("kept/a.txt") == b"survives"
    finally:
        server.kill()


def test_credentials_from_a_mounted_secret_directory(s3_server, bucket, tmp_path, monkeypatch):
    monkeypatch.delenv(AK_ENV, raising=False)
    monkeypatch.delenv(SK_ENV, raising=False)
    secret = tmp_path / "secret"  # the layout of a Kubernetes Secret volume: one file per key
    secret.mkdir()
    (secret / AK_ENV).write_text(ADMIN[0])
    (secret / SK_ENV).write_text(ADMIN[1] + "\n")
    store = open_store(s3_config(s3_server, bucket, "from-secret", credentials_file=str(secret)))
    store.put_bytes("k", b"v", producer="t")
    assert store.get_bytes("k") == b"v"


def test_credentials_from_an_env_file(tmp_path, monkeypatch):
    monkeypatch.delenv(AK_ENV, raising=False)
    monkeypatch.delenv(SK_ENV, raising=False)
    env_file = tmp_path / "s3.env"
    env_file.write_text(f"# peg S3\n{AK_ENV}=AK1\nexport {SK_ENV}='SK1'\n")
    config = StoreConfig(uri="s3://b", endpoint="h:1", access_key_env=AK_ENV, secret_key_env=SK_ENV,
                         credentials_file=str(env_file))  # fmt: skip
    assert load_credentials(config) == ("AK1", "SK1")
    monkeypatch.setenv(AK_ENV, "AK2")
    monkeypatch.setenv(SK_ENV, "SK2")
    assert load_credentials(config) == ("AK2", "SK2")  # the environment wins
    env_file.write_text(f"{AK_ENV}=AK1\n")
    monkeypatch.delenv(SK_ENV)
    with pytest.raises(StoreError, match=rf"s3.env: no value for {SK_ENV}"):
        load_credentials(config)


def test_missing_credentials_and_endpoint_are_clear_errors(monkeypatch):
    monkeypatch.delenv(AK_ENV, raising=False)
    monkeypatch.delenv(SK_ENV, raising=False)
    config = StoreConfig(uri="s3://b/p", endpoint="127.0.0.1:1", access_key_env=AK_ENV, secret_key_env=SK_ENV)
    with pytest.raises(StoreError, match=rf"no S3 credentials: environment variable\(s\) {AK_ENV}, {SK_ENV} not set"):
        open_store(config)
    with pytest.raises(StoreError, match="store.endpoint is required for s3://b/p"):
        open_store(StoreConfig(uri="s3://b/p"))


def test_dropped_download_is_retried_and_leaves_no_partial_file(store, monkeypatch, tmp_path):
    data = write_random(tmp_path / "f", 3 << 20)
    store.put_file("run/x/dl", tmp_path / "f", producer="x")
    real_get = store._transfer.get_object
    calls = []

    class DropsAfterOneChunk:
        def __init__(self, response):
            self._response, self._reads = response, 0

        def read(self, n):
            self._reads += 1
            if self._reads > 1:
                raise urllib3.exceptions.ProtocolError("Connection broken: IncompleteRead")
            return self._response.read(n)

        def close(self):
            self._response.close()

        def release_conn(self):
            self._response.release_conn()

    def get_object(bucket_name, object_name, *args, **kwargs):
        response = real_get(bucket_name, object_name, *args, **kwargs)
        if object_name.endswith(".manifest.json"):
            return response
        calls.append(object_name)
        return DropsAfterOneChunk(response) if len(calls) == 1 else response

    monkeypatch.setattr(store._transfer, "get_object", get_object)
    store.backoff_seconds = 0.01
    out = tmp_path / "dl" / "out.bin"
    assert store.get_file("run/x/dl", out).read_bytes() == data
    assert len(calls) == 2
    assert [p.name for p in out.parent.iterdir()] == ["out.bin"]  # no temp file left from the first try


def test_store_pickles_as_its_config(store):
    store.put_bytes("run/x/p", b"payload", producer="x")
    copy = pickle.loads(pickle.dumps(store))
    assert copy is not store and copy.config == store.config
    assert copy.get_bytes("run/x/p") == b"payload"


CLIENT_KILLED_MID_UPLOAD = """
import json, os, signal, sys
from peg.config import StoreConfig
from peg.store import open_store

store = open_store(StoreConfig(**json.loads(sys.argv[1])))
real_upload_part = store._transfer._upload_part
parts = []

def upload_part_then_die(*args):
    parts.append(args[5])
    if len(parts) == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # the peg process dies (OOM, preemption) mid-upload
    return real_upload_part(*args)

store._transfer._upload_part = upload_part_then_die
store.put_file(sys.argv[3], sys.argv[2], producer="train")
"""


def killed_mid_upload(store: S3Store, local, key: str) -> None:
    """A peg process putting `local` at `key` is killed (SIGKILL) after its third part."""
    proc = subprocess.run(
        [sys.executable, "-c", CLIENT_KILLED_MID_UPLOAD, store.config.model_dump_json(), str(local), key],
        env=os.environ.copy(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def test_client_killed_mid_upload_leaves_no_object(store, s3_server, bucket, tmp_path):
    write_random(tmp_path / "big.bin", 20 << 20)  # 4 parts of 5 MiB
    killed_mid_upload(store, tmp_path / "big.bin", "big/model.bin")
    admin = s3_server.client()
    name = f"{store.prefix}/big/model.bin"
    pending = admin._list_multipart_uploads(bucket, prefix=name).uploads
    assert [u.object_name for u in pending] == [name]  # the upload was in flight when the process died...
    assert list(admin.list_objects(bucket, prefix=f"{store.prefix}/big/", recursive=True)) == []  # ...and is invisible
    assert not store.exists("big/model.bin")
    assert store.list("big") == []
    data = write_random(tmp_path / "big.bin", 11 << 20)  # a rerun of the stage puts it cleanly
    store.put_file("big/model.bin", tmp_path / "big.bin", producer="train")
    assert store.get_bytes("big/model.bin") == data


def test_a_run_taken_over_aborts_the_uploads_its_killed_holder_left_and_no_others(store, s3_server, bucket, tmp_path,
                                                                                   caplog):
    """Issue 30: a kill during a large upload leaves an incomplete multipart upload (billed,
    listed as no object). The next holder of the run's lease aborts those under the run's prefix
    that started before it took the lease, says so in the log, and leaves every other upload."""
    from datetime import datetime

    from peg.store.lease import Lease

    write_random(tmp_path / "big.bin", 20 << 20)  # 4 parts of 5 MiB
    killed_mid_upload(store, tmp_path / "big.bin", "run/train/model.bin")
    admin = s3_server.client()
    other = [f"{store.prefix}/run2/train/model.bin", f"{store.prefix}/other/train/model.bin"]  # not the run's
    for name in other:
        admin._create_multipart_upload(bucket, name, {})

    def pending() -> list[str]:
        return sorted(u.object_name for u in admin._list_multipart_uploads(bucket, prefix=f"{store.prefix}/").uploads)

    assert pending() == sorted([f"{store.prefix}/run/train/model.bin", *other])
    with caplog.at_level("WARNING", logger="peg.store.lease"), Lease(store, "run", ttl=30):
        assert pending() == sorted(other)
        taken = datetime.now(UTC)
        time.sleep(1.1)  # S3 times have whole seconds
        admin._create_multipart_upload(bucket, f"{store.prefix}/run/eval/new.bin", {})  # started after: not stale
        assert store.abort_interrupted_uploads("run", taken) == []
        assert f"{store.prefix}/run/eval/new.bin" in pending()
    assert ("run 'run': aborted 1 interrupted multipart upload(s) an earlier process left: run/train/model.bin"
            in caplog.messages)
    assert store.abort_interrupted_uploads("run", datetime.now(UTC)) == ["run/eval/new.bin"]
    assert pending() == sorted(other)


def test_large_transfers_show_byte_progress(store, monkeypatch, tmp_path):
    bars = []

    @contextmanager
    def recording_bar(total, description, enabled=True, unit="it"):
        done = []
        bars.append((description, total, enabled, unit, done))
        yield done.append

    monkeypatch.setattr("peg.store.s3.progress_bar", recording_bar)
    monkeypatch.setattr("peg.store.s3.PROGRESS_MIN_BYTES", 6 << 20)
    write_random(tmp_path / "big.bin", 7 << 20)
    store.put_file("run/x/big", tmp_path / "big.bin", producer="x")
    store.get_file("run/x/big", tmp_path / "back.bin")
    (tmp_path / "small").write_bytes(b"s")
    store.put_file("run/x/small", tmp_path / "small", producer="x")
    summary = [(d, t, e, u, sum(done)) for d, t, e, u, done in bars]
    assert summary == [
        ("upload run/x/big", 7 << 20, True, "B", 7 << 20),
        ("download run/x/big", 7 << 20, True, "B", 7 << 20),
        ("upload run/x/small", 1, False, "B", 1),
    ]
