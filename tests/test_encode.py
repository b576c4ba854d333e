"""Ray Data encoding: equals the in-process encoder, stored in shards with ids, cached by model + data hash."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from tiny import make_tiny_model

import peg.runtime.embeddings as encode_module
from peg.config import RunConfig, StoreConfig
from peg.data import DataError, Passage
from peg.runtime import encode_corpus
from peg.runtime.embeddings import cache_key
from peg.model import Encoder
from peg.store import open_store


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def passages(n: int = 120) -> list[Passage]:
    rng = np.random.default_rng(0)
    words = "alpha beta gamma delta protein cell gene virus star orbit bread oven market loan song".split()
    return [
        Passage(f"p{i}", f"title {i}" if i % 3 else "", " ".join(rng.choice(words, size=3 + i % 40)))
        for i in range(n)
    ]


def make_config(model_dir, tmp_path, **encode) -> RunConfig:
    return RunConfig.model_validate({
        "name": "enc",
        "model": {"name_or_path": str(model_dir), "passage_max_length": 48, "query_max_length": 16},
        "encode": {"batch_size": 16, "num_actors": 2, "actor_cpus": 0.5, "shard_size": 50, "in_process_below": 0, **encode},
        "store": {"uri": str(tmp_path / "store")},
    })


@pytest.fixture(scope="module")
def encoded(ray_local, model_dir, tmp_path_factory):
    """The corpus encoded once on 2 Ray actors: (config, store, passages, embeddings)."""
    config = make_config(model_dir, tmp_path_factory.mktemp("encode"))
    store = open_store(config.store)
    corpus = passages()
    return config, store, corpus, encode_corpus(config, store, corpus)


def test_encode_equals_in_process_encoder_and_second_call_is_a_cache_hit(encoded, monkeypatch):
    config, store, corpus, emb = encoded
    assert emb.ids == [p.id for p in corpus]
    want = Encoder(config.model).encode([p.full_text for p in corpus], "passage", batch_size=7)
    np.testing.assert_allclose(emb.matrix, want, atol=2e-6)
    # Three shards of <= 50 rows with their ids, and an index written last.
    keys = sorted(store.list(emb.key))
    assert keys == [f"{emb.key}/{name}" for name in ("index.json", "shard-00000.npz", "shard-00001.npz", "shard-00002.npz")]
    with np.load(store.local_path(f"{emb.key}/shard-00002.npz")) as shard:
        assert shard["ids"].tolist() == [p.id for p in corpus[100:]]
        np.testing.assert_array_equal(shard["embeddings"], emb.matrix[100:])
    index = json.loads(store.local_path(f"{emb.key}/index.json").read_text())
    assert index["count"] == 120 and index["dim"] == 32 and index["settings"]["max_length"] == 48

    def no_model_run(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(encode_module, "_encode_shards", no_model_run)
    again = encode_corpus(config, store, corpus)
    assert again.ids == emb.ids and np.array_equal(again.matrix, emb.matrix)


def test_few_texts_are_encoded_in_this_process_without_ray_and_equal_the_actors(encoded, tmp_path, monkeypatch):
    """Below `encode.in_process_below` no actor pool runs and the stored shards hold the embeddings
    the actor pool gives, in the same layout."""
    config, _, corpus, on_ray = encoded
    here = config.model_copy(deep=True)
    here.encode.in_process_below = len(corpus) + 1
    here.store.uri = str(tmp_path / "here")

    def no_actors(*args, **kwargs):
        raise AssertionError("an actor pool ran for a small input")

    monkeypatch.setattr(encode_module, "_embedded_on_ray", no_actors)
    store = open_store(here.store)
    emb = encode_corpus(here, store, corpus)
    assert emb.ids == on_ray.ids and emb.key == on_ray.key  # same cache entry: the path is not part of the key
    np.testing.assert_allclose(emb.matrix, on_ray.matrix, atol=2e-6)
    assert sorted(k.rsplit("/", 1)[1] for k in store.list(emb.key)) == ["index.json", *(f"shard-0000{i}.npz" for i in range(3))]


def test_a_missing_shard_is_reencoded_alone(encoded, monkeypatch):
    config, store, corpus, first = encoded
    store.delete(f"{first.key}/shard-00001.npz")

    calls = []
    real = encode_module._encode_shards

    def spy(*args, **kwargs):
        calls.append(args[7])  # the shard numbers it was asked to encode
        return real(*args, **kwargs)

    monkeypatch.setattr(encode_module, "_encode_shards", spy)
    second = encode_corpus(config, store, corpus)
    assert calls == [[1]]
    assert second.ids == first.ids
    np.testing.assert_allclose(second.matrix, first.matrix, atol=2e-6)
    np.testing.assert_array_equal(second.matrix[:50], first.matrix[:50])  # shard 0 was read back, not redone


def test_cache_key_follows_model_weights_settings_and_data(model_dir, tmp_path):
    config = make_config(model_dir, tmp_path)
    ids, texts = ["a", "b"], ["one text", "another text"]
    base = cache_key(config.model, "passage", ids, texts)
    assert cache_key(config.model, "passage", ids, texts) == base
    assert cache_key(config.model, "query", ids, texts) != base
    assert cache_key(config.model, "passage", ids, ["one text", "changed"]) != base
    assert cache_key(config.model, "passage", ["a", "c"], texts) != base
    for change in ({"passage_prefix": "passage: "}, {"passage_max_length": 47}, {"pooling": "cls"}, {"normalize": False}):
        assert cache_key(config.model.model_copy(update=change), "passage", ids, texts) != base, change
    assert cache_key(config.model.model_copy(update={"query_prefix": "q: "}), "passage", ids, texts) == base
    # Same folder contents elsewhere: same key. One weight byte changed: a new key.
    copy = shutil.copytree(model_dir, tmp_path / "copy")
    moved = config.model.model_copy(update={"name_or_path": str(copy)})
    assert cache_key(moved, "passage", ids, texts) == base
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert cache_key(moved, "passage", ids, texts) != base


def test_empty_corpus_file_is_a_clear_error(model_dir, tmp_path):
    folder = tmp_path / "beir"
    folder.mkdir()
    (folder / "corpus.jsonl").write_text("\n")
    config = make_config(model_dir, tmp_path)
    with pytest.raises(DataError, match=r"corpus\.jsonl: the corpus has no passages"):
        encode_corpus(config, open_store(StoreConfig(uri=str(tmp_path / "store"))), folder)


def test_an_actor_on_another_node_loads_the_drivers_local_model_from_its_shipped_files(ray_local, model_dir, tmp_path):
    """On a Ray cluster of several nodes (a RayJob's head and worker pods) a trained model lives in
    the driver's work folder only: the actor gets the folder's files as a Ray object, writes them
    to its own temporary folder and encodes exactly as the driver's copy does."""
    import ray

    from peg.config import ModelConfig
    from peg.runtime.embeddings import _EncoderActor, model_folder_files

    gone = tmp_path / "driver-work" / "model"  # the driver's path, absent where the actor runs
    model = ModelConfig(name_or_path=str(gone)).model_dump()
    actor = _EncoderActor(model, "passage", 1, model_files=ray.put(model_folder_files(model_dir)))
    texts = np.array(["a passage about tides", "another about bees"], dtype=object)
    got = actor({"row": np.arange(2), "text": texts})["embedding"]
    want = Encoder(ModelConfig(name_or_path=str(model_dir))).encode(list(texts), "passage")
    np.testing.assert_allclose(got, want, atol=1e-6)
    with pytest.raises(OSError):  # without the files the path is missing there
        _EncoderActor(model, "passage", 1)
