"""GradCache: a large-batch contrastive step in the memory of one chunk (docs/methods.md §3).

`GradCache(loss, chunk_size).step(encode_fn, q_inputs, p_inputs, extra, backward_fn, no_sync)`:
1. Split queries and passages into chunks of `chunk_size` rows (queries first, then passages)
   and encode every chunk with `encode_fn` under `torch.no_grad()`, saving the RNG state
   (CPU and the CUDA devices the inputs live on) before each chunk.
2. Concatenate the embeddings as leaf tensors, compute the full-batch `loss` on them
   (including cross-rank gathering) and backpropagate to u = dL/d(embedding). This plain
   `.backward()` touches no model parameter.
3. Replay every chunk: restore its RNG state (dropout masks equal step 1's), encode with a
   graph and call `backward_fn(<emb_c, sg(u_c)>)`, whose gradient w.r.t. the parameters is
   the chunk's share of dL/dtheta. Every replay but the last runs inside `no_sync()` (both
   the forward and the backward), so data-parallel gradients are reduced once per step.
The RNG stream after `step` is the one after step 1, i.e. the same as after encoding the same
chunks without caching. Parameter gradients equal (to float tolerance) those of encoding the
same chunks with a graph and backpropagating the loss directly.

Contract for the caller:
- `encode_fn(chunk)` maps a chunk of inputs (a tensor, or a mapping of tensors sliced along
  dim 0, e.g. tokenizer output) to embeddings [rows, d]; it must be deterministic given the
  RNG state (dropout is fine) and is called twice per chunk.
- `backward_fn(tensor)` defaults to `tensor.backward()`. Under DeepSpeed pass the engine's
  backward; it must not rescale the surrogate by the accumulation steps, and the engine's
  accumulation boundary must be False for all but the last replay (a `no_sync` context that
  sets it, for example) so ZeRO reduces once per optimizer step.
- `no_sync()` returns a context manager (e.g. `DistributedDataParallel.no_sync`); None means
  every replay may synchronise.
- `extra` holds the loss's keyword arguments (`passage_ids`, `teacher_scores`, ...).
- With `chunk_size=None`, `step` encodes all inputs at once with a graph and calls
  `backward_fn(loss)`: the uncached step with the same interface.
- Inputs may come already chunked as `Chunks` (e.g. texts grouped by length into chunks of so
  many texts or tokens, each chunk padded to its own longest text or packed without padding,
  see `Encoder.pack`): the chunks are used as given, and any `chunk_size` caches them and the embeddings are put back in
  batch order before the loss, so the loss sees the same batch whatever the chunking.
- `phase(name)`, if given, returns a context manager timing each part of the step:
  "forward" (the no-grad pass), "loss" (loss and its backward to the embeddings), "replay".
Returns the loss value (detached).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

Inputs = torch.Tensor | Mapping[str, torch.Tensor]


@dataclass
class Chunks:
    """A batch already cut into chunks: row i of the concatenated `parts` is row `rows[i]` of the batch."""

    parts: list[Inputs]
    rows: torch.Tensor  # int64 [n], a permutation of range(n)

    def to(self, device: torch.device, non_blocking: bool = False) -> Chunks:
        return Chunks([_to(part, device, non_blocking) for part in self.parts], self.rows)


def _to(inputs: Inputs, device: torch.device, non_blocking: bool) -> Inputs:
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device, non_blocking=non_blocking)
    return {k: (v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}


def num_rows(inputs: Inputs) -> int:
    """Texts in `inputs`: a tensor's first dimension, a padded mapping's common first dimension,
    or, for packed inputs (a `cu_seq_lens` of n + 1 offsets), n."""
    if isinstance(inputs, torch.Tensor):
        return inputs.size(0)
    if "cu_seq_lens" in inputs:
        return inputs["cu_seq_lens"].numel() - 1
    sizes = {v.size(0) for v in inputs.values() if isinstance(v, torch.Tensor)}
    if len(sizes) != 1:
        raise ValueError(f"inputs must be tensors with one common first dimension, got sizes {sorted(sizes)}")
    return sizes.pop()


def split_inputs(inputs: Inputs, chunk_size: int) -> list[Inputs]:
    """Slices of `chunk_size` rows (the last may be shorter), in order. Packed inputs come already
    chunked (`Chunks`): they cannot be sliced by rows."""
    if not isinstance(inputs, torch.Tensor) and "cu_seq_lens" in inputs:
        raise ValueError("packed inputs cannot be split by rows: pass them as Chunks")
    rows = num_rows(inputs)
    if isinstance(inputs, torch.Tensor):
        return list(inputs.split(chunk_size))
    return [
        {k: (v[start : start + chunk_size] if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        for start in range(0, rows, chunk_size)
    ]


def cuda_devices(inputs: Inputs) -> list[int]:
    values = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs.values())
    return sorted({v.device.index or 0 for v in values if isinstance(v, torch.Tensor) and v.is_cuda})


class RngState:
    """The CPU RNG state and those of the given CUDA devices, captured now."""

    def __init__(self, devices: list[int]) -> None:
        self.devices = devices
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in devices]

    @contextlib.contextmanager
    def replayed(self) -> Iterator[None]:
        """Run the body from this state; the RNG streams outside are left untouched."""
        with torch.random.fork_rng(devices=self.devices):
            torch.set_rng_state(self.cpu)
            for device, state in zip(self.devices, self.cuda, strict=True):
                torch.cuda.set_rng_state(state, device)
            yield


class GradCache:
    """Chunked, gradient-cached loss step for any `peg.losses` loss; see the module docstring."""

    def __init__(self, loss: torch.nn.Module, chunk_size: int | None) -> None:
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
        self.loss = loss
        self.chunk_size = chunk_size

    def step(
        self,
        encode_fn: Callable[[Inputs], torch.Tensor],
        q_inputs: Inputs | Chunks,
        p_inputs: Inputs | Chunks,
        extra: Mapping[str, Any] | None = None,
        backward_fn: Callable[[torch.Tensor], Any] | None = None,
        no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
        phase: Callable[[str], contextlib.AbstractContextManager] | None = None,
    ) -> torch.Tensor:
        backward_fn = backward_fn or torch.Tensor.backward
        phase = phase or (lambda name: contextlib.nullcontext())
        extra = dict(extra or {})
        if self.chunk_size is None and not isinstance(q_inputs, Chunks) and not isinstance(p_inputs, Chunks):
            with phase("forward"):
                q_emb, p_emb = encode_fn(q_inputs), encode_fn(p_inputs)
            with phase("loss"):
                loss = self.loss(q_emb, p_emb, **extra)
                backward_fn(loss)
            return loss.detach()

        q_chunks, q_rows = self._chunks(q_inputs)
        p_chunks, p_rows = self._chunks(p_inputs)
        if not q_chunks or not p_chunks:
            raise ValueError("GradCache.step needs at least one query and one passage")
        if self.chunk_size is None:  # uncached, but chunked as given: one graph over all chunks
            with phase("forward"):
                q_emb = _batch_order(torch.cat([encode_fn(c) for c in q_chunks]), q_rows)
                p_emb = _batch_order(torch.cat([encode_fn(c) for c in p_chunks]), p_rows)
            with phase("loss"):
                loss = self.loss(q_emb, p_emb, **extra)
                backward_fn(loss)
            return loss.detach()

        states: list[RngState] = []
        with phase("forward"), torch.no_grad():
            q_leaf = self._encode_into_buffer(encode_fn, q_chunks, states)
            p_leaf = self._encode_into_buffer(encode_fn, p_chunks, states)
        with phase("loss"):
            q_emb = _batch_order(q_leaf.requires_grad_(), q_rows)
            p_emb = _batch_order(p_leaf.requires_grad_(), p_rows)
            loss = self.loss(q_emb, p_emb, **extra)
            loss.backward()
        chunks = q_chunks + p_chunks
        grads = list(q_leaf.grad.split([num_rows(c) for c in q_chunks]))
        grads += list(p_leaf.grad.split([num_rows(c) for c in p_chunks]))

        last = len(chunks) - 1
        with phase("replay"):
            for index, (chunk, state, grad) in enumerate(zip(chunks, states, grads, strict=True)):
                sync = contextlib.nullcontext() if index == last or no_sync is None else no_sync()
                with sync:
                    with state.replayed():
                        embedding = encode_fn(chunk)
                    backward_fn((embedding * grad.to(embedding.dtype)).sum())
        return loss.detach()

    def _chunks(self, inputs: Inputs | Chunks) -> tuple[list[Inputs], torch.Tensor | None]:
        """(chunks in encoding order, their rows' batch positions or None when in batch order)."""
        if isinstance(inputs, Chunks):
            return [c for c in inputs.parts if num_rows(c)], inputs.rows
        if num_rows(inputs) == 0:
            return [], None
        return split_inputs(inputs, self.chunk_size or num_rows(inputs)), None

    @staticmethod
    def _encode_into_buffer(
        encode_fn: Callable[[Inputs], torch.Tensor], chunks: list[Inputs], states: list[RngState]
    ) -> torch.Tensor:
        """Encode chunks one by one (RNG state saved before each) into one preallocated buffer.

        Writing into a single buffer instead of concatenating a list keeps the no-grad pass at
        one chunk's activations plus the final embeddings (no copy, no heap fragmentation).
        """
        rows = sum(num_rows(c) for c in chunks)
        buffer = None
        start = 0
        for chunk in chunks:
            states.append(RngState(cuda_devices(chunk)))
            embedding = encode_fn(chunk)
            if buffer is None:
                buffer = embedding.new_empty((rows, *embedding.shape[1:]))
            buffer[start : start + embedding.size(0)] = embedding
            start += embedding.size(0)
            del embedding
        return buffer


def _batch_order(embeddings: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """Embeddings in chunk order -> batch order (differentiable; identity when `rows` is None)."""
    if rows is None:
        return embeddings
    return embeddings[torch.argsort(rows.to(embeddings.device))]
