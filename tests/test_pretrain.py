"""PEG pretraining (RetroMAE-style masked auto-encoding): masking rates, loss going down on a tiny
corpus, exact resume from a checkpoint restored from the store (DeepSpeed ZeRO-2, one rank in the
test process; the torchrun launch and multi-rank resume are the trainer's, tested in test_train)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny import make_tiny_beir, make_tiny_model, train_in_this_process

from peg.config import ConfigError, PretrainConfig, load_config, parse_config
from peg.store import open_store
from peg.train.checkpoints import restore_checkpoint
from peg.train.metrics import read_metrics
from peg.train.pretrain import mask_tokens, pretrain, pretrain_identity, step_masks
from peg.train.trainer import TrainError, check_resume


def test_mask_tokens_masks_the_rate_of_maskable_tokens_only():
    ids = torch.arange(100, 140).reshape(2, 20)
    special = torch.zeros(2, 20, dtype=torch.bool)
    special[:, 0] = special[:, -1] = True  # [CLS] / [SEP]
    special[1, 12:] = True  # padding
    generator = torch.Generator().manual_seed(0)
    masked, labels = mask_tokens(ids, special, 0.3, mask_id=7, generator=generator)
    chosen = masked == 7
    assert chosen.sum(dim=1).tolist() == [round(18 * 0.3), round(11 * 0.3)]
    assert not (chosen & special).any()
    assert torch.equal(labels[chosen], ids[chosen]) and (labels[~chosen] == -100).all()
    assert torch.equal(masked[~chosen], ids[~chosen])


def test_step_masks_respect_both_rates(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(make_tiny_model(tmp_path / "m"))
    texts = ["the star and the planet orbit a galaxy far away from here", "bread flour butter"]
    p = PretrainConfig(encoder_mask_rate=0.15, decoder_mask_rate=0.7)
    inputs = step_masks(tokenizer, texts, p, seed=3)
    tokens = tokenizer(texts, padding=True, return_special_tokens_mask=True, return_tensors="pt")
    maskable = ((tokens["special_tokens_mask"] == 0) & (tokens["attention_mask"] == 1)).sum(dim=1)
    for key, rate in (("encoder_labels", 0.15), ("decoder_labels", 0.7)):
        counts = (inputs[key] != -100).sum(dim=1)
        assert counts.tolist() == [max(1, round(int(n) * rate)) for n in maskable]
    assert torch.equal(step_masks(tokenizer, texts, p, seed=3)["decoder_ids"], inputs["decoder_ids"])


def test_mask_rates_outside_the_ranges_are_config_errors():
    for rates in ({"encoder_mask_rate": 0.4}, {"decoder_mask_rate": 0.3}):
        with pytest.raises(ConfigError, match="pretrain"):
            parse_config(yaml.safe_dump({"model": {"name_or_path": "m"}, "pretrain": rates}))


def test_a_pretraining_checkpoint_of_another_plan_is_refused(tmp_path):
    run = parse_config(yaml.safe_dump({"model": {"name_or_path": "m"}, "pretrain": {"batch_size": 8}}))
    texts = ["a passage", "another passage"]
    tag = tmp_path / "step00000003"
    tag.mkdir()
    (tmp_path / "latest").write_text(tag.name)
    (tag / "plan.json").write_text(json.dumps(pretrain_identity(run, texts, 1, 6)))
    assert check_resume(tmp_path, pretrain_identity(run, texts, 1, 6)) == tag.name
    other = run.model_copy(deep=True)
    other.pretrain.batch_size = 4
    with pytest.raises(TrainError, match=r"another training plan \(pretrain.batch_size 8 -> 4\)"):
        check_resume(tmp_path, pretrain_identity(other, texts, 1, 6))
    with pytest.raises(TrainError, match=r"\(passages sha256 "):
        check_resume(tmp_path, pretrain_identity(run, ["a passage", "an edited passage"], 1, 6))


@pytest.mark.slow
def test_pretraining_learns_and_resumes_exactly_from_the_store(tmp_path, monkeypatch):
    """ZeRO-2, dropout on, one rank in this process: the loss goes down; the step-3 checkpoint goes
    to the store, and a run restored from there (a fresh disk) gives the uninterrupted run's losses
    for steps 4-6 and the same exported weights."""
    train_in_this_process(monkeypatch)
    config = {
        "name": "pretrain-test",
        "data": {"beir": str(make_tiny_beir(tmp_path / "beir"))},
        "model": {"name_or_path": str(make_tiny_model(tmp_path / "model"))},
        "pretrain": {"enabled": True, "batch_size": 8, "max_length": 24, "max_steps": 6, "learning_rate": 3e-3,
                     "checkpoint_every": 3},
        "train": {"nproc_per_node": 1, "zero_stage": 2, "warmup_ratio": 0.1},
        "store": {"uri": str(tmp_path / "store")},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    run = load_config(path)
    key = "pretrain-test/pretrain/checkpoints"
    full = tmp_path / "full"
    pretrain(run, full, checkpoint_key=key)
    records = read_metrics(full / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 7))
    losses = [r["loss"] for r in records]
    assert sum(losses[-2:]) < sum(losses[:2]) - 1.0, losses
    assert all(r["loss"] == pytest.approx(r["encoder_mlm"] + r["decoder_mlm"], rel=1e-5) for r in records)

    resumed = tmp_path / "resumed"
    assert restore_checkpoint(open_store(run.store), key, resumed / "checkpoints")
    assert (resumed / "checkpoints" / "latest").read_text().strip() == "step00000003"
    pretrain(run, resumed, resume=True)
    assert read_metrics(resumed / "metrics.jsonl") == records[3:]
    weights = lambda d: load_file(next(Path(d, "model").rglob("model.safetensors")))  # noqa: E731
    a, b = weights(full), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
