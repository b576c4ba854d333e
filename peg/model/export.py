"""Export an `Encoder` as a sentence-transformers folder.

`SentenceTransformer(path).encode(texts, prompt_name="query" | "passage")` then gives peg's
embeddings: same weights and tokenizer, same pooling (mean / cls / lasttoken), the same L2
normalisation and the prefixes as named prompts. sentence-transformers keeps one max length,
so the folder uses `passage_max_length`; queries longer than `query_max_length` tokens are
the one case where the two differ.

A LoRA-trained encoder (`peg.model.lora`) is written with its adapters merged into the weights.

With `train.finetune_fraction` f < 1 the weights written are WiSE-FT's (Wortsman et al. 2022):
`base + f * (trained - base)`, base the weights training started from (`interpolate_weights`).

A model trained with Matryoshka losses records its dimensions as `matryoshka_dims` in
`config_sentence_transformers.json` (largest first); load a prefix with
`SentenceTransformer(path, truncate_dim=d)`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from peg.config import ModelConfig
from peg.model.encoder import Encoder, resolve_model_path
from peg.model.lora import is_lora, merged_copy
from peg.store.files import dir_mode

_POOLING = {"mean": "mean", "cls": "cls", "last": "lasttoken"}


@contextlib.contextmanager
def staged_folder(path: Path) -> Iterator[Path]:
    """Yield an empty sibling folder to fill; on success it replaces `path` (a folder), else it is removed."""
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.st."))
    tmp.chmod(dir_mode())  # readable by other users, like any folder
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_model_folder(source: Path, path: Path) -> Path:
    """Replace `path` with a copy of the exported model folder `source`; returns `path`."""
    with staged_folder(path) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
    return path


def float32_state(state_dict: dict) -> dict:
    """`state_dict` with every floating tensor as a CPU float32 copy (bf16 training keeps bf16 weights)."""
    return {k: v.detach().to("cpu", torch.float32) if v.is_floating_point() else v for k, v in state_dict.items()}


def interpolate_weights(trained: dict, base: dict, fraction: float) -> dict:
    """WiSE-FT weights (Wortsman et al. 2022): `base + fraction * (trained - base)` for each floating
    tensor, as CPU float32; other tensors (integer buffers) as `trained` has them. `fraction` 1 is
    `trained`, 0 is `base`. Raises ValueError when the two differ in a key or a shape."""
    if trained.keys() != base.keys():
        raise ValueError(f"weights differ in keys: {sorted(trained.keys() ^ base.keys())[:5]}")
    out = {}
    for key, value in trained.items():
        if value.shape != base[key].shape:
            raise ValueError(f"weights differ in shape at {key}: {tuple(value.shape)} vs {tuple(base[key].shape)}")
        if not value.is_floating_point():
            out[key] = value
            continue
        start, end = base[key].detach().to("cpu", torch.float32), value.detach().to("cpu", torch.float32)
        out[key] = start + fraction * (end - start)
    return out


def record_float32(config_file: Path) -> None:
    """Make the saved transformers config say float32, as its weights are: transformers records the
    live model's dtype (bf16 after bf16 training), and sentence-transformers would then load and run
    the exported float32 weights in bf16."""
    config = json.loads(config_file.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = "float32"
    config_file.write_text(json.dumps(config, indent=2) + "\n")


def base_weights(config: ModelConfig) -> dict:
    """The weights training started from: `config.name_or_path` loaded as a plain transformers model, float32."""
    from transformers import AutoModel

    return float32_state(AutoModel.from_pretrained(resolve_model_path(config.name_or_path)).state_dict())


def export_sentence_transformers(
    encoder: Encoder,
    path: str | Path,
    state_dict: dict | None = None,
    matryoshka_dims: list[int] | None = None,
    finetune_fraction: float = 1.0,
) -> Path:
    """Write `encoder` (or its weights from `state_dict`) to `path` atomically, as float32 weights
    whatever the dtype trained in; returns `path`.
    `matryoshka_dims`: the embedding prefixes it was trained for, recorded in the folder's config.
    `finetune_fraction` below 1: the weights written are interpolated toward `base_weights` of the
    encoder's model config (`interpolate_weights`, train.finetune_fraction)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = encoder.config
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.hf.") as hf_dir:
        if is_lora(encoder.model):  # LoRA: the adapters merged into plain weights
            plain = merged_copy(encoder.model, state_dict)
            weights = float32_state(plain.state_dict())
        else:
            plain, weights = encoder.model, float32_state(state_dict or encoder.model.state_dict())
        if finetune_fraction != 1.0:
            weights = interpolate_weights(weights, base_weights(cfg), finetune_fraction)
        plain.save_pretrained(hf_dir, state_dict=weights)
        record_float32(Path(hf_dir) / "config.json")
        encoder.tokenizer.save_pretrained(hf_dir)
        modules = [
            # plain text: sentence-transformers would render the texts through a chat template the tokenizer
            # carries (decoder LLMs), which peg's encoder never does
            Transformer(hf_dir, max_seq_length=cfg.passage_max_length, module_output_name="token_embeddings",
                        modality_config={"text": {"method": "forward", "method_output_name": "last_hidden_state"}}),
            Pooling(encoder.dim, pooling_mode=_POOLING[cfg.pooling]),
        ]
        if cfg.normalize:
            modules.append(Normalize())
        prompts = {"query": cfg.query_prefix, "passage": cfg.passage_prefix}
        st = SentenceTransformer(modules=modules, prompts=prompts, similarity_fn_name="cosine", device="cpu")
        with staged_folder(path) as tmp:
            st.save(str(tmp))
            if matryoshka_dims:
                st_config = tmp / "config_sentence_transformers.json"
                recorded = {**json.loads(st_config.read_text()), "matryoshka_dims": sorted(matryoshka_dims, reverse=True)}
                st_config.write_text(json.dumps(recorded, indent=2) + "\n")
    return path
