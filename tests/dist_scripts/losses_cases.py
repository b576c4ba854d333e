"""Shared batches and toy encoders for the loss tests (imported by pytest and torchrun scripts).

A global batch of `QUERIES` queries with `HARD_NEGATIVES` hard negatives each, laid out per
query [pos, neg, neg]; passage 0 of query 5 repeats query 1's positive text (a duplicate).
"""

from __future__ import annotations

import torch

QUERIES = 8
HARD_NEGATIVES = 2
FEATURES = 24
DIM = 16
PER_QUERY = 1 + HARD_NEGATIVES


def global_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Query/passage input features, passage ids (with one duplicate) and teacher scores."""
    g = torch.Generator().manual_seed(seed)
    q_features = torch.randn(QUERIES, FEATURES, generator=g)
    p_features = torch.randn(QUERIES * PER_QUERY, FEATURES, generator=g)
    # each positive resembles its query, so losses are in a realistic range
    p_features[::PER_QUERY] = q_features + 0.5 * torch.randn(QUERIES, FEATURES, generator=g)
    passage_ids = torch.arange(QUERIES * PER_QUERY)
    duplicate, original = 5 * PER_QUERY + 1, 1 * PER_QUERY  # query 5's first negative == query 1's positive
    p_features[duplicate] = p_features[original]
    passage_ids[duplicate] = passage_ids[original]
    teacher = torch.rand(QUERIES, PER_QUERY, generator=g)
    teacher[:, 0] += 1.0  # positives on top
    teacher[2, 1] = teacher[2, 0] * 0.9  # a likely false negative for query 2
    return {"q": q_features, "p": p_features, "passage_ids": passage_ids, "teacher_scores": teacher}


def rank_slice(batch: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s share: its queries and their passages, ids and teacher scores."""
    per_rank = QUERIES // world
    qs = slice(rank * per_rank, (rank + 1) * per_rank)
    ps = slice(rank * per_rank * PER_QUERY, (rank + 1) * per_rank * PER_QUERY)
    return {"q": batch["q"][qs], "p": batch["p"][ps], "passage_ids": batch["passage_ids"][ps],
            "teacher_scores": batch["teacher_scores"][qs]}


class ToyEncoder(torch.nn.Module):
    """Features -> dropout -> MLP -> L2-normalised embedding."""

    def __init__(self, dropout: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(
            torch.nn.Dropout(dropout), torch.nn.Linear(FEATURES, 32), torch.nn.Tanh(), torch.nn.Linear(32, DIM)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.net(x), dim=-1)


def make_losses(step: int = 3, total_steps: int = 10) -> dict[str, torch.nn.Module]:
    """One of each loss; progressive mid-schedule so beta != 0 and weights are not all 1."""
    from peg.losses import InfoNCELoss, ListwiseDistillationLoss, MatryoshkaLoss, ProgressiveInfoNCELoss

    progressive = ProgressiveInfoNCELoss(temperature=0.05, beta_start=-0.5, beta_end=1.0, pace_start=0.3)
    progressive.set_progress(step, total_steps)
    # Matryoshka over progressive: per-prefix self-paced weights need the cross-rank gather_stat
    matryoshka = MatryoshkaLoss(
        ProgressiveInfoNCELoss(temperature=0.05, beta_start=-0.5, beta_end=1.0, pace_start=0.3),
        dims=[DIM, DIM // 2, DIM // 4], weights=[1.0, 0.5, 0.25],
    )
    matryoshka.set_progress(step, total_steps)
    return {
        "infonce": InfoNCELoss(temperature=0.05),
        "progressive": progressive,
        "listwise": ListwiseDistillationLoss(),
        "matryoshka": matryoshka,
    }


def loss_extra(name: str, part: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    extra = {"passage_ids": part["passage_ids"]}
    if name == "listwise":
        extra["teacher_scores"] = part["teacher_scores"]
    return extra
