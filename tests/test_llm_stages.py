"""The judge, score and synth stages on a real local Ray, through the store (and the CLI's errors).

Tiny models built in the test (a Llama with the SmolLM2 tokenizer, a BERT cross-encoder) keep
them fast; the packaged MiniLM is the synth round trip's retriever. A failed shard (fault
injection through PEG_FAIL_SHARDS) is named, and the rerun redoes only that shard and ends
with the same artifacts as an uninterrupted run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import write_config
from typer.testing import CliRunner

from peg.cli import app
from peg.config import JudgeConfig, LLMConfig, RunConfig
from peg.data import DataError, TrainingExample, iter_examples, write_examples
from peg.llm import LLMScorer, judge_examples, run_judge, run_score, run_synth
from peg.pipeline.runner import stage_scope
from peg.runtime.shards import FAIL_SHARDS_ENV, ShardsFailed
from peg.store import LocalStore

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def mined_examples() -> list[TrainingExample]:
    topics = ["bees", "tides", "volcanoes", "jazz", "vaccines"]
    return [
        TrainingExample(
            query=f"how do {t} work",
            pos=[f"An explanation of how {t} work, in detail."],
            neg=[f"A passage about {o}." for o in topics if o != t],
            query_id=f"q{i}",
            pos_ids=[f"d{i}"],
            neg_ids=[f"d{j}" for j, o in enumerate(topics) if o != t],
        )
        for i, t in enumerate(topics)
    ]


def write_llm_config(folder: Path, store: Path, **sections) -> Path:
    config = {"name": "llmrun", "model": {"name_or_path": MINILM}, "store": {"uri": str(store)}, **sections}
    RunConfig.model_validate(config)
    return write_config(folder / "run.yaml", config)


def put_mined(store: LocalStore, tmp: Path) -> None:
    write_examples(tmp / "train.jsonl", mined_examples())
    store.put_file("llmrun/mine/train.jsonl", tmp / "train.jsonl", producer="mine", config_hash="test")


def test_judge_stage_names_failed_shard_and_rerun_redoes_only_it(ray_local, tiny_llama_dir, tmp_path, monkeypatch):
    llm = {"path": str(tiny_llama_dir), "mode": "yes_no", "shard_size": 2, "num_actors": 2, "actor_cpus": 0.5}
    # In-process reference, shard by shard (same batches as the actors); an absolute threshold at
    # the median score makes the judge drop some negatives and keep others.
    scorer = LLMScorer(LLMConfig(**llm))
    scores = [j["score"] for s in (0, 2, 4) for j in judge_examples(mined_examples()[s : s + 2], scorer.score, JudgeConfig()).judgments]
    judge = {"enabled": True, "llm": llm, "threshold": float(np.median(scores)), "relative": False}
    parts = [judge_examples(mined_examples()[s : s + 2], scorer.score, JudgeConfig(**judge)) for s in (0, 2, 4)]
    expected_examples = [ex for p in parts for ex in p.examples]
    expected_judgments = [j for p in parts for j in p.judgments]
    config_path = write_llm_config(tmp_path, tmp_path / "store", judge=judge)
    config = RunConfig.model_validate(yaml.safe_load(config_path.read_text()))
    store = LocalStore(tmp_path / "store")
    scope = stage_scope(config, store, "judge")

    with pytest.raises(DataError, match="llmrun/mine/train.jsonl: input artifact not found"):
        run_judge(config, scope, show_progress=False)

    put_mined(store, tmp_path)
    monkeypatch.setenv(FAIL_SHARDS_ENV, "1")
    with pytest.raises(ShardsFailed, match="judge shard 00001 failed") as failed:
        run_judge(config, scope, show_progress=False)
    assert "shard 00000" not in str(failed.value)
    assert sorted(store.list("llmrun/judge")) == sorted(
        f"llmrun/judge/shard-{s:05d}.{part}" for s in (0, 2) for part in ("judgments.jsonl", "jsonl", "stats.json")
    )
    stored_mtime = store.local_path("llmrun/judge/shard-00000.jsonl").stat().st_mtime_ns

    monkeypatch.delenv(FAIL_SHARDS_ENV)
    rerun = run_judge(config, scope, show_progress=False)
    assert "shards: 1 computed, 2 reused" in rerun.summary_lines()[0]
    assert store.local_path("llmrun/judge/shard-00000.jsonl").stat().st_mtime_ns == stored_mtime

    # The Ray stage gives what judging the examples in-process gives.
    got_examples = list(iter_examples(store.local_path("llmrun/judge/train.jsonl")))
    got_judgments = [json.loads(line) for line in store.local_path("llmrun/judge/judgments.jsonl").open()]
    assert [ex.neg_ids for ex in got_examples] == [ex.neg_ids for ex in expected_examples]
    assert [(j["query_id"], j["neg_id"], j["dropped"]) for j in got_judgments] == [
        (j["query_id"], j["neg_id"], j["dropped"]) for j in expected_judgments
    ]
    np.testing.assert_allclose([j["score"] for j in got_judgments], [j["score"] for j in expected_judgments], atol=1e-6)
    report = json.loads(store.local_path("llmrun/judge/report.json").read_text())
    assert report["negatives"] == 20 and report["examples"] == 5
    assert report["dropped"] == sum(j["dropped"] for j in expected_judgments)
    assert 5 <= report["dropped"] <= 15  # the median threshold splits the scores
    assert report["drop_rate"] == pytest.approx(report["dropped"] / 20)


def test_score_stage_writes_teacher_scores(ray_local, tiny_cross_encoder_dir, tmp_path):
    store = LocalStore(tmp_path / "store")
    put_mined(store, tmp_path)
    config = RunConfig.model_validate({
        "name": "llmrun", "model": {"name_or_path": MINILM}, "store": {"uri": str(tmp_path / "store")},
        "batch": {"hard_negatives": 2},
        "score": {"enabled": True, "teacher": "cross_encoder", "cross_encoder_path": str(tiny_cross_encoder_dir),
                  "list_size": 3, "llm": {"shard_size": 3, "num_actors": 1}},
    })
    stats = run_score(config, stage_scope(config, store, "score"), show_progress=False).report
    assert stats["examples"] == 5 and stats["pairs"] == 15 and stats["shards_computed"] == 2
    from peg.llm import CrossEncoderTeacher

    teacher = CrossEncoderTeacher(str(tiny_cross_encoder_dir))
    for ex in iter_examples(store.local_path("llmrun/score/train.jsonl")):
        assert len(ex.neg) == 2 and len(ex.neg_scores) == 2 and len(ex.pos_scores) == 1
        expected = teacher.score([ex.query] * 3, ex.pos + ex.neg)
        np.testing.assert_allclose(ex.pos_scores + ex.neg_scores, expected, atol=1e-5)


def test_score_stage_with_the_bm25_teacher_scores_with_the_corpus_statistics(ray_local, tmp_path):
    store = LocalStore(tmp_path / "store")
    put_mined(store, tmp_path)
    write_beir(tmp_path / "beir")
    config = RunConfig.model_validate({
        "name": "llmrun", "model": {"name_or_path": MINILM}, "store": {"uri": str(tmp_path / "store")},
        "data": {"beir": str(tmp_path / "beir")}, "batch": {"hard_negatives": 2},
        "score": {"enabled": True, "teacher": "bm25_biencoder", "biencoder_weight": 0.25, "list_size": 3,
                  "llm": {"shard_size": 3, "num_actors": 1}},
    })
    stats = run_score(config, stage_scope(config, store, "score"), show_progress=False).report
    assert stats["examples"] == 5 and stats["pairs"] == 15 and stats["teacher"] == "bm25_biencoder"
    from peg.llm.lexical import BM25Scorer
    from peg.llm.teacher import zscore_by_query
    from peg.model import Encoder

    bm25 = BM25Scorer(json.loads(line)["text"] for line in (tmp_path / "beir" / "corpus.jsonl").open())
    encoder = Encoder(config.model)
    for ex in iter_examples(store.local_path("llmrun/score/train.jsonl")):
        queries, passages = [ex.query] * 3, ex.pos + ex.neg
        cosine = encoder.encode(passages, "passage") @ encoder.encode([ex.query], "query")[0]
        expected = 0.75 * zscore_by_query(queries, bm25.score(queries, passages)) + 0.25 * zscore_by_query(queries, cosine)
        np.testing.assert_allclose(ex.pos_scores + ex.neg_scores, expected, atol=1e-5)
        assert ex.pos_scores[0] == max(ex.pos_scores + ex.neg_scores)  # "how do bees work": its passage


def write_beir(folder: Path) -> None:
    folder.mkdir()
    texts = [
        "Honey bees collect nectar from flowers and turn it into honey inside the hive.",
        "Ocean tides are caused by the gravitational pull of the Moon and the Sun.",
        "Volcanoes erupt when magma rises through cracks in the Earth's crust.",
        "Jazz began in New Orleans and grew out of blues and ragtime.",
        "Vaccines train the immune system to recognise a pathogen before an infection.",
    ]
    with (folder / "corpus.jsonl").open("w") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"_id": f"d{i}", "title": "", "text": text}) + "\n")


def synth_config(tmp_path: Path, store: str, llm_dir: Path) -> RunConfig:
    llm = {"path": str(llm_dir), "shard_size": 2, "num_actors": 1, "batch_size": 4}
    return RunConfig.model_validate({
        "name": "llmrun", "model": {"name_or_path": MINILM}, "store": {"uri": store},
        "data": {"beir": str(tmp_path / "beir")},
        "encode": {"shard_size": 100}, "mining": {"num_shards": 2},
        "synth": {"enabled": True, "llm": llm, "query_types": ["question", "keywords"], "num_passages": 4,
                  "max_new_tokens": 8, "filter_top_k": 5},
        "score": {"teacher": "llm", "llm": {**llm, "mode": "query_likelihood"}},
    })


def test_synth_stage_resumes_to_the_uninterrupted_result(ray_local, tiny_llama_dir, tmp_path, monkeypatch):
    write_beir(tmp_path / "beir")
    whole = synth_config(tmp_path, str(tmp_path / "whole"), tiny_llama_dir)
    report = run_synth(whole, stage_scope(whole, LocalStore(tmp_path / "whole"), "synth"), show_progress=False).report
    assert report["passages"] == 4 and report["shards_computed"] == 2
    assert set(report["by_type"]) == {"question", "keywords"}
    for counts in report["by_type"].values():
        assert sum(counts.values()) == 4  # one query per passage and type, each with one outcome
    # filter_top_k = corpus size: every non-empty query retrieves its source; the teacher decides.
    assert all(c["not_retrieved"] == 0 for c in report["by_type"].values())

    # The second store starts with the first one's corpus embeddings (the encode cache), as a
    # rerun on the same store would; the synth shards are all computed anew.
    shutil.copytree(tmp_path / "whole" / "encode", tmp_path / "resumed" / "encode")
    resumed_store = LocalStore(tmp_path / "resumed")
    resumed = synth_config(tmp_path, str(tmp_path / "resumed"), tiny_llama_dir)
    monkeypatch.setenv(FAIL_SHARDS_ENV, "0")
    with pytest.raises(ShardsFailed, match="synth shard 00000 failed") as failure:
        run_synth(resumed, stage_scope(resumed, resumed_store, "synth"), show_progress=False)
    assert set(failure.value.failed) == {0}
    monkeypatch.delenv(FAIL_SHARDS_ENV)
    again = run_synth(resumed, stage_scope(resumed, resumed_store, "synth"), show_progress=False).report
    assert (again["shards_computed"], again["shards_reused"]) == (1, 1)
    assert again["by_type"] == report["by_type"]
    whole_store = LocalStore(tmp_path / "whole")
    for key in ("llmrun/synth/queries.jsonl", "llmrun/synth/train.jsonl"):
        assert resumed_store.local_path(key).read_text() == whole_store.local_path(key).read_text()

    kept = list(iter_examples(whole_store.local_path("llmrun/synth/train.jsonl")))
    assert len(kept) == report["kept"]
    records = [json.loads(line) for line in whole_store.local_path("llmrun/synth/queries.jsonl").open()]
    corpus = {json.loads(line)["_id"]: json.loads(line)["text"] for line in (tmp_path / "beir" / "corpus.jsonl").open()}
    kept_records = [r for r in records if r["outcome"] == "kept"]
    assert [(ex.query, ex.pos_ids, ex.query_type) for ex in kept] == [
        (r["query"], [r["passage_id"]], r["query_type"]) for r in kept_records
    ]
    assert all(ex.pos == [corpus[ex.pos_ids[0]]] for ex in kept)


def test_missing_gguf_is_a_clear_cli_error(tmp_path):
    judge = {"enabled": True, "llm": {"path": str(tmp_path / "models"), "gguf_file": "absent.gguf"}}
    config_path = write_llm_config(tmp_path, tmp_path / "store", judge=judge)
    result = CliRunner().invoke(app, ["judge", str(config_path)])
    assert result.exit_code == 2
    assert f"GGUF file not found: {tmp_path}/models/absent.gguf" in result.output
