"""LLM embedders with LoRA: a tiny random Llama as the encoder (last-token pooling, instruction
prefix for queries), adapters only trained, GradCache gradients equal to uncached, export merged
or as an adapter that sentence-transformers loads, and a 2-rank ZeRO-2 training run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import run, write_pairs
from tiny import make_tiny_llama

from peg.config import LoraSettings, ModelConfig
from peg.losses import GradCache, InfoNCELoss, passage_ids_from_texts
from peg.losses.gradcache import split_inputs
from peg.model.encoder import Encoder
from peg.model.export import export_sentence_transformers
from peg.model.lora import apply_lora, is_lora, parameter_counts

pytestmark = pytest.mark.slow  # a tiny Llama with SmolLM2's tokenizer, torchrun

QUERIES = ["what causes rain", "boiling point of water", "who wrote hamlet", "speed of light"]
PASSAGES = [t for q in QUERIES for t in (f"an answer about {q}", f"unrelated words {len(q)}")]
INSTRUCTION = "Instruct: find a passage that answers the question\nQuery: "


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    return str(make_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


def llm_config(path: str, **lora) -> ModelConfig:
    return ModelConfig(name_or_path=path, pooling="last", query_prefix=INSTRUCTION, query_max_length=32,
                       passage_max_length=32, lora=LoraSettings(enabled=True, **lora))  # fmt: skip


def perturb_adapters(encoder: Encoder) -> None:
    """LoRA's B starts at zero; give the adapters weights so that they change the embeddings."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in encoder.model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))


def test_lora_trains_only_the_adapters_and_starts_as_the_base_model(llama_dir):
    encoder = Encoder(llm_config(llama_dir))
    assert encoder.tokenizer.padding_side == "left" and encoder.tokenizer.pad_token is not None
    before = encoder.encode(QUERIES, "query")
    apply_lora(encoder, encoder.config.lora)
    assert is_lora(encoder.model)
    np.testing.assert_allclose(encoder.encode(QUERIES, "query"), before, atol=1e-6)  # B = 0: the base model
    trainable, total = parameter_counts(encoder)
    names = [n for n, p in encoder.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names) and 0 < trainable < 0.1 * total
    assert {n.split(".")[-4] for n in names} == {"q_proj", "v_proj"}  # peft's default for Llama
    # the instruction prefix reaches queries only
    assert not np.allclose(encoder.encode(QUERIES, "query"), encoder.encode(QUERIES, "passage"), atol=1e-4)


def test_lora_with_unknown_target_modules_is_a_clear_error(llama_dir):
    from peg.model.lora import LoraError

    encoder = Encoder(llm_config(llama_dir, target_modules=["no_such_proj"]))
    with pytest.raises(LoraError, match="model.lora"):
        apply_lora(encoder, encoder.config.lora)


def test_gradcache_gradients_with_lora_equal_the_uncached_ones(llama_dir):
    encoder = Encoder(llm_config(llama_dir, dropout=0.1, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    apply_lora(encoder, encoder.config.lora)
    perturb_adapters(encoder)
    encoder.train()
    q_inputs, p_inputs = dict(encoder.tokenize(QUERIES, "query")), dict(encoder.tokenize(PASSAGES, "passage"))
    extra = {"passage_ids": passage_ids_from_texts(PASSAGES)}
    loss_fn = InfoNCELoss()

    def grads() -> dict[str, torch.Tensor]:
        out = {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}
        encoder.zero_grad(set_to_none=True)
        return out

    torch.manual_seed(3)
    q = torch.cat([encoder(**c) for c in split_inputs(q_inputs, 3)])
    p = torch.cat([encoder(**c) for c in split_inputs(p_inputs, 3)])
    loss_fn(q, p, **extra).backward()
    reference = grads()
    torch.manual_seed(3)
    GradCache(loss_fn, 3).step(lambda inputs: encoder(**inputs), q_inputs, p_inputs, extra)
    cached = grads()
    assert cached.keys() == reference.keys() and all("lora_" in n for n in cached) and len(cached) == 16
    for name, grad in reference.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(cached[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_merged_export_round_trips_through_sentence_transformers(llama_dir, tmp_path):
    """Also the plain-text input of a decoder whose tokenizer has a chat template: sentence-transformers
    must not render queries through it (it did before the export pinned the text modality)."""
    from sentence_transformers import SentenceTransformer

    encoder = Encoder(llm_config(llama_dir))
    assert encoder.tokenizer.chat_template
    apply_lora(encoder, encoder.config.lora)
    perturb_adapters(encoder)
    out = export_sentence_transformers(encoder, tmp_path / "model")
    files = {p.name for p in out.iterdir()}
    assert "model.safetensors" in files and "adapter_config.json" not in files
    st = SentenceTransformer(str(out), device="cpu")
    for texts, kind in ((QUERIES, "query"), (PASSAGES, "passage")):
        ours = encoder.encode(texts, kind, batch_size=1)
        theirs = st.encode(texts, prompt_name=kind, convert_to_numpy=True, batch_size=1)
        np.testing.assert_allclose(theirs, ours, atol=1e-5)
    # and peg reads the folder back (the pipeline's eval and export stages do)
    reread = Encoder(ModelConfig(name_or_path=str(out), pooling="last", query_prefix=INSTRUCTION, query_max_length=32))
    np.testing.assert_allclose(reread.encode(QUERIES, "query", batch_size=1), encoder.encode(QUERIES, "query", batch_size=1), atol=1e-5)
    base = Encoder(ModelConfig(name_or_path=llama_dir, pooling="last", query_prefix=INSTRUCTION, query_max_length=32))
    assert not np.allclose(base.encode(QUERIES, "query"), encoder.encode(QUERIES, "query"), atol=1e-3)


def test_a_finetune_fraction_scales_the_merged_adapters_update(llama_dir, tmp_path):
    """LoRA with train.finetune_fraction f: the merged weights move f of the way from the base's,
    so each adapted matrix gets f times the adapters' product and every other weight stays the base's."""
    from safetensors.torch import load_file

    encoder = Encoder(llm_config(llama_dir))
    apply_lora(encoder, encoder.config.lora)
    perturb_adapters(encoder)
    full = load_file(export_sentence_transformers(encoder, tmp_path / "full") / "model.safetensors")
    part = load_file(export_sentence_transformers(encoder, tmp_path / "part", finetune_fraction=0.3) / "model.safetensors")
    base = Encoder(ModelConfig(name_or_path=llama_dir, pooling="last")).model.state_dict()
    assert full.keys() == part.keys() == set(base)
    moved = [k for k in full if not torch.allclose(full[k], base[k])]
    assert moved and all(k.split(".")[-2] in ("q_proj", "v_proj") for k in moved)
    for key in full:
        torch.testing.assert_close(part[key], base[key] + 0.3 * (full[key] - base[key]), atol=1e-6, rtol=0)


def test_two_rank_zero2_gradcache_training_changes_only_the_adapted_weights(llama_dir, tmp_path):
    from safetensors.torch import load_file

    config = {
        "name": "lora",
        "data": {"train_files": [write_pairs(tmp_path / "a.jsonl", "alpha", 16, 2)]},
        "model": {"name_or_path": llama_dir, "pooling": "last", "query_prefix": INSTRUCTION, "query_max_length": 24,
                  "passage_max_length": 24, "lora": {"enabled": True, "r": 4, "alpha": 8}},
        "batch": {"queries_per_step": 4, "hard_negatives": 2, "chunk_size": 3},
        "train": {"learning_rate": 1e-2, "nproc_per_node": 2, "zero_stage": 2, "max_steps": 3, "warmup_ratio": 0.0},
    }
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))
    proc = run([sys.executable, "-m", "peg", "train", str(path), "--output", str(tmp_path / "out")], timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    trained = load_file(tmp_path / "out" / "model" / "model.safetensors")
    base = load_file(Path(llama_dir) / "model.safetensors")
    changed = {k for k in trained if not torch.equal(trained[k], base["model." + k] if "model." + k in base else base[k])}
    assert changed and {k.split(".")[-2] for k in changed} == {"q_proj", "v_proj"}
