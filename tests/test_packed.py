"""Packed (unpadded) inputs and token-budget chunks: the same embeddings and gradients as padded
batches of texts (CPU: transformers' block-diagonal mask over the packed row stands in for the
varlen kernel a GPU runs)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel, Qwen2Config, Qwen2Model

from peg.config import ConfigError, LossConfig, ModelConfig, RunConfig
from peg.losses import GradCache, build_loss, passage_ids_from_texts
from peg.model.encoder import Encoder, resolve_model_path
from peg.train.batches import RankBatch, group_by_length, prepare_step

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
QUERIES = ["what causes rain", "boiling point of water at altitude", "who wrote hamlet", "light"]
PASSAGES = [
    "rain forms when water vapour condenses into droplets heavy enough to fall",
    "a passage",
    "water boils at a lower temperature at high altitude because the air pressure is lower there",
    "hamlet is a tragedy written by william shakespeare around 1600",
    "unrelated text about markets and loans and the price of bread in the old town square",
    "light",
    "the speed of light in vacuum is about 300,000 kilometres per second",
    "an answer",
]


def tiny_encoder(pooling: str, packed: str, attn: str = "sdpa") -> Encoder:
    path = resolve_model_path(MINILM)
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, attn_implementation=attn)
    torch.manual_seed(0)
    model_config = ModelConfig(name_or_path=path, pooling=pooling, query_max_length=16, passage_max_length=32,
                               packed_inputs=packed)
    return Encoder(model_config, model=BertModel(config), tokenizer=tokenizer).eval()


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def test_minilm_packed_embeddings_equal_padded():
    """The real MiniLM, fp32: every text's embedding from one packed row equals the padded batch's."""
    padded = Encoder(ModelConfig(name_or_path=MINILM, packed_inputs="off"))
    packed = Encoder(ModelConfig(name_or_path=MINILM, packed_inputs="on"), model=padded.model, tokenizer=padded.tokenizer)
    assert packed.packs and not padded.packs
    features = dict(padded.tokenize(PASSAGES, "passage", padding=False))
    inputs = packed.pack(features)
    assert inputs["input_ids"].shape == (1, sum(len(ids) for ids in features["input_ids"]))  # no padding at all
    with torch.no_grad():
        torch.testing.assert_close(packed(**inputs), padded(**padded.pad(features)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.from_numpy(packed.encode(PASSAGES, "passage", batch_size=3)),
                               torch.from_numpy(padded.encode(PASSAGES, "passage", batch_size=3)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_packed_pooling_equals_padded(pooling, attn):
    padded, packed = tiny_encoder(pooling, "off", attn), tiny_encoder(pooling, "on", attn)
    features = dict(padded.tokenize(PASSAGES, "passage", padding=False))
    with torch.no_grad():
        torch.testing.assert_close(packed(**packed.pack(features)), padded(**padded.pad(features)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_decoder_last_token_equals_left_padded(attn):
    """A decoder embedder (pooling last, causal attention, left padding when padded): each packed
    text attends causally within itself only, and its last token is read."""
    path = resolve_model_path(MINILM)
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = Qwen2Config(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         attn_implementation=attn)  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2Model(config)
    encoders = [Encoder(ModelConfig(name_or_path=path, pooling="last", passage_max_length=32, packed_inputs=mode),
                        model=model, tokenizer=AutoTokenizer.from_pretrained(path)).eval() for mode in ("off", "on")]
    padded, packed = encoders
    features = dict(padded.tokenize(PASSAGES, "passage", padding=False))
    with torch.no_grad():
        torch.testing.assert_close(packed(**packed.pack(features)), padded(**padded.pad(features)), rtol=1e-5, atol=1e-5)


def test_auto_packs_only_with_a_varlen_kernel():
    assert not tiny_encoder("mean", "auto", "sdpa").packs and not tiny_encoder("mean", "auto", "eager").packs
    encoder = tiny_encoder("mean", "auto", "sdpa")
    encoder.model.config._attn_implementation = "flash_attention_2"  # what from_pretrained sets when asked for it
    assert encoder.packs


@pytest.mark.parametrize("packed", [False, True])
def test_token_budget_chunks_stay_within_the_budget(packed):
    encoder = tiny_encoder("mean", "on" if packed else "off")
    features = dict(encoder.tokenize(PASSAGES, "passage", padding=False))
    lengths = [len(ids) for ids in features["input_ids"]]
    budget = 40
    chunks = group_by_length(features, None, encoder.collate, chunk_tokens=budget, packed=packed)
    assert sorted(chunks.rows.tolist()) == list(range(len(PASSAGES)))
    order = chunks.rows.tolist()
    assert [lengths[i] for i in order] == sorted(lengths, reverse=True)
    sizes = [part["cu_seq_lens"].numel() - 1 if packed else part["input_ids"].shape[0] for part in chunks.parts]
    start = 0
    for part, size in zip(chunks.parts, sizes, strict=True):
        rows = [lengths[i] for i in order[start : start + size]]
        cost = sum(rows) if packed else len(rows) * max(rows)
        assert cost <= budget or size == 1  # a text longer than the budget gets a chunk of its own
        if start + size < len(order):  # greedy: the next text would not have fitted
            nxt = lengths[order[start + size]]
            assert (cost + nxt if packed else (len(rows) + 1) * max(rows)) > budget
        tokens = part["input_ids"].numel()
        assert tokens == (sum(rows) if packed else len(rows) * max(rows))
        start += size
    assert len(chunks.parts) > 2


def test_packed_token_chunks_give_the_full_padded_batch_gradients():
    """GradCache over packed token-budget chunks (any budget) equals one padded graph over the batch.
    In float64, so the only difference left is summation order."""
    loss_fn = build_loss(LossConfig(), normalize=True)
    padded, packed = tiny_encoder("mean", "off").double(), tiny_encoder("mean", "on").double()
    passages = PASSAGES[:8]
    extra = {"passage_ids": passage_ids_from_texts(passages)}
    q_features = dict(padded.tokenize(QUERIES, "query", padding=False))
    p_features = dict(padded.tokenize(passages, "passage", padding=False))
    plain_loss = GradCache(loss_fn, None).step(lambda x: padded(**x), padded.pad(q_features), padded.pad(p_features),
                                               extra)  # fmt: skip
    plain = grads(padded)
    for budget in (1, 25, 60, 10_000):
        q_chunks = group_by_length(q_features, None, packed.collate, chunk_tokens=budget, packed=True)
        p_chunks = group_by_length(p_features, None, packed.collate, chunk_tokens=budget, packed=True)
        loss = GradCache(loss_fn, budget).step(lambda x: packed(**x), q_chunks, p_chunks, extra)
        got = grads(packed)
        torch.testing.assert_close(loss, plain_loss, rtol=1e-10, atol=1e-12)
        assert got.keys() == plain.keys()
        for name, grad in plain.items():
            torch.testing.assert_close(got[name], grad, rtol=1e-9, atol=1e-12, msg=f"budget {budget}: {name}")


def test_prepare_step_packs_token_budget_chunks():
    encoder = tiny_encoder("mean", "on")
    batch = RankBatch(dataset="d", queries=QUERIES[:2], passages=PASSAGES[:4], teacher_scores=None)
    step = prepare_step(encoder, batch, None, chunk_tokens=30)
    for chunks in (step.queries, step.passages):
        assert all(set(part) == {"input_ids", "position_ids", "cu_seq_lens"} for part in chunks.parts)
    assert step.tokens == sum(p["input_ids"].numel() for c in (step.queries, step.passages) for p in c.parts)


def test_chunk_size_and_chunk_tokens_exclude_each_other():
    with pytest.raises((ConfigError, ValueError), match="batch.chunk_size and batch.chunk_tokens are both set"):
        RunConfig.model_validate({"name": "t", "model": {"name_or_path": MINILM},
                                  "batch": {"chunk_size": 8, "chunk_tokens": 4096}})
