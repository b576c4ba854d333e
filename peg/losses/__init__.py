"""peg's losses: pure tensor math on embeddings, cross-rank gathering, and GradCache.

    from peg.losses import InfoNCELoss, ProgressiveInfoNCELoss, ListwiseDistillationLoss, MatryoshkaLoss, GradCache
    loss = build_loss(config.loss)
    loss.set_progress(step, total_steps); value = loss(q_emb, p_emb, passage_ids=..., teacher_scores=...)
    loss.last_stats  # floats to log every step

Batch layout, gathering and dedup: `peg.losses.base`; the loss-scale convention under
gathering: `peg.losses.distributed`; GradCache's contract: `peg.losses.gradcache`.
"""

from peg.losses.base import EmbeddingLoss, passage_ids_from_texts, positive_columns
from peg.losses.factory import build_loss
from peg.losses.gradcache import Chunks, GradCache
from peg.losses.infonce import InfoNCELoss
from peg.losses.listwise import ListwiseDistillationLoss
from peg.losses.matryoshka import MatryoshkaLoss
from peg.losses.progressive import ProgressiveInfoNCELoss, schedule_fraction, self_paced_weights

__all__ = [
    "EmbeddingLoss",
    "Chunks",
    "GradCache",
    "InfoNCELoss",
    "ListwiseDistillationLoss",
    "MatryoshkaLoss",
    "ProgressiveInfoNCELoss",
    "build_loss",
    "passage_ids_from_texts",
    "positive_columns",
    "schedule_fraction",
    "self_paced_weights",
]
