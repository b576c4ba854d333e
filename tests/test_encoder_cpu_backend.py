"""`model.cpu_backend`: bf16 autocast encodes like fp32 on a tiny random BERT, applies to encode and
never to a training forward, and a bad value is one line naming the key."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny import make_tiny_model
from typer.testing import CliRunner

from peg.cli import app
from peg.model import Encoder, model_config_for

TEXTS = [
    "alpha beta gamma " * n + "protein cell gene virus star orbit" for n in range(1, 40, 3)
] + ["a", "bread oven market loan song"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def encoder(model_dir, backend: str) -> Encoder:
    return Encoder(model_config_for(str(model_dir), cpu_backend=backend, passage_max_length=128))


def test_bf16_embeddings_equal_fp32_within_cosine_0_999(model_dir):
    fp32 = encoder(model_dir, "torch_fp32").encode(TEXTS, "passage", batch_size=4)
    bf16 = encoder(model_dir, "torch_bf16").encode(TEXTS, "passage", batch_size=4)
    assert bf16.dtype == np.float32 and bf16.shape == fp32.shape
    cosine = np.sum(fp32 * bf16, axis=1) / (np.linalg.norm(fp32, axis=1) * np.linalg.norm(bf16, axis=1))
    assert cosine.min() >= 0.999, cosine
    assert not np.array_equal(fp32, bf16)  # the bf16 path really ran in bf16
    np.testing.assert_allclose(np.linalg.norm(bf16, axis=1), 1.0, atol=1e-5)  # normalised in fp32


def test_bf16_backend_leaves_the_training_forward_in_fp32(model_dir):
    fp32, bf16 = encoder(model_dir, "torch_fp32"), encoder(model_dir, "torch_bf16")
    batch = fp32.tokenize(TEXTS, "passage")
    torch.testing.assert_close(bf16(**batch), fp32(**batch), rtol=0, atol=0)


def test_bad_cpu_backend_is_one_line_naming_the_key(tmp_path, model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "cfg.yaml"
    config.write_text(f"name: bad\nmodel: {{name_or_path: {model_dir}, cpu_backend: onnx}}\nstore: {{uri: store}}\n")
    result = CliRunner().invoke(app, ["config", "show", str(config)])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1, result.output
    assert "cfg.yaml:2: model.cpu_backend: Input should be 'torch_fp32' or 'torch_bf16'" in lines[0]


def test_attention_dropout_zero_makes_a_training_forward_deterministic_where_the_checkpoints_is_not(tmp_path):
    """`model.attention_dropout` replaces the checkpoint's (0.1 here): with hidden dropout at 0 as
    well, a train-mode forward then equals an eval-mode one; with the checkpoint's own it does not."""
    from transformers import BertConfig, BertModel

    path = make_tiny_model(tmp_path / "m")
    settings = BertConfig.from_pretrained(path)
    settings.hidden_dropout_prob = 0.0  # only the attention dropout is left to differ
    BertModel.from_pretrained(path, config=settings).save_pretrained(path)
    batch = None
    for override, deterministic in ((None, False), (0.0, True)):
        model = Encoder(model_config_for(str(path), attention_dropout=override, passage_max_length=128))
        batch = batch or model.tokenize(TEXTS, "passage")
        assert model.model.config.attention_probs_dropout_prob == (0.1 if override is None else 0.0)
        with torch.no_grad():
            evaluated = model.eval()(**batch)
            torch.manual_seed(0)
            trained = model.train()(**batch)
        assert torch.equal(trained, evaluated) is deterministic


def test_attention_dropout_on_a_model_without_that_setting_names_the_key(tmp_path, monkeypatch):
    from peg.config import ConfigError
    from peg.model import encoder as encoder_module

    path = make_tiny_model(tmp_path / "m")
    monkeypatch.setattr(encoder_module, "ATTENTION_DROPOUT_KEYS", ("no_such_dropout",))
    with pytest.raises(ConfigError, match=r"model.attention_dropout: .* \(bert\) has no attention dropout setting"):
        Encoder(model_config_for(str(path), attention_dropout=0.0))
