"""PEG progressive weighting: peg's own, documented formulation (docs/methods.md §2).

The PEG paper's public text says only that sample weights inside a very large batch move
progressively with the difficulty of the negatives; its equation is not public. peg defines:

Progress p = step / (total_steps - 1) in [0, 1] over OPTIMIZER steps, shaped by a schedule
f(p) in [0, 1]: linear f = p; cosine f = (1 - cos(pi p)) / 2; step f = floor(p K) / (K - 1)
capped at 1 (K = `stages` plateaus).

1. Negative level. beta(t) = beta_start + (beta_end - beta_start) f(p). Every negative logit
   (every column but the query's positive) becomes s/tau + beta(t) sg(s)/tau, i.e. the
   softmax sees (1 + beta) s / tau for negatives while the gradient still flows through
   s / tau only. beta < 0 (early) damps the hardest negatives, the likeliest false
   negatives; beta > 0 (late) focuses on them. This generalises sentence-transformers'
   static `hardness_strength` with a schedule, in units of the temperature.
2. Query level (self-paced). The pace lambda(t) = pace_start + (1 - pace_start) f(p) is the
   fraction of queries at full weight. With l_i each query's (detached) loss over the GLOBAL
   batch, threshold T = quantile(l, lambda), sigma = std(l):
       w_i = exp(-sharpness * max(0, l_i - T) / sigma),  then w <- w / mean(w)
   Easy queries (loss below T) get full weight first; at the end (lambda = 1) T = max(l) and
   every w_i = 1. Weights are normalised to mean 1 over the global batch, so the loss scale
   does not drift. Loss = mean over local queries of w_i l_i.

With beta = 0 throughout and `self_paced` off, the loss is plain InfoNCE, bit for bit.
`last_stats` holds beta, pace, threshold, the weight statistics and `infonce` (the plain,
unweighted InfoNCE of the same batch, comparable across steps) of the last call.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from peg.losses.base import EmbeddingLoss, GatherFn
from peg.losses.infonce import contrastive_logits

Schedule = Literal["linear", "cosine", "step"]


def schedule_fraction(kind: Schedule, step: int, total_steps: int, stages: int = 4) -> float:
    """f(p) in [0, 1] for optimizer `step` (0-based) of `total_steps`; 1 at the last step."""
    p = min(max(step / max(total_steps - 1, 1), 0.0), 1.0)
    if kind == "linear":
        return p
    if kind == "cosine":
        return (1.0 - math.cos(math.pi * p)) / 2.0
    if kind == "step":
        if stages < 2:
            raise ValueError(f"step schedule needs stages >= 2, got {stages}")
        return min(math.floor(p * stages), stages - 1) / (stages - 1)
    raise ValueError(f"unknown schedule {kind!r}; choose linear, cosine or step")


def self_paced_weights(losses: torch.Tensor, pace: float, sharpness: float) -> torch.Tensor:
    """Weights (mean 1) favouring queries whose loss is within the easiest `pace` fraction."""
    if pace >= 1.0 or losses.numel() < 2:
        return torch.ones_like(losses)
    threshold = torch.quantile(losses, pace)
    sigma = losses.std(unbiased=False).clamp_min(1e-12)
    weights = torch.exp(-sharpness * (losses - threshold).clamp_min(0) / sigma)
    return weights / weights.mean()


class ProgressiveInfoNCELoss(EmbeddingLoss):
    """InfoNCE with scheduled negative hardness beta(t) and self-paced query weights."""

    def __init__(
        self,
        temperature: float = 0.05,
        beta_start: float = -0.5,
        beta_end: float = 1.0,
        schedule: Schedule = "linear",
        stages: int = 4,
        self_paced: bool = True,
        pace_start: float = 0.5,
        pace_sharpness: float = 2.0,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0 < pace_start <= 1:
            raise ValueError(f"pace_start must be in (0, 1], got {pace_start}")
        schedule_fraction(schedule, 0, 1, stages)  # validates schedule and stages
        self.temperature = temperature
        self.beta_start, self.beta_end = beta_start, beta_end
        self.schedule, self.stages = schedule, stages
        self.self_paced, self.pace_start, self.pace_sharpness = self_paced, pace_start, pace_sharpness

    def beta(self) -> float:
        """beta(t) at the step set by `set_progress`."""
        f = schedule_fraction(self.schedule, self.step, self.total_steps, self.stages)
        return self.beta_start + (self.beta_end - self.beta_start) * f

    def pace(self) -> float:
        """Fraction of queries at full weight at the step set by `set_progress`."""
        f = schedule_fraction(self.schedule, self.step, self.total_steps, self.stages)
        return self.pace_start + (1.0 - self.pace_start) * f

    def compute_loss_from_embeddings(
        self,
        q_emb: torch.Tensor,
        p_emb: torch.Tensor,
        *,
        passages_per_query: int | None = None,
        query_offset: int = 0,
        gather_stat: GatherFn | None = None,
        passage_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        scores, targets, mask = contrastive_logits(q_emb, p_emb, passages_per_query, query_offset, passage_ids)
        logits = scores / self.temperature
        if mask is not None:
            logits = logits.masked_fill(mask, float("-inf"))
        beta = self.beta()
        # the plain InfoNCE of the same batch: comparable across steps whatever beta(t)
        stats = {"beta": beta, "infonce": float(F.cross_entropy(logits.detach(), targets))}
        if beta != 0.0:  # masked entries stay -inf
            hardness = scores.detach() * (beta / self.temperature)
            hardness[torch.arange(targets.numel(), device=targets.device), targets] = 0.0
            logits = logits + hardness
        if not self.self_paced:
            loss = F.cross_entropy(logits, targets)
            stats.update(loss=float(loss.detach()))
        else:
            per_query = F.cross_entropy(logits, targets, reduction="none")
            all_losses = (gather_stat or torch.Tensor.detach)(per_query.detach())
            pace = self.pace()
            all_weights = self_paced_weights(all_losses, pace, self.pace_sharpness)
            weights = all_weights[query_offset : query_offset + q_emb.size(0)]
            loss = (weights * per_query).mean()
            stats.update(
                loss=float(loss.detach()),
                loss_unweighted=float(all_losses.mean()),
                pace=pace,
                threshold=float(torch.quantile(all_losses, min(pace, 1.0))),
                weight_mean=float(all_weights.mean()),
                weight_min=float(all_weights.min()),
                weight_max=float(all_weights.max()),
                weight_std=float(all_weights.std(unbiased=False)),
            )
        self.last_stats = stats
        return loss
