"""The mine stage and `peg encode` / `peg mine`: selection rules hold on real output, shards resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import write_config
from tiny import make_tiny_model
from typer.testing import CliRunner

from peg.cli import app
from peg.config import load_config
from peg.data import iter_examples
from peg.mine import run_mine
from peg.pipeline.runner import stage_scope
from peg.runtime import ShardsFailed
from peg.runtime.shards import FAIL_SHARDS_ENV
from peg.store import open_store

WORDS = "alpha beta gamma delta protein cell gene virus star orbit bread oven market loan song chord".split()


def write_beir(folder, n_passages: int = 150, n_queries: int = 30) -> dict:
    """A BEIR folder. Queries 0-4 have the exact text of their positive, which has a duplicate."""
    rng = np.random.default_rng(1)
    corpus = [{"_id": f"p{i}", "title": "", "text": " ".join(rng.choice(WORDS, size=4 + i % 12))} for i in range(n_passages)]
    duplicates = {}
    for q in range(5):  # passage 100+q repeats the text of passage q (query q's positive)
        corpus[100 + q]["text"] = corpus[q]["text"]
        duplicates[f"q{q}"] = f"p{100 + q}"
    queries, qrels = [], []
    for q in range(n_queries):
        pos = [q] if q % 4 else [q, q + 50]
        text = corpus[q]["text"] if q < 5 else " ".join(rng.choice(WORDS, size=3))
        queries.append({"_id": f"q{q}", "text": text})
        qrels += [f"q{q}\tp{p}\t1" for p in pos]
    queries.append({"_id": "unjudged", "text": "not in the train qrels"})
    queries.append({"_id": "q-zero", "text": "judged, but nothing relevant"})
    qrels.append("q-zero\tp7\t0")
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    (folder / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in queries))
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(qrels) + "\n")
    return duplicates


def write_mine_config(path, beir, store, **mining):
    config = {
        "name": "mine-test",
        "data": {"beir": str(beir), "train_split": "train"},
        "model": {"name_or_path": str(path.parent / "model"), "passage_max_length": 32, "query_max_length": 32},
        "encode": {"batch_size": 32, "num_actors": 1, "actor_cpus": 0.5},
        "mining": {"num_shards": 2, "top_k": 20, "negatives_per_query": 3, "query_shard_size": 10,
                   "actor_cpus": 0.25, **mining},
        "eval": {"enabled": False},
        "store": {"uri": str(store)},
    }
    return write_config(path, config)


@pytest.fixture(scope="module")
def mined(ray_local, tmp_path_factory):
    """One uninterrupted mining run (30 queries in 3 shards) and what the tests need from it."""
    root = tmp_path_factory.mktemp("mine")
    make_tiny_model(root / "model")
    duplicates = write_beir(root / "beir")
    config_path = write_mine_config(root / "run.yaml", root / "beir", root / "store")
    config = load_config(config_path)
    store = open_store(config.store)
    result = run_mine(config, stage_scope(config, store, "mine"), show_progress=False)
    train = store.local_path(result.keys["train"]).read_text()
    return {"root": root, "config_path": config_path, "config": config, "store": store, "result": result,
            "train": train, "duplicates": duplicates}


def test_mined_examples_obey_the_selection_rules(mined):
    store, result = mined["store"], mined["result"]
    assert result.computed == [0, 1, 2] and result.reused == []
    examples = list(iter_examples(store.local_path(result.keys["train"])))
    # "unjudged" has no train qrels, "q-zero" no positive: neither becomes an example.
    assert [e.query_id for e in examples] == [f"q{i}" for i in range(30)]
    assert result.stats["queries_without_positives"] == 1
    scores = {r["query_id"]: r for r in map(json.loads, store.local_path(result.keys["scores"]).read_text().splitlines())}
    corpus = {json.loads(line)["_id"]: json.loads(line)["text"] for line in (mined["root"] / "beir" / "corpus.jsonl").open()}
    emb = np.load(store.local_path(f"{result.stats['corpus_embeddings']}/shard-00000.npz"))
    q_emb = np.load(store.local_path(f"{result.stats['query_embeddings']}/shard-00000.npz"))
    c_rows = {pid: i for i, pid in enumerate(emb["ids"].tolist())}
    q_rows = {qid: i for i, qid in enumerate(q_emb["ids"].tolist())}
    for e in examples:
        q = int(e.query_id[1:])
        want_pos = [f"p{q}"] if q % 4 else [f"p{q}", f"p{q + 50}"]
        assert e.pos_ids == want_pos and e.pos == [corpus[p] for p in want_pos]
        assert e.neg == [corpus[n] for n in e.neg_ids]
        assert e.neg_scores is None  # reserved for teacher scores
        assert len(e.neg_ids) <= 3 and not set(e.neg_ids) & set(want_pos)
        assert not {corpus[n] for n in e.neg_ids} & {corpus[p] for p in want_pos}  # no duplicate of a positive
        # TopK-PercPos, checked against scores recomputed here: every kept negative is <= 0.95 x the
        # weakest positive, and no eligible passage scoring higher than a kept one was passed over.
        all_scores = emb["embeddings"] @ q_emb["embeddings"][q_rows[e.query_id]]
        min_pos = min(all_scores[c_rows[p]] for p in want_pos)
        record = scores[e.query_id]
        np.testing.assert_allclose(record["neg_scores"], [all_scores[c_rows[n]] for n in e.neg_ids], atol=1e-5)
        assert all(s <= 0.95 * min_pos + 1e-6 for s in record["neg_scores"])
        top20 = np.argsort(-all_scores, kind="stable")[:20]
        eligible = [emb["ids"][r] for r in top20 if emb["ids"][r] not in want_pos
                    and corpus[emb["ids"][r]] not in {corpus[p] for p in want_pos}
                    and all_scores[r] <= 0.95 * min_pos - 1e-5]
        assert e.neg_ids == eligible[:3] or len(eligible) > 3 and set(e.neg_ids) <= set(eligible[:4])
    stats = result.stats
    assert stats["queries"] == 30 and stats["candidates"] == 30 * 20
    assert stats["kept"] == sum(len(e.neg_ids) for e in examples)
    assert stats["kept"] + stats["not_selected"] + sum(stats["dropped"].values()) == stats["candidates"]
    # Queries 0-4 equal their positive's text: the positive and its duplicate are both retrieved and dropped.
    assert stats["dropped"]["positive"] >= 5 and stats["dropped"]["duplicate_of_positive"] >= 5
    assert stats["queries_short"] == sum(len(e.neg_ids) < 3 for e in examples)
    assert stats["short_query_ids"] == [e.query_id for e in examples if len(e.neg_ids) < 3]
    assert store.local_path(result.keys["histogram"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stored = json.loads(store.local_path(result.keys["stats"]).read_text())
    assert stored["kept"] == stats["kept"] and stored["queries_without_positives"] == 1


def test_failed_shard_is_named_and_a_rerun_redoes_only_it(mined, monkeypatch):
    config, store = mined["config"], mined["store"]
    store.delete(f"{config.name}/mine")
    monkeypatch.setenv(FAIL_SHARDS_ENV, "1")
    with pytest.raises(ShardsFailed, match=r"mine shard 00001 failed: .*injected failure") as failure:
        run_mine(config, stage_scope(config, store, "mine"), show_progress=False)
    assert failure.value.failed.keys() == {1}
    assert not store.exists(f"{config.name}/mine/shard-00001.jsonl")
    assert not store.exists(f"{config.name}/mine/train.jsonl")
    done = {s: store.local_path(f"{config.name}/mine/shard-{s:05d}.jsonl").stat().st_mtime_ns for s in (0, 2)}

    monkeypatch.delenv(FAIL_SHARDS_ENV)
    result = run_mine(config, stage_scope(config, store, "mine"), show_progress=False)
    assert result.computed == [1] and result.reused == [0, 2]
    assert {s: store.local_path(f"{config.name}/mine/shard-{s:05d}.jsonl").stat().st_mtime_ns for s in (0, 2)} == done
    assert store.local_path(result.keys["train"]).read_text() == mined["train"]  # resumed == uninterrupted


def test_changed_mining_config_recomputes_every_shard(mined):
    config = mined["config"].model_copy(deep=True)
    config.mining.negatives_per_query = 2
    result = run_mine(config, stage_scope(config, mined["store"], "mine"), show_progress=False)
    assert result.computed == [0, 1, 2] and result.reused == []
    assert all(len(e.neg_ids) <= 2 for e in iter_examples(mined["store"].local_path(result.keys["train"])))


def test_cli_encode_and_mine_reuse_stored_work_and_leave_what_the_pipeline_stage_leaves(mined):
    runner = CliRunner()
    path = write_mine_config(mined["root"] / "cli.yaml", mined["root"] / "beir", mined["root"] / "store")
    encoded = runner.invoke(app, ["encode", str(path)])
    assert encoded.exit_code == 0, encoded.output
    assert "passages: 150 embeddings of dim 32" in encoded.output and "queries: 31 embeddings" in encoded.output
    assert "[run]  prepare (needed by encode)" in encoded.output  # the stages it needs run first
    runner.invoke(app, ["mine", str(path)])  # whatever earlier tests left, this stores every shard
    mined_again = runner.invoke(app, ["mine", str(path)])
    assert mined_again.exit_code == 0, mined_again.output
    assert "query shards: 0 mined, 3 reused" in mined_again.output

    # `peg mine` is the pipeline's own stage: the same record and the same store contents.
    store, prefix = mined["store"], "mine-test/mine"
    by_command = {key: store.manifest(key).sha256 for key in store.list(prefix)}
    assert f"{prefix}/_stage.json" in by_command
    store.delete(prefix)
    staged = runner.invoke(app, ["pipeline", "stage", "mine", str(path)])
    assert staged.exit_code == 0, staged.output
    assert {key: store.manifest(key).sha256 for key in store.list(prefix)} == by_command


def test_cli_bad_input_errors(mined):
    runner = CliRunner()
    root = mined["root"]
    too_many = write_mine_config(root / "shards.yaml", root / "beir", root / "store", num_shards=151, actor_cpus=0.01)
    result = runner.invoke(app, ["mine", str(too_many)])
    assert result.exit_code == 2
    assert "mining.num_shards (151) exceeds the corpus size (150 passages)" in result.output

    bad = root / "bad-beir"
    write_beir(bad)
    with (bad / "qrels" / "train.tsv").open("a") as f:
        f.write("ghost\tp1\t1\n")
    result = runner.invoke(app, ["mine", str(write_mine_config(root / "bad.yaml", bad, root / "store"))])
    assert result.exit_code == 2
    line = len((bad / "qrels" / "train.tsv").read_text().splitlines())
    assert f"train.tsv:{line}: query id 'ghost' is not in queries.jsonl" in " ".join(result.output.split())


def test_in_process_and_ray_mining_pick_identical_negatives(ray_local, tmp_path, caplog):
    """The same corpus mined in this process and on Ray actors (encoders, shard searchers, query
    shards) gives byte-identical training examples; each run logs where it ran and why."""
    make_tiny_model(tmp_path / "model")
    write_beir(tmp_path / "beir")
    outputs = {}
    for placement in ("process", "ray"):
        path = write_mine_config(tmp_path / f"{placement}.yaml", tmp_path / "beir", tmp_path / f"store-{placement}",
                                 placement=placement)
        config = load_config(path)
        config.encode.in_process_below = 0  # the Ray path encodes on actors too
        store = open_store(config.store)
        with caplog.at_level("INFO", logger="peg.runtime.shards"):
            result = run_mine(config, stage_scope(config, store, "mine"), show_progress=False)
        outputs[placement] = (store.local_path(result.keys["train"]).read_text(),
                              [json.loads(line) for line in store.local_path(result.keys["scores"]).open()])
    assert "mine: runs in this process" in caplog.text and "placement: process" in caplog.text
    assert "mine: runs on Ray actors: placement: ray" in caplog.text
    (here_train, here_scores), (ray_train, ray_scores) = outputs["process"], outputs["ray"]
    assert here_train == ray_train and here_train.count("\n") == 30
    assert [r["neg_ids"] for r in here_scores] == [r["neg_ids"] for r in ray_scores]
    for here, there in zip(here_scores, ray_scores, strict=True):
        np.testing.assert_allclose(here["neg_scores"], there["neg_scores"], atol=1e-6)


def test_placement_auto_runs_here_unless_on_a_cluster_or_too_big(monkeypatch, caplog):
    import psutil

    from peg.runtime.shards import run_here

    available = psutil.virtual_memory().available
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with caplog.at_level("INFO", logger="peg.runtime.shards"):
        assert run_here("mine", 10 * 2**20) is True
        assert run_here("mine", int(0.9 * available)) is False
        assert run_here("mine", 10 * 2**20, "ray") is False
        assert run_here("mine", int(0.9 * available), "process") is True
        monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
        assert run_here("mine", 10 * 2**20) is False
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("mine: runs in this process") and "not on a cluster" in lines[0]
    assert "more than 50% of the memory available" in lines[1]
    assert lines[4].startswith("mine: runs on Ray actors: RAY_ADDRESS names a Ray cluster")


def test_encode_stage_runs_in_process_where_mine_does(tmp_path, monkeypatch, caplog):
    """`peg mine` starts no Ray when the corpus fits: its encode stage follows `mining.placement`
    like the mine stage (auto, off a cluster, small data: this process), whatever
    `encode.in_process_below` says."""
    import peg.runtime.embeddings as embeddings
    from peg.mine.stage import run_encode

    def no_actors(*args, **kwargs):
        raise AssertionError("the encode stage started an actor pool")

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(embeddings, "_embedded_on_ray", no_actors)
    make_tiny_model(tmp_path / "model")
    write_beir(tmp_path / "beir")
    config = load_config(write_mine_config(tmp_path / "run.yaml", tmp_path / "beir", tmp_path / "store"))
    config.encode.in_process_below = 0  # below it the encode runs here anyway: the placement must decide
    store = open_store(config.store)
    with caplog.at_level("INFO", logger="peg.runtime.shards"):
        result = run_encode(config, stage_scope(config, store, "encode"), show_progress=False)
    assert "encode: runs in this process" in caplog.text
    assert len(result.corpus.ids) == 150 and result.queries.matrix.shape[0] == 31  # the train split's judged queries
