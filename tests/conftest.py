"""Shared pytest fixtures."""

from __future__ import annotations

import pytest

from s3server import WeedS3


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
