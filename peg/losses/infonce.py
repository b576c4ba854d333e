"""InfoNCE over in-batch, hard and cross-device negatives (docs/methods.md §1).

L = -(1/B) sum_i log softmax_j(s(q_i, d_j) / tau)[pos_i], j over every passage of the global
batch (all positives and hard negatives of all ranks). Batch layout, gathering and duplicate
masking: `peg.losses.base`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from peg.losses.base import EmbeddingLoss, GatherFn, duplicate_mask, resolve_layout


def contrastive_logits(
    q_emb: torch.Tensor,
    p_emb: torch.Tensor,
    passages_per_query: int | None,
    query_offset: int,
    passage_ids: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(scores [Bq, P], positive columns [Bq], duplicate mask [Bq, P] or None)."""
    passages_per_query, targets = resolve_layout(q_emb, p_emb, passages_per_query, query_offset)
    scores = q_emb @ p_emb.T
    mask = None if passage_ids is None else duplicate_mask(passage_ids, targets, p_emb.size(0))
    return scores, targets, mask


class InfoNCELoss(EmbeddingLoss):
    """Plain InfoNCE with temperature `temperature`; extra: optional `passage_ids` (dedup)."""

    def __init__(self, temperature: float = 0.05) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

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
        loss = F.cross_entropy(logits, targets)
        self.last_stats = {"loss": float(loss.detach())}
        return loss
