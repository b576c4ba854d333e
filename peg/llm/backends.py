"""Inference backends for the LLM stages: the same three operations on token id sequences, run by
transformers (`llm.backend: transformers`) or CTranslate2 (`llm.backend: ctranslate2`).

- `next_token_logits(sequences)`: float32 logits of the token after each sequence ([batch, vocab]);
  the `yes_no` scorer's input.
- `continuation_log_probs(sequences, lengths)`: the mean log-probability of the last `lengths[i]`
  tokens of sequence i given the tokens before them; the `query_likelihood` scorer's input.
- `shared_prefix_log_probs(groups, batch_size)` (a backend whose `reuses_prefix` is true:
  transformers on CPU): the same for the sequences `prefix + continuation` of each (prefix,
  continuations) group, the prefixes run once (as one batch) and each continuation on its prefix's
  cached keys and values, so a passage scored against n queries costs one passage prefill, not n.
  CTranslate2's `score_batch` keeps no such cache.
- `generate(sequences, max_new_tokens, temperature, seed)`: new token ids after each sequence (end
  token excluded); greedy at temperature 0, else sampled from the full distribution.

CTranslate2 runs a folder converted once from the transformers folder (`llm.path`, or the cached
fp32 expansion of a GGUF file) and cached under `$PEG_CACHE_DIR/ct2/<sha256 of the folder's
files>/` as float32; `llm.compute_type` picks the weights' type at load (`int8`, its default:
quantized on load; `float32`: the same numbers as transformers up to summation order; `bfloat16`
where ctranslate2 supports it on the device). Greedy generations and float32 scores equal the
transformers path's (tests/test_llm_backends.py). The transformers path runs float32 (default) or
bfloat16: on a CPU with AMX or AVX512-BF16, bf16 scoring is ~3x float32's, with scores close to
float32's and ranked alike (tests/test_llm_backends.py); speed: bench/llm_backends.py.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from peg.config import LLMConfig
from peg.llm.loading import LLMError, cache_dir, cached_conversion, load_causal_lm, model_folder
from peg.store.files import file_sha256


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded input_ids, attention_mask and position_ids counting from each row's first token."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, width - len(seq) :] = torch.tensor(list(seq), dtype=torch.long)
        attention_mask[row, width - len(seq) :] = 1
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if pad is None else pad  # padded positions are masked out; any id works


class TransformersLM:
    """A transformers causal LM; batches are left-padded with explicit position ids, so a sequence
    gives the same numbers alone or in any batch. On CPU, where arithmetic bounds the speed, it
    reuses a shared prompt prefix's keys and values (`reuses_prefix`); on a GPU, batched whole
    prompts keep the device busier than one prefix at a time."""

    def __init__(self, model, tokenizer):
        self.model = model.eval()
        self.pad_id = _pad_id(tokenizer)
        # transformers 5 renamed the key/value cache argument and output from past_key_values to cache
        self.cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.reuses_prefix = self._device().type == "cpu"

    def _device(self):
        return next(self.model.parameters()).device

    @torch.no_grad()
    def next_token_logits(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        batch = left_pad(sequences, self.pad_id)
        out = self.model(**{k: v.to(self._device()) for k, v in batch.items()}, logits_to_keep=1)
        return out.logits[:, -1].float().cpu()

    @torch.no_grad()
    def continuation_log_probs(self, sequences: Sequence[Sequence[int]], lengths: Sequence[int]) -> np.ndarray:
        device = self._device()
        batch = left_pad(sequences, self.pad_id)
        keep = max(lengths) + 1
        logits = self.model(**{k: v.to(device) for k, v in batch.items()}, logits_to_keep=keep).logits.float()
        log_probs = torch.log_softmax(logits[:, :-1], dim=-1)  # position j predicts token j + 1
        targets = batch["input_ids"][:, -(keep - 1) :].to(device)
        token_lp = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        n = torch.tensor(list(lengths), device=device)
        mask = torch.arange(keep - 1, device=device).unsqueeze(0) >= (keep - 1 - n).unsqueeze(1)
        return ((token_lp * mask).sum(dim=1) / n).cpu().numpy()

    @torch.no_grad()
    def shared_prefix_log_probs(
        self, groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]], batch_size: int
    ) -> list[np.ndarray]:
        """For each (prefix, continuations) group, the mean log-probability of each continuation
        after its prefix: the groups' prefixes run as one left-padded batch, then every
        continuation, `batch_size` at a time across the groups, on its own prefix's cached keys and
        values (right-padded, so padding comes after every real token)."""
        device = self._device()
        prefixes = left_pad([prefix for prefix, _ in groups], self.pad_id)
        out = self.model(**{k: v.to(device) for k, v in prefixes.items()}, use_cache=True, logits_to_keep=1)
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # predicts each continuation's first token
        prefill = getattr(out, self.cache_name)
        prefix_mask, prefix_len = prefixes["attention_mask"], prefixes["attention_mask"].sum(dim=1)
        scores = [np.empty(len(continuations), dtype=np.float32) for _, continuations in groups]
        rows = sorted(
            ((g, j) for g, (_, continuations) in enumerate(groups) for j in range(len(continuations))),
            key=lambda row: len(groups[row[0]][1][row[1]]),  # chunks of like lengths pad less
        )
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            tokens = [list(groups[g][1][j]) for g, j in chunk]
            owner = torch.tensor([g for g, _ in chunk])
            n, width = len(tokens), max(len(t) for t in tokens)
            ids = torch.full((n, width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((n, width), dtype=torch.long)
            for row, seq in enumerate(tokens):
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            cache = shallow_cache_copy(prefill)
            cache.batch_select_indices(owner.to(device))  # row i: the keys and values of its own prefix
            logits = self.model(
                input_ids=ids.to(device),
                attention_mask=torch.cat([prefix_mask[owner], mask], dim=1).to(device),
                position_ids=(prefix_len[owner].unsqueeze(1) + torch.arange(width)).to(device),
                **{self.cache_name: cache},
            ).logits.float()
            token_lp = torch.empty((n, width), device=device)
            token_lp[:, 0] = first[owner.to(device), ids[:, 0].to(device)]
            if width > 1:  # position j of the continuation predicts its token j + 1
                lp = torch.log_softmax(logits[:, :-1], dim=-1)
                token_lp[:, 1:] = lp.gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
            m = mask.to(device)
            for (g, j), score in zip(chunk, ((token_lp * m).sum(dim=1) / m.sum(dim=1)).cpu().numpy(), strict=True):
                scores[g][j] = score
        return scores

    @torch.no_grad()
    def generate(
        self, sequences: Sequence[Sequence[int]], max_new_tokens: int, temperature: float, seed: int
    ) -> list[list[int]]:
        torch.manual_seed(seed)
        device = self._device()
        batch = left_pad(sequences, self.pad_id)
        sampling = temperature > 0
        generated = self.model.generate(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            do_sample=sampling,
            temperature=temperature if sampling else None,
            top_p=None,
            top_k=None,
            max_new_tokens=max_new_tokens,
            pad_token_id=self.pad_id,
        )
        eos = self.model.generation_config.eos_token_id
        ends = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        out = []
        for row in generated[:, batch["input_ids"].shape[1] :].tolist():
            stop = next((i for i, t in enumerate(row) if t in ends), len(row))
            out.append(row[:stop])
        return out


class CTranslate2LM:
    """A CTranslate2 `Generator` over the converted folder; token ids travel as the tokenizer's
    token strings (the converted vocabulary is the tokenizer's, in id order)."""

    reuses_prefix = False

    def __init__(self, generator, tokenizer, end_ids: Sequence[int]):
        self.generator = generator
        self.tokenizer = tokenizer
        self.end_ids = list(end_ids)

    def _tokens(self, sequences: Sequence[Sequence[int]]) -> list[list[str]]:
        return [self.tokenizer.convert_ids_to_tokens(list(s)) for s in sequences]

    def next_token_logits(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        results = self.generator.generate_batch(
            self._tokens(sequences), max_length=1, include_prompt_in_result=False, return_logits_vocab=True,
            sampling_topk=1,
        )
        # a row longer than the batch's shortest steps through its extra prompt tokens first: the
        # last step's logits are those after the whole sequence
        return torch.from_numpy(np.stack([np.asarray(r.logits[0])[-1] for r in results])).float()

    def continuation_log_probs(self, sequences: Sequence[Sequence[int]], lengths: Sequence[int]) -> np.ndarray:
        results = self.generator.score_batch(self._tokens(sequences), max_input_length=0)
        return np.array([np.mean(r.log_probs[-n:]) for r, n in zip(results, lengths, strict=True)], dtype=np.float32)

    def generate(
        self, sequences: Sequence[Sequence[int]], max_new_tokens: int, temperature: float, seed: int
    ) -> list[list[int]]:
        import ctranslate2

        ctranslate2.set_random_seed(seed)
        sampling = temperature > 0
        results = self.generator.generate_batch(
            self._tokens(sequences), max_length=max_new_tokens, include_prompt_in_result=False,
            sampling_topk=0 if sampling else 1, sampling_temperature=temperature if sampling else 1.0,
            end_token=self.end_ids or None,
        )
        return [list(r.sequences_ids[0]) for r in results]


def shallow_cache_copy(cache):
    """A copy of a key/value cache that shares its tensors: selecting or appending rows (which
    replace a layer's tensors, never write into them) leaves `cache` as it was, without copying
    every prefix's keys and values first."""
    memo = {id(t): t for layer in getattr(cache, "layers", []) for t in vars(layer).values() if isinstance(t, torch.Tensor)}
    return copy.deepcopy(cache, memo)


def folder_identity(folder: Path) -> str:
    """sha256 over every file of a model folder (relative name and content)."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(folder).as_posix()}\0{file_sha256(f)[1]}\n".encode())
    return h.hexdigest()


def convert_ctranslate2(folder: Path) -> Path:
    """The cached float32 CTranslate2 conversion of transformers folder `folder`, converted once."""

    def convert(target: Path) -> None:
        from ctranslate2.converters import TransformersConverter

        TransformersConverter(str(folder)).convert(str(target), quantization="float32", force=True)

    return cached_conversion(cache_dir() / "ct2" / folder_identity(folder), "model.bin", convert)


def end_token_ids(folder: Path, tokenizer) -> list[int]:
    """The ids that end a generation: the folder's generation config's eos ids, else the tokenizer's."""
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(folder).eos_token_id
    except OSError:
        eos = None
    if eos is None:
        eos = tokenizer.eos_token_id
    return [] if eos is None else list(eos) if isinstance(eos, list) else [eos]


def load_lm(config: LLMConfig):
    """(backend, tokenizer) for `config`: a TransformersLM or CTranslate2LM on the GPU when there
    is one, else on the CPU with torch's thread count."""
    from transformers import AutoTokenizer

    if config.backend == "transformers":
        model, tokenizer = load_causal_lm(config)
        return TransformersLM(model, tokenizer), tokenizer
    try:
        import ctranslate2
    except ImportError as exc:
        raise LLMError("llm.backend 'ctranslate2' needs the ctranslate2 package (pip install ctranslate2)") from exc
    folder = model_folder(config)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    on_gpu = ctranslate2.get_cuda_device_count() > 0
    device = "cuda" if on_gpu else "cpu"
    compute_type = config.compute_type or "int8"
    if compute_type not in ctranslate2.get_supported_compute_types(device):
        raise LLMError(
            f"llm.compute_type {compute_type} is not supported by ctranslate2 on this {device} "
            f"(supported: {', '.join(sorted(ctranslate2.get_supported_compute_types(device)))})"
        )
    generator = ctranslate2.Generator(
        str(convert_ctranslate2(folder)), device=device, compute_type=compute_type,
        intra_threads=0 if on_gpu else torch.get_num_threads(),
    )
    return CTranslate2LM(generator, tokenizer, end_token_ids(folder, tokenizer)), tokenizer


def as_backend(model, tokenizer) -> TransformersLM | CTranslate2LM:
    """`model` if it is a backend already, else a transformers model wrapped in TransformersLM."""
    return model if isinstance(model, (TransformersLM, CTranslate2LM)) else TransformersLM(model, tokenizer)
