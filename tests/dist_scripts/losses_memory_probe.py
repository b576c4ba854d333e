"""Peak memory of one loss step, run in a fresh process: `python losses_memory_probe.py MODE PASSAGES`.

MODE is `cached` (GradCache, chunk 32) or `uncached`; PASSAGES = queries x (1 + 7 hard negatives).
Prints JSON {baseline_kib, peak_kib, growth_kib}: resident memory before the step (after a
warm-up step, inputs and gradient buffers allocated) and the kernel's peak RSS (VmHWM, reset
through /proc/self/clear_refs just before the step) during it. Run it with
MALLOC_MMAP_THRESHOLD_=131072 so that RSS follows live tensors (see tests/test_gradcache.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import BertConfig, BertModel

from peg.losses import GradCache, InfoNCELoss

SEQ_LEN = 64
HARD_NEGATIVES = 7
CHUNK = 32


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def batch(rows: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    ids = torch.randint(5, 1000, (rows, SEQ_LEN), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def main(mode: str, passages: int) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=256, max_position_embeddings=SEQ_LEN)
    model = BertModel(config)

    def encode(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.normalize(model(**inputs).last_hidden_state.mean(dim=1), dim=-1)

    cache = GradCache(InfoNCELoss(0.05), chunk_size=CHUNK if mode == "cached" else None)
    g = torch.Generator().manual_seed(1)
    cache.step(encode, batch(2, g), batch(2 * (1 + HARD_NEGATIVES), g))  # warm-up: gradient buffers, lazy kernels
    queries = passages // (1 + HARD_NEGATIVES)
    q_inputs, p_inputs = batch(queries, g), batch(passages, g)
    baseline = status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter (VmHWM)
    cache.step(encode, q_inputs, p_inputs)
    peak = status_kib("VmHWM")
    print(json.dumps({"baseline_kib": baseline, "peak_kib": peak, "growth_kib": peak - baseline}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
