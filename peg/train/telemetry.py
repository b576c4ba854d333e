"""Per-step throughput: time split, tokens and passages per second, peak memory, MFU.

FLOPs of a step (model FLOPs, real tokens, GradCache's second forward not counted): for each
text of n real tokens, 6 * N * n + 12 * L * d * n^2, with N the transformer's non-embedding
parameters, L its layers and d its hidden size (the PaLM appendix-B count: 6N per token plus
attention). MFU = FLOPs / (step seconds x world size x peak FLOP/s of one device); the peak is
taken from `PEG_PEAK_TFLOPS` or the device's exact name (`device_peak`: the datasheet's dense bf16
tensor-core figure, without sparsity; SXM, NVL and PCIe boards differ), and is reported only on a GPU.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
from collections.abc import Iterator

import torch

# Dense bf16 tensor-core TFLOP/s (no sparsity) from the vendors' datasheets, keyed by the name
# torch.cuda.get_device_name / `nvidia-smi --query-gpu=name` report. Board variants differ: an H100
# NVL or PCIe card runs at lower clocks and power than the SXM module.
PEAK_BF16_TFLOPS = {
    "NVIDIA H100 80GB HBM3": 989.0,  # H100 SXM5
    "NVIDIA H100 NVL": 835.0,
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H200": 989.0,  # H200 SXM
    "NVIDIA H200 NVL": 835.0,
    "NVIDIA GH200 480GB": 989.0,
    "NVIDIA H800": 989.0,  # H800 SXM
    "NVIDIA H800 PCIe": 756.0,
    "NVIDIA B200": 2250.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA L40S": 362.0,
    "NVIDIA L40": 181.0,
    "NVIDIA L4": 121.0,
    "NVIDIA A10": 125.0,
    "NVIDIA A10G": 70.0,
    "NVIDIA GeForce RTX 4090": 165.0,
}

PHASES = ("data", "forward", "loss", "replay", "optimizer")


def device_peak(name: str) -> tuple[float, str] | None:
    """(dense bf16 TFLOP/s, the table entry used) for a device name, or None when unknown.

    An exact name wins. Otherwise the longest entry that the name starts with and that ends at a
    word boundary of it (so "NVIDIA H200 NVL" is never read as "NVIDIA H200", and "NVIDIA L40S"
    never as "NVIDIA L4"); other names (a new board variant) are unknown rather than guessed.
    """
    name = " ".join(name.split())
    if name in PEAK_BF16_TFLOPS:
        return PEAK_BF16_TFLOPS[name], name
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if name.startswith(key) and name[len(key)] in " -":
            return PEAK_BF16_TFLOPS[key], key
    return None


def peak_flops(device: torch.device) -> tuple[float, str] | None:
    """(peak dense bf16 FLOP/s of `device`, where that figure came from), or None on CPU or an
    unknown GPU without PEG_PEAK_TFLOPS."""
    if os.environ.get("PEG_PEAK_TFLOPS"):
        return float(os.environ["PEG_PEAK_TFLOPS"]) * 1e12, "PEG_PEAK_TFLOPS"
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    found = device_peak(name)
    if found is None:
        return None
    tflops, key = found
    return tflops * 1e12, f"{name}: datasheet dense bf16 of {key}"


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
