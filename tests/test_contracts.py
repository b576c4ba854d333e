"""Stage contracts: derived from the one declaration (`Stage` in peg/pipeline/stages.py), for every stage; the
stage context's write scope; the pipeline keeps the user's settings; no import cycle in peg/."""

from __future__ import annotations

import json
import sys
import types
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from peg.config import RunConfig
from peg.pipeline import STAGES, StageContext, stage_hashes
from peg.pipeline.context import ScopedStore
from peg.pipeline.runner import stage_scope
from peg.pipeline.stages import STAGE_BY_NAME
from peg.pipeline.state import StageRecord, check_stage, write_record
from peg.store import LocalStore, StoreError
from peg.store.scope import StageScope

ALL_ON = {
    "name": "contract",
    "data": {"beir": "/data/beir"},
    "model": {"name_or_path": "/models/m"},
    "synth": {"enabled": True},
    "judge": {"enabled": True},
    "score": {"enabled": True},
    "pretrain": {"enabled": True},
}


def _changed_value(model: BaseModel, name: str):
    """A different valid-looking value for field `name` of `model`, or None."""
    value = getattr(model, name)
    annotation = type(model).model_fields[name].annotation
    if isinstance(value, BaseModel):
        return None
    if typing.get_origin(annotation) is typing.Literal:
        others = [v for v in typing.get_args(annotation) if v != value]
        return others[0] if others else None
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2 if value else 0.5
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list) and value and all(type(v) is int for v in value):
        return [*value, max(value) + 1]  # eval.k_values
    return None


def mutations(config: RunConfig, section: str):
    """Every single-field change of `section` (nested sections included) that still validates."""
    base = config.model_dump(mode="json")

    def walk(model: BaseModel, path: tuple[str, ...]):
        for name in type(model).model_fields:
            value = getattr(model, name)
            if isinstance(value, BaseModel):
                yield from walk(value, (*path, name))
                continue
            new = _changed_value(model, name)
            if new is None:
                continue
            data = json.loads(json.dumps(base))
            node = data
            for p in path:
                node = node[p]
            node[name] = new
            try:
                yield ".".join((*path, name)), RunConfig.model_validate(data)
            except ValueError:
                continue

    yield from walk(getattr(config, section), (section,))


@pytest.mark.parametrize("stage", [s.name for s in STAGES])
def test_changing_any_section_a_stage_reads_reruns_it(stage, tmp_path):
    config = RunConfig.model_validate(ALL_ON)
    hashes = stage_hashes(config)
    store = LocalStore(tmp_path / "store")
    write_record(store, f"contract/{stage}", StageRecord(stage, hashes[stage], "complete", {}))
    assert check_stage(store, f"contract/{stage}", hashes[stage], {}).state == "complete"
    for section in STAGE_BY_NAME[stage].sections:
        changes = list(mutations(config, section))
        assert changes, f"no field of {section} could be changed"
        for field, changed in changes:
            if stage not in stage_hashes(changed):  # `<stage>.enabled: false` switches the stage off
                continue
            shard_hash = stage_scope(changed, store, stage).shard_hash  # the shards' reuse hash
            assert shard_hash != stage_scope(config, store, stage).shard_hash, field
            new_hash = stage_hashes(changed)[stage]
            assert new_hash != hashes[stage], field  # the pipeline's stage hash
            assert check_stage(store, f"contract/{stage}", new_hash, {}).state == "stale", field


def test_a_section_no_stage_upstream_reads_leaves_the_stage_alone():
    config = RunConfig.model_validate(ALL_ON)
    hashes = stage_hashes(config)
    changed = RunConfig.model_validate({**ALL_ON, "eval": {"k_values": [5, 50]}})
    moved = {s for s in hashes if stage_hashes(changed)[s] != hashes[s]}
    assert moved == {"eval", "export", "report"}


def test_synth_declares_mining_it_builds_its_index_with():
    assert "mining" in STAGE_BY_NAME["synth"].sections
    config = RunConfig.model_validate(ALL_ON)
    changed = RunConfig.model_validate({**ALL_ON, "mining": {"index": "hnsw"}})
    assert stage_hashes(changed)["synth"] != stage_hashes(config)["synth"]


def test_every_stage_is_declared_once():
    assert len({s.name for s in STAGES}) == len(STAGES) == len(STAGE_BY_NAME)
    assert all(set(s.sections) <= set(RunConfig.model_fields) for s in STAGES)
    assert all(set(s.needs) < set(STAGE_BY_NAME) for s in STAGES)


def test_the_renderers_read_where_a_stage_runs_from_its_declaration():
    from peg.k8s.render import LOCAL_STAGES, TRAINING_STAGES

    assert LOCAL_STAGES == ("prepare",) and TRAINING_STAGES == ("pretrain", "train")
    assert {s.runs for s in STAGES} == {"local", "ray", "torchrun"}


def test_a_stage_writes_only_under_its_prefix_or_what_it_declares(tmp_path):
    store = LocalStore(tmp_path / "store")
    scoped = ScopedStore(store, "eval", ("run/eval", "run/encode"))
    scoped.put_text("run/eval/summary.json", "{}", "eval")
    scoped.put_text("run/encode/query-abc/index.json", "{}", "eval")
    with pytest.raises(StoreError, match="stage eval may not write 'run/train/model/x'"):
        scoped.put_text("run/train/model/x", "bad", "eval")
    with pytest.raises(StoreError, match="may not write"):
        scoped.delete("run/mine")
    assert store.list("run") == ["run/encode/query-abc/index.json", "run/eval/summary.json"]


def test_train_stage_keeps_the_users_train_files_and_passes_the_config_unchanged(tmp_path, monkeypatch):
    from peg.pipeline.stages import _train
    from peg.train.trainer import TrainInputs

    store = LocalStore(tmp_path / "store")
    store.put_text("contract/mine/train.jsonl", '{"query": "q", "pos": ["p"]}\n', "mine")
    config = RunConfig.model_validate({**ALL_ON, "synth": {}, "judge": {}, "score": {}, "pretrain": {},
                                       "data": {"beir": "/b", "train_files": ["/mine/extra.jsonl"]}})
    user = config.model_copy(deep=True)
    seen = {}

    def fake_train(cfg, output, resume, checkpoint_key=None, inputs=None):
        seen["config"], seen["inputs"] = cfg, inputs
        (output / "model").mkdir(parents=True)
        (output / "model" / "w.bin").write_bytes(b"w")
        return output / "model"

    monkeypatch.setitem(sys.modules, "peg.train", types.SimpleNamespace(train=fake_train, TrainInputs=TrainInputs))
    monkeypatch.setitem(sys.modules, "peg.train.checkpoints",
                        types.SimpleNamespace(restore_checkpoint=lambda *a, **k: False))
    monkeypatch.setenv("PEG_WORK_DIR", str(tmp_path / "work"))
    scope = StageScope("contract", "train", "h" * 64, ScopedStore(store, "train", ("contract/train",)))
    _train(StageContext(config, tmp_path / "c.yaml", scope))
    files = seen["inputs"].train_files
    assert files[1:] == ("/mine/extra.jsonl",)  # the user's file is kept, after the pipeline's
    assert Path(files[0]).read_text() == '{"query": "q", "pos": ["p"]}\n'
    assert seen["inputs"].init_model is None  # no pretrain stage: the config's model
    assert seen["config"] == user  # training gets the config as the stage got it, not a rewritten copy
    assert store.list("contract/train/model") == ["contract/train/model/w.bin"]


@pytest.mark.parametrize("pretrain", [False, True])
def test_the_config_the_workers_read_is_the_users(pretrain, tmp_path, monkeypatch):
    """`launch` hands the workers the config as given (config.yaml) and the training inputs
    beside it (inputs.json); pretraining settings are not written over `train` and `batch`."""
    import yaml

    from peg.train import trainer

    (tmp_path / "pairs.jsonl").write_text("".join(
        json.dumps({"query": f"q{i}", "pos": [f"p{i}"], "neg": [f"n{i}", f"m{i}"]}) + "\n" for i in range(8)))
    config = RunConfig.model_validate({
        "name": "worker", "model": {"name_or_path": "/models/m"}, "data": {"train_files": [str(tmp_path / "pairs.jsonl")]},
        "batch": {"queries_per_step": 4, "hard_negatives": 2}, "train": {"nproc_per_node": 2},
        "pretrain": {"enabled": pretrain, "batch_size": 2, "learning_rate": 1e-3}, "eval": {"enabled": False},
    })
    user = config.model_copy(deep=True)
    started = []
    monkeypatch.setattr(trainer.subprocess, "run", lambda cmd, env: started.append(cmd) or types.SimpleNamespace(returncode=0))
    inputs = trainer.TrainInputs((str(tmp_path / "pairs.jsonl"),), "/work/pretrained")
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)  # this process launches the workers
    if pretrain:
        from peg.train.pretrain import pretrain as run_pretrain

        run_pretrain(config, tmp_path / "out")
    else:
        trainer.train(config, tmp_path / "out", inputs=inputs)
    assert started and config == user
    assert RunConfig.model_validate(yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())) == user
    if not pretrain:
        assert trainer.TrainInputs.read(tmp_path / "out" / trainer.INPUTS_FILE) == inputs
