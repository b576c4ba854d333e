"""Export: a sentence-transformers folder gives the same embeddings as peg's Encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from peg.config import ModelConfig
from peg.model.encoder import Encoder, resolve_model_path
from peg.model.export import export_sentence_transformers, interpolate_weights

QUERIES = ["what causes malaria", "effects of aspirin on the heart", "is coffee bad"]
PASSAGES = [
    "Malaria is caused by Plasmodium parasites transmitted by mosquitoes.",
    "Aspirin reduces the risk of heart attack by inhibiting platelets. " * 3,
    "Short.",
]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("sentence-transformers/all-MiniLM-L6-v2"))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128,
    )
    path = tmp_path_factory.mktemp("tiny-bert")
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_sentence_transformers_folder_matches_encoder(tiny_model_dir, tmp_path, pooling):
    from sentence_transformers import SentenceTransformer

    cfg = ModelConfig(
        name_or_path=tiny_model_dir, pooling=pooling, normalize=True, query_prefix="query: ",
        passage_prefix="passage: ", query_max_length=32, passage_max_length=32,
    )
    encoder = Encoder(cfg)
    out = export_sentence_transformers(encoder, tmp_path / "model")
    st = SentenceTransformer(str(out), device="cpu")
    for texts, kind in ((QUERIES, "query"), (PASSAGES, "passage")):
        ours = encoder.encode(texts, kind, batch_size=2)
        theirs = st.encode(texts, prompt_name=kind, convert_to_numpy=True, batch_size=2)
        np.testing.assert_allclose(theirs, ours, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(theirs, axis=1), 1.0, atol=1e-5)
    # the prompts matter: without them the embeddings differ (the test can fail)
    plain = st.encode(QUERIES, convert_to_numpy=True)
    assert not np.allclose(plain, encoder.encode(QUERIES, "query"), atol=1e-4)


@pytest.mark.slow
def test_export_writes_given_state_dict(tiny_model_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    encoder = Encoder(ModelConfig(name_or_path=tiny_model_dir))
    state = {k: v + 0.01 for k, v in encoder.model.state_dict().items()}
    out = export_sentence_transformers(encoder, tmp_path / "model", state_dict=state)
    encoder.model.load_state_dict(state)
    st = SentenceTransformer(str(out), device="cpu")
    np.testing.assert_allclose(st.encode(PASSAGES, prompt_name="passage"), encoder.encode(PASSAGES, "passage"), atol=1e-5)


def test_interpolate_weights_moves_each_float_tensor_a_fraction_of_the_way_from_base():
    base = {"w": torch.zeros(2, 3), "b": torch.ones(3, dtype=torch.bfloat16), "ids": torch.arange(4)}
    trained = {"w": torch.full((2, 3), 4.0), "b": torch.full((3,), 3.0, dtype=torch.bfloat16), "ids": torch.arange(4) + 7}
    out = interpolate_weights(trained, base, 0.25)
    torch.testing.assert_close(out["w"], torch.full((2, 3), 1.0))
    torch.testing.assert_close(out["b"], torch.full((3,), 1.5))  # 1 + 0.25 * (3 - 1), in float32
    assert out["b"].dtype == torch.float32 and torch.equal(out["ids"], trained["ids"])  # buffers as trained
    torch.testing.assert_close(interpolate_weights(trained, base, 1.0)["w"], trained["w"])
    with pytest.raises(ValueError, match="keys"):
        interpolate_weights({**trained, "extra": torch.zeros(1)}, base, 0.5)
    with pytest.raises(ValueError, match="shape at w"):
        interpolate_weights({**trained, "w": torch.zeros(3, 2)}, base, 0.5)


@pytest.mark.slow
def test_export_with_a_finetune_fraction_writes_weights_between_base_and_trained(tiny_model_dir, tmp_path):
    """train.finetune_fraction: the folder holds base + f * (trained - base), base read from
    model.name_or_path, and sentence-transformers embeds with exactly those weights."""
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer

    encoder = Encoder(ModelConfig(name_or_path=tiny_model_dir))
    base = {k: v.clone() for k, v in encoder.model.state_dict().items()}
    trained = {k: v + 0.02 if v.is_floating_point() else v for k, v in base.items()}
    out = export_sentence_transformers(encoder, tmp_path / "model", state_dict=trained, finetune_fraction=0.5)
    written = load_file(out / "model.safetensors")
    for key, value in written.items():
        torch.testing.assert_close(value, base[key] + 0.01, atol=1e-6, rtol=0)
    encoder.model.load_state_dict({k: v + 0.01 if v.is_floating_point() else v for k, v in base.items()})
    st = SentenceTransformer(str(out), device="cpu")
    np.testing.assert_allclose(st.encode(PASSAGES, prompt_name="passage"), encoder.encode(PASSAGES, "passage"), atol=1e-5)


def test_a_bf16_trained_model_exports_as_float32_and_passes_the_export_check(tiny_model_dir, tmp_path):
    """`train.precision: bf16` leaves the model's weights in bf16: the folder still holds float32
    weights and a config that says so, so sentence-transformers runs it as peg's fp32 encoder does."""
    import json

    from safetensors.torch import load_file

    from peg.pipeline.evaluate import check_export

    cfg = ModelConfig(name_or_path=tiny_model_dir, passage_max_length=32)
    encoder = Encoder(cfg)
    encoder.model.to(torch.bfloat16)
    out = export_sentence_transformers(encoder, tmp_path / "model")
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.float32}
    check_export(out, cfg.model_copy(update={"name_or_path": str(out)}), PASSAGES, "passage", None)


@pytest.mark.slow
def test_export_records_the_matryoshka_dims_and_sentence_transformers_loads_a_prefix(tiny_model_dir, tmp_path):
    import json

    from sentence_transformers import SentenceTransformer

    encoder = Encoder(ModelConfig(name_or_path=tiny_model_dir))
    out = export_sentence_transformers(encoder, tmp_path / "model", matryoshka_dims=[8, 32, 16])
    assert json.loads((out / "config_sentence_transformers.json").read_text())["matryoshka_dims"] == [32, 16, 8]
    full = SentenceTransformer(str(out), device="cpu").encode(QUERIES)
    short = SentenceTransformer(str(out), device="cpu", truncate_dim=16).encode(QUERIES)
    assert short.shape == (3, 16)
    np.testing.assert_allclose(short, full[:, :16], atol=1e-6)
    plain = export_sentence_transformers(encoder, tmp_path / "plain")
    assert "matryoshka_dims" not in json.loads((plain / "config_sentence_transformers.json").read_text())


def test_model_card_names_the_matryoshka_dims():
    from peg.config import RunConfig
    from peg.pipeline.evaluate import model_card

    config = RunConfig.model_validate({"name": "demo", "model": {"name_or_path": "m"}})
    assert "Matryoshka" not in model_card(config, None)
    config.loss.matryoshka_dims = [64, 384, 128]
    assert "dimensions [384, 128, 64]" in model_card(config, None) and "truncate_dim=64" in model_card(config, None)


@pytest.mark.slow
def test_decoder_with_a_chat_template_exports_plain_text_last_token_embeddings(tmp_path):
    """sentence-transformers renders texts through a tokenizer's chat template unless the folder pins
    the text modality; peg's encoder feeds the plain (prefixed) text, so the export must pin it."""
    from sentence_transformers import SentenceTransformer
    from tiny import make_tiny_llama

    encoder = Encoder(ModelConfig(name_or_path=str(make_tiny_llama(tmp_path / "llama")), pooling="last",
                                  query_prefix="Instruct: answer\nQuery: ", query_max_length=32, passage_max_length=32))  # fmt: skip
    assert encoder.tokenizer.chat_template
    st = SentenceTransformer(str(export_sentence_transformers(encoder, tmp_path / "model")), device="cpu")
    for texts, kind in ((QUERIES, "query"), (PASSAGES, "passage")):
        ours = encoder.encode(texts, kind, batch_size=1)
        np.testing.assert_allclose(st.encode(texts, prompt_name=kind, batch_size=1), ours, atol=1e-5)
