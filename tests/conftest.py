"""Shared pytest fixtures, and the `slow` marker's rule.

A test is `slow` when it starts something that costs seconds: torchrun, Ray, the S3 server, kopf,
docker or a real model. Modules and tests mark themselves (`pytestmark = pytest.mark.slow`,
`@pytest.mark.slow`); a test that uses one of `SLOW_FIXTURES` is marked here, so the fast lane
(`pytest -m "not slow"`) never starts one.
"""

from __future__ import annotations

import os

import pytest

from peg.config import StoreConfig
from peg.store import LocalStore, open_store
from s3server import ADMIN, WeedS3

SLOW_FIXTURES = {"ray_local", "s3_server", "tiny_llama_dir", "tiny_cross_encoder_dir"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def log_dir(tmp_path_factory):
    """peg commands write their log files under the session's temp folder, not ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PEG_LOG_DIR", str(tmp_path_factory.mktemp("peg-logs")))
        yield


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS) on 127.0.0.1 with enforced keys, started once per session."""
    server = WeedS3(tmp_path_factory.mktemp("s3server"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny random Llama with the SmolLM2 tokenizer, built once per session (the tokenizer's
    GGUF conversion takes seconds)."""
    from tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_cross_encoder_dir(tmp_path_factory):
    """A tiny random one-label BERT reranker, built once per session."""
    from tiny import make_tiny_cross_encoder

    return make_tiny_cross_encoder(tmp_path_factory.mktemp("tiny-ce"))


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray on 2 CPUs for the module's tests, shut down after them."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.slow)])
def store(request, tmp_path, monkeypatch):
    """A fresh artifact store, once local and once on the S3 server (a bucket of its own, the
    admin keys in the environment); a module may define its own `store`."""
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    server = request.getfixturevalue("s3_server")
    bucket = f"store-{os.urandom(4).hex()}"
    server.client().make_bucket(bucket)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ADMIN[0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ADMIN[1])
    return open_store(StoreConfig(uri=f"s3://{bucket}/p", endpoint=server.endpoint, secure=False))
