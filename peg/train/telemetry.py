"""Per-step throughput: time split, tokens and passages per second, peak memory, MFU.

FLOPs of a step (model FLOPs, real tokens, GradCache's second forward not counted): for each
text of n real tokens, 6 * N * n + 12 * L * d * n^2, with N the transformer's non-embedding
parameters, L its layers and d its hidden size (the PaLM appendix-B count: 6N per token plus
attention). MFU = FLOPs / (step seconds x world size x peak FLOP/s of one device); the peak is
taken from `PEG_PEAK_TFLOPS` or the device's name (dense bf16), and is reported only on a GPU.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
from collections.abc import Iterator

import torch

# dense bf16 TFLOP/s of one device, from the vendors' spec sheets
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
                    "L4": 121.0, "A10G": 70.0, "A10": 125.0, "B200": 2250.0}  # fmt: skip

PHASES = ("data", "forward", "loss", "replay", "optimizer")


def peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of `device` (None on CPU or an unknown GPU without PEG_PEAK_TFLOPS)."""
    if os.environ.get("PEG_PEAK_TFLOPS"):
        return float(os.environ["PEG_PEAK_TFLOPS"]) * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_TFLOPS[key] * 1e12
    return None


def model_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    """(non-embedding parameters, layers, hidden size) of a transformers encoder."""
    embedding = sum(p.numel() for name, p in model.named_parameters() if "embeddings" in name)
    total = sum(p.numel() for p in model.parameters())
    config = model.config
    return total - embedding, config.num_hidden_layers, config.hidden_size


def step_flops(shape: tuple[int, int, int], tokens: int, lengths_sq: int) -> float:
    """Training FLOPs of texts with `tokens` real tokens in all and `lengths_sq` = sum of n^2."""
    params, layers, hidden = shape
    return 6.0 * params * tokens + 12.0 * layers * hidden * lengths_sq


def peak_memory_gib(device: torch.device) -> float:
    """Peak accelerator memory allocated since the last reset, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20  # bytes on macOS, KiB on Linux


class StepTimer:
    """Seconds per phase of one step. On a GPU each phase starts and ends synchronised, so the
    split is the device's work rather than kernel launches."""

    def __init__(self, device: torch.device):
        self.sync = device.type == "cuda"
        self.seconds = dict.fromkeys(PHASES, 0.0)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def throughput(
    seconds: float, passages: float, tokens: float, flops: float, world_size: int, peak: float | None
) -> dict[str, float]:
    """Global rates of one step from the summed counts of all ranks."""
    record = {"step_s": seconds, "passages_per_s": passages / seconds, "tokens_per_s": tokens / seconds}
    if peak:
        record["mfu"] = flops / (seconds * world_size * peak)
    return record


def progress_text(record: dict) -> str:
    """The progress bar's status: rates, peak memory and MFU where known."""
    text = f"{record['passages_per_s']:,.0f} passages/s {record['tokens_per_s']:,.0f} tok/s {record['peak_memory_gib']:.1f} GiB"
    return text + (f" MFU {record['mfu']:.1%}" if "mfu" in record else "")
