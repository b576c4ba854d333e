"""Learning-rate schedule: linear warmup, then linear decay to `min_lr_ratio` x the peak."""

from __future__ import annotations

import math


def warmup_linear_decay(total_steps: int, warmup_ratio: float, min_lr_ratio: float):
    """A LambdaLR factor function of the optimizer step (0-based): the step's lr / peak lr."""
    warmup = math.ceil(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        remaining = max(0, total_steps - step) / max(1, total_steps - warmup)
        return min_lr_ratio + (1.0 - min_lr_ratio) * remaining

    return factor
