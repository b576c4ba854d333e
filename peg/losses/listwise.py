"""Listwise distillation + InfoNCE (Tamber et al. 2025; docs/methods.md §4).

Per query i its own list is its positive and hard negatives (columns of its group in the
batch layout, `peg.losses.base`) with teacher scores t_i (same order: positive first).
    t'_i = minmax(t_i)              (per query, to [0, 1]; a constant list maps to zeros)
    P_T = softmax(t'_i / T_t), P_S = softmax(s_i / T_s)          (T_t 0.3, T_s 0.05)
    L_KL = mean_i KL(P_T || P_S)                                 (computed in float64)
    L_NCE = InfoNCE at tau 0.01 over all passages of the global batch, where for query i
            every passage of its own list whose normalised teacher score exceeds
            ratio x its top normalised score (ratio 0.6; a likely false negative) is masked,
            except its own positive; duplicates of the positive are masked as in InfoNCE.
    L = L_KL + nce_weight * L_NCE                                (nce_weight 0.1)
The false-negative ratio is applied to the min-max normalised scores because raw teacher
scores may be logits or log-probabilities, for which a ratio to the top score means nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from peg.losses.base import EmbeddingLoss, GatherFn
from peg.losses.infonce import contrastive_logits


def minmax_normalise(scores: torch.Tensor) -> torch.Tensor:
    """Per-row min-max to [0, 1]; rows with max == min become zeros."""
    low = scores.min(dim=-1, keepdim=True).values
    span = scores.max(dim=-1, keepdim=True).values - low
    scaled = (scores - low) / span.clamp_min(torch.finfo(scores.dtype).tiny)
    return torch.where(span > 0, scaled, torch.zeros_like(scores))


class ListwiseDistillationLoss(EmbeddingLoss):
    """KL(teacher || student) over each query's list + `nce_weight` x masked InfoNCE.

    Extra: `teacher_scores` [Bq, 1 + n] (required, local to the rank), optional `passage_ids`.
    """

    def __init__(
        self,
        teacher_temperature: float = 0.3,
        student_temperature: float = 0.05,
        nce_weight: float = 0.1,
        nce_temperature: float = 0.01,
        false_negative_ratio: float = 0.6,
    ) -> None:
        super().__init__()
        for name, value in [
            ("teacher_temperature", teacher_temperature),
            ("student_temperature", student_temperature),
            ("nce_temperature", nce_temperature),
        ]:
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        self.teacher_temperature = teacher_temperature
        self.student_temperature = student_temperature
        self.nce_weight = nce_weight
        self.nce_temperature = nce_temperature
        self.false_negative_ratio = false_negative_ratio

    def compute_loss_from_embeddings(
        self,
        q_emb: torch.Tensor,
        p_emb: torch.Tensor,
        *,
        passages_per_query: int | None = None,
        query_offset: int = 0,
        gather_stat: GatherFn | None = None,
        passage_ids: torch.Tensor | None = None,
        teacher_scores: torch.Tensor | None = None,
    ) -> torch.Tensor:
        scores, targets, mask = contrastive_logits(q_emb, p_emb, passages_per_query, query_offset, passage_ids)
        num_queries = q_emb.size(0)
        list_size = passages_per_query or p_emb.size(0) // num_queries
        if teacher_scores is None:
            raise ValueError(
                "ListwiseDistillationLoss needs teacher_scores [queries, 1 + hard negatives] (positive first); "
                "run the `score` stage so the training data carries pos_scores/neg_scores"
            )
        if teacher_scores.shape != (num_queries, list_size):
            raise ValueError(
                f"teacher_scores must have shape [{num_queries}, {list_size}] (one score per listed passage, "
                f"positive first), got {tuple(teacher_scores.shape)}"
            )
        if not torch.isfinite(teacher_scores).all():
            raise ValueError("teacher_scores contain NaN or infinite values")
        rows = torch.arange(num_queries, device=scores.device)
        columns = targets.unsqueeze(1) + torch.arange(list_size, device=scores.device)
        student = scores[rows.unsqueeze(1), columns].double()
        teacher = minmax_normalise(teacher_scores.to(scores.device).double())
        log_p_teacher = F.log_softmax(teacher / self.teacher_temperature, dim=-1)
        log_p_student = F.log_softmax(student / self.student_temperature, dim=-1)
        kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=-1).mean()

        false_negative = teacher > self.false_negative_ratio * teacher.max(dim=-1, keepdim=True).values
        false_negative[:, 0] = False
        nce_mask = torch.zeros_like(scores, dtype=torch.bool)
        nce_mask[rows.unsqueeze(1), columns] = false_negative
        if mask is not None:
            nce_mask |= mask
        logits = (scores / self.nce_temperature).masked_fill(nce_mask, float("-inf"))
        nce = F.cross_entropy(logits, targets)
        loss = kl.to(nce.dtype) + self.nce_weight * nce
        self.last_stats = {
            "loss": float(loss.detach()),
            "kl": float(kl.detach()),
            "nce": float(nce.detach()),
            "masked_false_negatives": float(false_negative.sum()) / num_queries,
        }
        return loss
