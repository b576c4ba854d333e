"""Matryoshka representation learning (Kusupati et al. 2022; docs/methods.md §9).

    L = sum_k w_k * L_inner(q[:, :d_k], p[:, :d_k])

over nested prefixes d_1 > d_2 > ... of the embedding, so that a prefix of the trained
embedding is itself a usable embedding (sentence-transformers' `MatryoshkaLoss` does the same
for its losses). With `normalize` (the encoder L2-normalises its output) each prefix is
L2-normalised again before scoring: the prefix of a unit vector is not a unit vector, and
inference with a truncated embedding normalises it too (cosine similarity).

The wrapper is a pure function of the embeddings like the inner loss: it gathers once (the
full embeddings; prefixes of gathered rows are the gathered prefixes) and calls the inner loss's
`compute_loss_from_embeddings` once per dimension with the same layout and extras, so GradCache
and cross-rank gathering hold unchanged. `last_stats` holds the inner loss's statistics at the
full (first) dimension plus `loss_dim<d>` for every dimension.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from peg.losses.base import EmbeddingLoss, GatherFn


class MatryoshkaLoss(EmbeddingLoss):
    """Weighted sum of `inner` over the embedding prefixes `dims` (weights default to 1 each)."""

    def __init__(
        self, inner: EmbeddingLoss, dims: Sequence[int], weights: Sequence[float] | None = None, normalize: bool = True
    ) -> None:
        super().__init__()
        dims = [int(d) for d in dims]
        weights = [1.0] * len(dims) if weights is None else [float(w) for w in weights]
        if not dims or any(d < 1 for d in dims) or len(set(dims)) != len(dims):
            raise ValueError(f"matryoshka dims must be distinct positive integers, got {dims}")
        if len(weights) != len(dims) or any(w < 0 for w in weights) or not any(w > 0 for w in weights):
            raise ValueError(f"matryoshka weights must be one non-negative weight per dim, not all 0; got {weights}")
        self.inner = inner
        self.passage_extras = inner.passage_extras
        order = sorted(range(len(dims)), key=lambda i: -dims[i])
        self.dims = [dims[i] for i in order]
        self.weights = [weights[i] for i in order]
        self.normalize = normalize

    def set_progress(self, step: int, total_steps: int) -> None:
        super().set_progress(step, total_steps)
        self.inner.set_progress(step, total_steps)

    def prefix(self, embeddings: torch.Tensor, dim: int) -> torch.Tensor:
        """The first `dim` components, L2-normalised again when the encoder normalises."""
        part = embeddings[:, :dim]
        return F.normalize(part, dim=-1) if self.normalize else part

    def compute_loss_from_embeddings(
        self,
        q_emb: torch.Tensor,
        p_emb: torch.Tensor,
        *,
        passages_per_query: int | None = None,
        query_offset: int = 0,
        gather_stat: GatherFn | None = None,
        **extra,
    ) -> torch.Tensor:
        if self.dims[0] > q_emb.size(1):
            raise ValueError(f"matryoshka dim {self.dims[0]} exceeds the embedding dimension {q_emb.size(1)}")
        total = None
        stats: dict[str, float] = {}
        for dim, weight in zip(self.dims, self.weights):
            loss = self.inner.compute_loss_from_embeddings(
                self.prefix(q_emb, dim), self.prefix(p_emb, dim), passages_per_query=passages_per_query,
                query_offset=query_offset, gather_stat=gather_stat, **extra,
            )  # fmt: skip
            if not stats:
                stats = dict(self.inner.last_stats)
            stats[f"loss_dim{dim}"] = float(loss.detach())
            total = weight * loss if total is None else total + weight * loss
        stats["loss"] = float(total.detach())
        self.last_stats = stats
        return total
