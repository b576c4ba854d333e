"""Evaluation during training: the dev set (held out or named), dev metrics per step and per
Matryoshka dimension, the best model kept and exported, early stopping, under 2 torchrun ranks
with ZeRO-2 and ZeRO-3 (gloo) and GradCache."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from test_train import make_tiny_bert, run, write_pairs

from peg.config import ConfigError, ModelConfig, RunConfig, load_config
from peg.eval import evaluate_embeddings
from peg.model.encoder import Encoder
from peg.train.devset import BEST_RECORD, BestRecord, dev_set, load_dev_corpus
from peg.train.metrics import read_metrics
from peg.train.trainer import training_plan

N = 24  # training queries of the tiny BEIR folder (and pairs in the training file)


def write_beir(folder: Path, n: int = N) -> str:
    """A BEIR folder whose train split's queries are write_pairs' queries (topic alpha) and a dev split."""
    pairs = [json.loads(line) for line in Path(write_pairs(folder.parent / "pairs-src.jsonl", "alpha", n, 2)).read_text().splitlines()]
    (folder / "qrels").mkdir(parents=True)
    corpus, queries, train, dev = [], [], [], []
    for i, row in enumerate(pairs):
        corpus.append({"_id": f"d{i}", "title": "", "text": row["pos"][0]})
        corpus += [{"_id": f"d{i}n{j}", "title": "", "text": t} for j, t in enumerate(row["neg"])]
        queries.append({"_id": f"q{i}", "text": row["query"]})
        train.append(f"q{i}\td{i}\t1")
    for i in range(4):
        queries.append({"_id": f"dev{i}", "text": f"which item is {i * 7 % 13}"})
        dev.append(f"dev{i}\td{i}\t1")
    (folder / "corpus.jsonl").write_text("".join(json.dumps(c) + "\n" for c in corpus))
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(train) + "\n")
    (folder / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(dev) + "\n")
    return str(folder)


def config_dict(tmp_path: Path, model: str, **train) -> dict:
    beir = write_beir(tmp_path / "beir")
    pairs = write_pairs(tmp_path / "pairs.jsonl", "alpha", N, 2)
    return {
        "name": "eval-during-training",
        "data": {"beir": beir, "train_files": [pairs], "dev_queries": 6},
        "model": {"name_or_path": model, "query_max_length": 16, "passage_max_length": 24},
        "loss": {"kind": "infonce", "matryoshka_dims": [32, 16, 8]},
        "batch": {"queries_per_step": 4, "hard_negatives": 2, "chunk_size": 3},
        "mining": {"negatives_per_query": 2},
        "train": {"learning_rate": 5e-3, "nproc_per_node": 2, "zero_stage": 2, "warmup_ratio": 0.0, "eval_every": 2,
                  **train},
        "eval": {"k_values": [1, 10]},
    }


def test_held_out_dev_queries_are_chosen_by_seed_and_left_out_of_training(tmp_path):
    raw = config_dict(tmp_path, "unused")
    config = RunConfig.model_validate(raw)
    dev = dev_set(config)
    assert len(dev.queries) == 6 and set(dev.qrels) == set(dev.queries) and dev.held_out == frozenset(dev.queries.values())
    assert dev_set(config) == dev  # the same on every rank and every run
    other = RunConfig.model_validate({**raw, "train": {**raw["train"], "seed": 7}})
    assert dev_set(other).queries != dev.queries
    plan, steps, identity, planned_dev = training_plan(config, world_size=2)
    (pairs,) = plan.datasets.values()
    assert pairs.examples == N - 6 and steps == (N - 6) // 4 and planned_dev == dev
    assert identity["data.dev_queries held out of data.train_split"] == 6
    trained = {q for name, number in plan.epoch_batches(0) for r in range(2) for q in plan.rank_batch(0, name, number, r).queries}
    assert trained and not trained & dev.held_out
    # a named split holds nothing out
    named = RunConfig.model_validate({**raw, "data": {**raw["data"], "dev_split": "dev"}})
    assert dev_set(named).held_out == frozenset() and set(dev_set(named).queries) == {f"dev{i}" for i in range(4)}
    assert training_plan(named, world_size=2)[0].steps_per_epoch == N // 4
    assert dev_set(RunConfig.model_validate({**raw, "train": {**raw["train"], "eval_every": None}})) is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"train": {"eval_every": 2, "select_metric": "ndcg@5"}}, "train.select_metric 'ndcg@5' is not reported"),
        ({"data": {"dev_split": "train"}, "train": {"eval_every": 2}}, "data.dev_split 'train' is data.train_split"),
        ({"data": {"beir": None}, "train": {"eval_every": 2}}, "train.eval_every needs data.beir"),
    ],
)
def test_bad_eval_during_training_settings_name_the_key_and_line(tmp_path, change, message):
    import yaml

    raw = {"name": "x", "model": {"name_or_path": "m"}, "data": {"beir": str(tmp_path), "train_files": ["a.jsonl"]}}
    for section, values in change.items():
        raw[section] = {**raw.get(section, {}), **values}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(ConfigError, match=rf"run.yaml:\d+: .*{message}"):
        load_config(path)


def test_best_record_is_kept_only_while_its_model_folder_exists(tmp_path):
    record = BestRecord(4, "ndcg@10", 0.5, "best-step00000004", {"dev_ndcg@10": 0.5})
    record.write(tmp_path)
    assert BestRecord.read(tmp_path) is None  # names a folder that is not there
    (tmp_path / record.model).mkdir()
    assert BestRecord.read(tmp_path) == record
    assert BestRecord(6, "ndcg@10", 0.5, "x").improves_on(record) is False  # ties keep the earlier step
    assert BestRecord(6, "ndcg@10", 0.51, "x").improves_on(record)


def _train(tmp_path: Path, raw: dict, out: str):
    path = tmp_path / f"{out}.yaml"
    path.write_text(json.dumps(raw))
    return run([sys.executable, "-m", "peg", "train", str(path), "--output", str(tmp_path / out)], timeout=600)


@pytest.mark.slow
def test_two_rank_zero2_run_scores_the_dev_set_keeps_the_best_and_exports_it(tmp_path):
    model = make_tiny_bert(tmp_path / "tiny", dropout=0.1)
    raw = config_dict(tmp_path, model, checkpoint_every=2, eval_every=3)
    proc = _train(tmp_path, raw, "out")
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = tmp_path / "out"
    records = read_metrics(out / "metrics.jsonl")
    total = (N - 6) // 4
    evaluated = [r for r in records if "dev_ndcg@10" in r]
    assert total == 4 and [r["step"] for r in evaluated] == [3, 4]  # every eval_every steps and at the end
    for r in evaluated:  # each Matryoshka prefix below the full 32 dimensions is scored too
        assert {"dev_ndcg@10_dim16", "dev_ndcg@10_dim8", "dev_recall@1", "dev_mrr@10"} <= set(r)
        assert "loss_dim16" in r and "loss_dim8" in r
    best = BestRecord.read(out)
    want = max(evaluated, key=lambda r: r["dev_ndcg@10"])  # the first of equal maxima
    assert best.step == want["step"] and best.value == want["dev_ndcg@10"] and best.metric == "ndcg@10"
    assert f"best: dev ndcg@10 {best.value:.4f} at step {best.step}" in proc.stdout + proc.stderr
    assert [p.name for p in out.glob("best-step*")] == [best.model]
    # model/ is the best step's weights; the last step's are in last-model/
    assert (out / "model" / "model.safetensors").read_bytes() == (out / best.model / "model.safetensors").read_bytes()
    assert (out / "last-model" / "model.safetensors").is_file()
    st_config = json.loads((out / "model" / "config_sentence_transformers.json").read_text())
    assert st_config["matryoshka_dims"] == [32, 16, 8]
    # the logged dev score is `peg eval`'s metrics code on the exported model
    config = RunConfig.model_validate(raw)
    dev = dev_set(config)
    ids, texts = load_dev_corpus(config)
    encoder = Encoder(ModelConfig(name_or_path=str(out / "model"), query_max_length=16, passage_max_length=24))
    qids = list(dev.queries)
    again = evaluate_embeddings(qids, encoder.encode([dev.queries[q] for q in qids], "query"), ids,
                                encoder.encode(texts, "passage"), dev.qrels, (1, 10)).metrics  # fmt: skip
    assert again["ndcg@10"] == pytest.approx(best.value, abs=1e-6)


@pytest.mark.slow
def test_zero3_early_stopping_stops_after_patience_evaluations_without_improvement(tmp_path):
    """A learning rate too small to change the ranking: the first evaluation stays the best and
    training stops `patience` evaluations later, before the planned last step."""
    model = make_tiny_bert(tmp_path / "tiny", dropout=0.0)
    raw = config_dict(tmp_path, model, zero_stage=3, learning_rate=1e-12, eval_every=1, early_stopping_patience=2)
    raw["data"]["dev_split"] = "dev"
    proc = _train(tmp_path, raw, "out")
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = tmp_path / "out"
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]  # of N // 4 = 6 planned
    assert BestRecord.read(out).step == 1 and all(r["dev_best_step"] == 1 for r in records)
    assert (out / "model" / "model.safetensors").read_bytes() == (out / "best-step00000001" / "model.safetensors").read_bytes()
    assert json.loads((out / BEST_RECORD).read_text())["model"] == "best-step00000001"


def test_resume_keeps_the_best_so_far_and_a_fresh_run_clears_it(tmp_path):
    from peg.train.selection import DevSelection

    model = make_tiny_bert(tmp_path / "tiny", dropout=0.0)
    config = RunConfig.model_validate(config_dict(tmp_path, model))
    out = tmp_path / "out"
    (out / "best-step00000002").mkdir(parents=True)
    (out / "best-step00000001").mkdir()  # a stale folder of an earlier run
    record = BestRecord(2, "ndcg@10", 0.25, "best-step00000002")
    record.write(out)
    encoder = Encoder(config.model)
    resumed = DevSelection(config, dev_set(config), encoder, out, rank=0, resume=True)
    assert resumed.best == record and (out / "best-step00000002").is_dir()
    fresh = DevSelection(config, dev_set(config), encoder, out, rank=0, resume=False)
    assert fresh.best is None and not (out / BEST_RECORD).exists() and not list(out.glob("best-step*"))



def test_the_best_model_goes_to_the_store_and_a_fresh_disk_gets_it_back(tmp_path):
    from peg.config import StoreConfig
    from peg.store import open_store
    from peg.train.checkpoints import restore_best, stored_tags, upload_best

    store = open_store(StoreConfig(uri=str(tmp_path / "store")))
    key = "run/train/checkpoints"
    store.put_bytes(f"{key}/step00000002/x", b"checkpoint", producer="train")
    first, second = tmp_path / "first", tmp_path / "second"
    for step, value in ((2, 0.3), (4, 0.5)):
        record = BestRecord(step, "ndcg@10", value, f"best-step{step:08d}")
        (first / record.model / "sub").mkdir(parents=True)
        (first / record.model / "sub" / "w.bin").write_bytes(bytes([step]) * 10)
        record.write(first)
        upload_best(store, key, first, record)
    assert stored_tags(store, key) == ["step00000002"]  # the best is not a checkpoint tag
    assert [k for k in store.list(f"{key}/best")] == [f"{key}/best/best-step00000004/sub/w.bin", f"{key}/best/best.json"]
    restore_best(store, key, second)
    assert BestRecord.read(second) == record and (second / record.model / "sub" / "w.bin").read_bytes() == bytes([4]) * 10
    better = BestRecord(6, "ndcg@10", 0.9, "best-step00000006")
    (second / better.model).mkdir()
    better.write(second)
    restore_best(store, key, second)  # a better local record stays
    assert BestRecord.read(second) == better


def test_evaluate_at_dims_scores_each_smaller_prefix_renormalised():
    import numpy as np

    from peg.eval.retrieval import evaluate_at_dims, truncate_embeddings

    rng = np.random.default_rng(0)
    q, p = rng.normal(size=(5, 8)).astype(np.float32), rng.normal(size=(20, 8)).astype(np.float32)
    q, p = q / np.linalg.norm(q, axis=1, keepdims=True), p / np.linalg.norm(p, axis=1, keepdims=True)
    qids, pids = [f"q{i}" for i in range(5)], [f"d{i}" for i in range(20)]
    qrels = {f"q{i}": {f"d{3 * i}": 1} for i in range(5)}
    by_dim = evaluate_at_dims(qids, q, pids, p, qrels, (1, 10), [8, 2, 4], normalize=True)
    assert list(by_dim) == [4, 2]  # the full dimension is not repeated; largest first
    four = truncate_embeddings(q, 4, True)
    np.testing.assert_allclose(np.linalg.norm(four, axis=1), 1.0, rtol=1e-6)
    want = evaluate_embeddings(qids, four, pids, truncate_embeddings(p, 4, True), qrels, (1, 10)).metrics
    assert by_dim[4] == want


@pytest.mark.parametrize("world", [1, 2, 3])
def test_the_ranks_dev_shares_concatenated_are_the_whole_encode(tmp_path, world):
    """Under ZeRO 0-2 each rank encodes its share of the dev set (issue 32: no rank idles through a
    corpus encode that could outlast the process group's timeout); rank 0's concatenation of the
    shares in rank order is the one-process encode, row for row."""
    from peg.train.devset import encode_dev_share

    model = make_tiny_bert(tmp_path / "tiny", dropout=0.0)
    config = RunConfig.model_validate(config_dict(tmp_path, model))
    dev, corpus = dev_set(config), load_dev_corpus(config)
    encoder = Encoder(ModelConfig(name_or_path=model, query_max_length=16, passage_max_length=24))
    whole_q, whole_p = encode_dev_share(encoder, dev, corpus, 4)
    shares = [encode_dev_share(encoder, dev, corpus, 4, rank, world) for rank in range(world)]
    assert len(whole_q) == len(dev.queries) and len(whole_p) == len(corpus[0])
    for whole, part in ((whole_q, 0), (whole_p, 1)):
        np.testing.assert_allclose(np.concatenate([s[part] for s in shares]), whole, atol=1e-5)
