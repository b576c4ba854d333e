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
Returns the loss value (detached).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

Inputs = torch.Tensor | Mapping[str, torch.Tensor]


def num_rows(inputs: Inputs) -> int:
    if isinstance(inputs, torch.Tensor):
        return inputs.size(0)
    sizes = {v.size(0) for v in inputs.values() if isinstance(v, torch.Tensor)}
    if len(sizes) != 1:
        raise ValueError(f"inputs must be tensors with one common first dimension, got sizes {sorted(sizes)}")
    return sizes.pop()


def split_inputs(inputs: Inputs, chunk_size: int) -> list[Inputs]:
    """Slices of `chunk_size` rows (the last may be shorter), in order."""
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
        q_inputs: Inputs,
        p_inputs: Inputs,
        extra: Mapping[str, Any] | None = None,
        backward_fn: Callable[[torch.Tensor], Any] | None = None,
        no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
    ) -> torch.Tensor:
        backward_fn = backward_fn or torch.Tensor.backward
        extra = dict(extra or {})
        if self.chunk_size is None:
            loss = self.loss(encode_fn(q_inputs), encode_fn(p_inputs), **extra)
            backward_fn(loss)
            return loss.detach()

        if num_rows(q_inputs) == 0 or num_rows(p_inputs) == 0:
            raise ValueError("GradCache.step needs at least one query and one passage")
        q_chunks = split_inputs(q_inputs, self.chunk_size)
        p_chunks = split_inputs(p_inputs, self.chunk_size)
        states: list[RngState] = []
        with torch.no_grad():
            q_leaf = self._encode_into_buffer(encode_fn, q_chunks, num_rows(q_inputs), states)
            p_leaf = self._encode_into_buffer(encode_fn, p_chunks, num_rows(p_inputs), states)
        loss = self.loss(q_leaf.requires_grad_(), p_leaf.requires_grad_(), **extra)
        loss.backward()
        chunks = q_chunks + p_chunks
        grads = list(q_leaf.grad.split(self.chunk_size)) + list(p_leaf.grad.split(self.chunk_size))

        last = len(chunks) - 1
        for index, (chunk, state, grad) in enumerate(zip(chunks, states, grads, strict=True)):
            sync = contextlib.nullcontext() if index == last or no_sync is None else no_sync()
            with sync:
                with state.replayed():
                    embedding = encode_fn(chunk)
                backward_fn((embedding * grad.to(embedding.dtype)).sum())
        return loss.detach()

    @staticmethod
    def _encode_into_buffer(
        encode_fn: Callable[[Inputs], torch.Tensor], chunks: list[Inputs], rows: int, states: list[RngState]
    ) -> torch.Tensor:
        """Encode chunks one by one (RNG state saved before each) into one preallocated buffer.

        Writing into a single buffer instead of concatenating a list keeps the no-grad pass at
        one chunk's activations plus the final embeddings (no copy, no heap fragmentation).
        """
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
