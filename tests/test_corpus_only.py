"""Corpus-only training: a BEIR folder with only corpus.jsonl drives synth -> encode -> mine ->
score -> pretrain -> listwise train -> export -> report, and training never reads a human query or
qrel; train starts from the pretrained encoder; when eval is wanted, only the eval split's queries
and qrels are read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import ray
import yaml
from tiny import make_tiny_beir, make_tiny_model, train_in_this_process

import peg.train
from peg.config import ConfigError, load_config, parse_config
from peg.data import DataError, TrainingExample, iter_examples, write_examples
from peg.mine.stage import load_train_split
from peg.pipeline.runner import stage_scope
from peg.pipeline import enabled_stages, run_stage_entrypoint, stage_hashes
from peg.store import IntegrityError, LocalStore, open_store


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus-only")
    full = make_tiny_beir(root / "full", passages_per_topic=4)
    corpus_only = root / "corpus-only"
    corpus_only.mkdir()
    shutil.copy(full / "corpus.jsonl", corpus_only / "corpus.jsonl")
    return {"root": root, "full": full, "corpus_only": corpus_only, "model": make_tiny_model(root / "model")}


def synthetic_config(assets, store: Path, llama: Path | None = None, reranker: Path | None = None, **sections) -> dict:
    """The corpus-only run; `llama` / `reranker`: the tiny LLM and cross-encoder folders (only the
    tests that run synth and score need real ones)."""
    llm = {"path": str(llama or assets["root"] / "llama"), "batch_size": 12, "shard_size": 12, "num_actors": 1, "actor_cpus": 0.5}
    config = {
        "name": "corpus-only",
        "data": {"beir": str(assets["corpus_only"]), "train_queries": "synthetic"},
        "model": {"name_or_path": str(assets["model"]), "query_max_length": 24, "passage_max_length": 32},
        "synth": {"enabled": True, "llm": llm, "query_types": ["question", "keywords"], "num_passages": 12,
                  "max_new_tokens": 8, "filter_top_k": 24, "filter_teacher": False},
        "encode": {"batch_size": 32, "num_actors": 1, "actor_cpus": 0.5},
        "mining": {"num_shards": 1, "top_k": 24, "negatives_per_query": 3, "selection": "rank_window",
                   "rank_window": [0, 24], "actor_cpus": 0.5},
        "score": {"enabled": True, "teacher": "cross_encoder", "cross_encoder_path": str(reranker or assets["root"] / "reranker"),
                  "list_size": 4, "llm": {"shard_size": 64, "actor_cpus": 0.5}},
        "loss": {"kind": "listwise"},
        "batch": {"queries_per_step": 4, "hard_negatives": 3},
        "train": {"max_steps": 2, "learning_rate": 1e-3, "nproc_per_node": 1, "zero_stage": 0},
        "pretrain": {"enabled": True, "batch_size": 4, "max_steps": 2, "max_length": 32},
        "eval": {"enabled": False},
        "store": {"uri": str(store)},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    return config


def write(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def test_corpus_only_folder_trains_listwise_on_synthetic_queries_alone(
    assets, tiny_llama_dir, tiny_cross_encoder_dir, tmp_path, monkeypatch
):
    """Stage by stage in one Ray session (the entrypoint each pod runs), from corpus.jsonl alone;
    pretrain and train run in this process, as one pod-per-rank worker each."""
    monkeypatch.setenv("PEG_WORK_DIR", str(tmp_path / "work"))
    train_in_this_process(monkeypatch)
    started_from = []
    real_train = peg.train.train
    monkeypatch.setattr(peg.train, "train", lambda config, *a, **kw: started_from.append(
        kw["inputs"].init_model) or real_train(config, *a, **kw))
    path = write(tmp_path / "run.yaml", synthetic_config(assets, tmp_path / "store", tiny_llama_dir, tiny_cross_encoder_dir))
    config = load_config(path)
    names = [s.name for s in enabled_stages(config)]
    assert names == ["prepare", "synth", "encode", "mine", "score", "pretrain", "train", "export", "report"]
    assert sorted(p.name for p in assets["corpus_only"].iterdir()) == ["corpus.jsonl"]
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        for name in names:
            run_stage_entrypoint(config, path, name)
    finally:
        ray.shutdown()

    store = tmp_path / "store" / "corpus-only"
    synthetic = {ex.query_id: ex for ex in iter_examples(store / "synth" / "train.jsonl")}
    trained = list(iter_examples(store / "score" / "train.jsonl"))
    assert trained and {ex.query_id for ex in trained} <= set(synthetic)
    for ex in trained:  # the synthetic query, its source as the positive, mined negatives, teacher scores
        assert ex.query == synthetic[ex.query_id].query and ex.pos_ids == synthetic[ex.query_id].pos_ids
        assert len(ex.neg) == 3 and len(ex.pos_scores) == 1 and len(ex.neg_scores) == 3
    assert json.loads((store / "prepare" / "data.json").read_text()) == {"passages": 24}
    assert any((store / "export" / "model").rglob("*.safetensors"))
    # all the data later stages can read
    assert LocalStore(tmp_path / "store").list("corpus-only/prepare/data") == ["corpus-only/prepare/data/beir/corpus.jsonl"]
    # train started from the pretrained encoder: the model it was given is the pretrain stage's, byte-equal
    [start] = started_from
    pretrained = store / "pretrain" / "model" / "model.safetensors"
    assert (Path(start) / "model.safetensors").read_bytes() == pretrained.read_bytes()
    assert pretrained.read_bytes() != (assets["model"] / "model.safetensors").read_bytes()
    page = (store / "report" / "report.html").read_text()
    assert "Not evaluated" in page and "training queries: synthetic" in page


def test_eval_reads_only_the_eval_split(assets, tmp_path):
    """With eval on, prepare validates the corpus and the test split; no train qrels are needed."""
    folder = tmp_path / "beir"
    shutil.copytree(assets["full"], folder)
    (folder / "qrels" / "train.tsv").unlink()
    config = synthetic_config(assets, tmp_path / "store", data={"beir": str(folder)}, eval={"enabled": True})
    path = write(tmp_path / "run.yaml", config)
    run_stage_entrypoint(load_config(path), path, "prepare")
    summary = json.loads((tmp_path / "store" / "corpus-only" / "prepare" / "data.json").read_text())
    assert summary == {"passages": 24, "test": {"queries": 6, "qrels": 6}}


def test_synthetic_training_queries_are_the_synth_stage_output(assets, tmp_path):
    """Mining's training queries for `synthetic` are exactly the synth stage's, positives = sources;
    `both` adds the human train split."""
    store = LocalStore(tmp_path / "store")
    kept = [TrainingExample(query="what bakes bread", pos=["x"], query_id="synth-cooking-0-question", pos_ids=["cooking-0"])]
    write_examples(tmp_path / "synth.jsonl", kept)
    store.put_file("corpus-only/synth/train.jsonl", tmp_path / "synth.jsonl", producer="synth", config_hash="h")
    config = parse_config(yaml.safe_dump(synthetic_config(assets, tmp_path / "store")))
    data = load_train_split(config, stage_scope(config, store, "mine"))
    assert data.queries == {"synth-cooking-0-question": "what bakes bread"}
    assert data.qrels == {"synth-cooking-0-question": {"cooking-0": 1}}
    both = parse_config(yaml.safe_dump(synthetic_config(assets, tmp_path / "store", data={
        "beir": str(assets["full"]), "train_queries": "both"})))
    data = load_train_split(both, stage_scope(both, store, "mine"))
    assert len(data.queries) == 1 + 18 and "synth-cooking-0-question" in data.queries


def test_synthetic_training_queries_are_read_verified(assets, tmp_path):
    """The synth stage's queries file is read through the store's sha256 check, like every input:
    a file changed after it was stored stops mining with an IntegrityError naming it."""
    store = LocalStore(tmp_path / "store")
    kept = [TrainingExample(query="what bakes bread", pos=["x"], query_id="synth-cooking-0-question", pos_ids=["cooking-0"])]
    write_examples(tmp_path / "synth.jsonl", kept)
    store.put_file("corpus-only/synth/train.jsonl", tmp_path / "synth.jsonl", producer="synth", config_hash="h")
    stored = store.local_path("corpus-only/synth/train.jsonl")
    stored.write_text(stored.read_text().replace("bakes", "fakes"))  # same length, other bytes
    config = parse_config(yaml.safe_dump(synthetic_config(assets, tmp_path / "store")))
    with pytest.raises(IntegrityError, match="corpus-only/synth/train.jsonl"):
        load_train_split(config, stage_scope(config, store, "mine"))


def test_synthetic_queries_need_the_synth_stage(assets, tmp_path):
    config = synthetic_config(assets, tmp_path / "store", synth={"enabled": False})
    with pytest.raises(ConfigError, match=r"data.train_queries 'synthetic' needs synth.enabled"):
        parse_config(yaml.safe_dump(config))
    no_synth_output = parse_config(yaml.safe_dump(synthetic_config(assets, tmp_path / "store")))
    with pytest.raises(ConfigError, match=r"corpus-only/synth/train.jsonl is not in the store"):
        load_train_split(no_synth_output, stage_scope(no_synth_output, open_store(no_synth_output.store), "mine"))


def test_a_pipeline_of_human_queries_beside_synthetic_pairs_without_negatives_is_refused_before_any_work(assets, tmp_path):
    """synth's train.jsonl has no negatives: with `data.train_queries: human` the pipeline's train
    stage reads it beside the mined pairs, which a batch with hard negatives cannot use (the
    trainer would stop only after every LLM stage had run). `peg pipeline run` refuses it with the
    key's line before the store is touched; with hard_negatives 0 it passes the check."""
    from peg.pipeline import LocalBackend, run_pipeline

    config = synthetic_config(assets, tmp_path / "store", data={"beir": str(assets["full"]), "train_queries": "human"})
    config["batch"] = {**config.get("batch", {}), "hard_negatives": 1}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=r"run.yaml:\d+: data.train_queries human.*without negatives.*hard_negatives is 1"):
        run_pipeline(parse_config(path.read_text()), path, LocalBackend())
    assert not (tmp_path / "store").exists()  # refused before any work
    from peg.pipeline.preflight import check_pipeline_training

    config["batch"]["hard_negatives"] = 0
    check_pipeline_training(parse_config(yaml.safe_dump(config)), path)


def test_synthetic_query_settings_invalidate_everything_but_prepare_and_pretrain(assets, tmp_path):
    base = parse_config(yaml.safe_dump(synthetic_config(assets, tmp_path / "store")))
    types = parse_config(yaml.safe_dump(synthetic_config(assets, tmp_path / "store", synth={"query_types": ["title"]})))
    a, b = stage_hashes(base), stage_hashes(types)
    assert [s for s in a if a[s] == b[s]] == ["prepare", "pretrain"]  # pretraining reads the corpus alone


@pytest.mark.parametrize("example", ["scifact-synthetic.yaml", "scifact-corpus-fast.yaml"])
def test_scifact_corpus_only_examples_train_on_synthetic_queries_only(example):
    config = load_config(Path(__file__).resolve().parents[1] / "examples" / example)
    assert config.data.train_queries == "synthetic" and config.synth.enabled and config.score.enabled
    assert config.loss.kind == "listwise" and config.batch.hard_negatives + 1 == config.score.list_size
    assert [s.name for s in enabled_stages(config)] == [
        "prepare", "synth", "encode", "mine", "score", "train", "eval", "export", "report"]


def test_data_check_accepts_a_corpus_only_folder(assets):
    from peg.data.check import check_path

    report = check_path(assets["corpus_only"])
    assert report.counts == {"passages": 24} and report.problems == []
    with pytest.raises(DataError, match="queries.jsonl: file not found"):  # a split still needs its files
        check_path(assets["corpus_only"], ["test"])
