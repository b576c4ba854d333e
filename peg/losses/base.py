"""Shared machinery of peg's embedding losses: batch layout, duplicate masking, gathering.

Batch layout (every loss): `q_emb` is [Bq, d]; `p_emb` is [Bq * (1 + n), d] laid out per query
as [pos_0, neg_0_1 .. neg_0_n, pos_1, neg_1_1 .. neg_1_n, ...]. Because each rank's block keeps
this per-query layout, the rank-order concatenation of all ranks' passages is again per-query
grouped in global query order, so the positive of global query g sits at column g * (1 + n).
(The trap seen in peers, targets computed for P P P .. N N N over a P N N P N N .. layout, cannot
occur: targets are derived from the one layout above by `positive_columns`.)

Scores are dot products of the embeddings: cosine similarities when they are L2-normalised
(the encoder's default). Losses compute in float32 (or float64 where stated) whatever the
embeddings' dtype
(float64 input stays float64).

Duplicates: identical passage texts in the global batch are silent false negatives. Pass
`passage_ids` (int64 [num local passages], equal ids <=> identical text, e.g. from
`passage_ids_from_texts`, which is stable across processes unlike Python's `hash`); for each
query every column holding the same passage as its positive, other than the positive itself,
is removed from the softmax (logit -inf), and any other passage that occurs several times is
counted once (its first column). Without `passage_ids` nothing is masked.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch

from peg.losses.distributed import check_same_sizes, gather_detached, gather_with_grad, world

GatherFn = Callable[[torch.Tensor], torch.Tensor]


def passage_ids_from_texts(texts: Sequence[str]) -> torch.Tensor:
    """int64 ids equal exactly for equal texts (blake2b; identical on every rank and process)."""
    ids = [int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little", signed=True) for t in texts]
    return torch.tensor(ids, dtype=torch.long)


def positive_columns(num_queries: int, passages_per_query: int, query_offset: int = 0) -> torch.Tensor:
    """Column of each local query's positive among the (gathered) passages."""
    return (torch.arange(num_queries) + query_offset) * passages_per_query


def resolve_layout(
    q_emb: torch.Tensor, p_emb: torch.Tensor, passages_per_query: int | None, query_offset: int
) -> tuple[int, torch.Tensor]:
    """(passages per query, positive columns) for local queries vs all passages; validates shapes."""
    num_queries, num_passages = q_emb.size(0), p_emb.size(0)
    if q_emb.dim() != 2 or p_emb.dim() != 2 or q_emb.size(1) != p_emb.size(1):
        raise ValueError(f"need q_emb [Bq, d] and p_emb [P, d]; got {tuple(q_emb.shape)} and {tuple(p_emb.shape)}")
    if num_queries == 0:
        raise ValueError("empty batch: no queries")
    if passages_per_query is None:
        if query_offset != 0 or num_passages % num_queries:
            raise ValueError(
                f"{num_passages} passages do not split into {num_queries} queries x (1 + hard negatives)"
            )
        passages_per_query = num_passages // num_queries
    targets = positive_columns(num_queries, passages_per_query, query_offset).to(q_emb.device)
    if int(targets[-1]) + passages_per_query > num_passages:
        raise ValueError(
            f"queries {query_offset}..{query_offset + num_queries - 1} with {passages_per_query} passages each "
            f"need {int(targets[-1]) + passages_per_query} passages, got {num_passages}"
        )
    return passages_per_query, targets


def duplicate_mask(passage_ids: torch.Tensor, targets: torch.Tensor, num_passages: int) -> torch.Tensor:
    """Bool [Bq, P]: columns to drop from each query's softmax because of duplicate passages.

    For query i: every copy of its positive other than the positive column itself (a false
    negative), and every repeat of any other passage after its first column (so each distinct
    passage is counted once). The positive column is never dropped.
    """
    if passage_ids.shape != (num_passages,):
        raise ValueError(
            f"passage_ids must have shape [{num_passages}] (one id per passage), got {tuple(passage_ids.shape)}"
        )
    passage_ids = passage_ids.to(targets.device)
    order = torch.argsort(passage_ids, stable=True)  # O(P log P): no [P, P] comparison
    sorted_ids = passage_ids[order]
    repeat_sorted = torch.zeros_like(sorted_ids, dtype=torch.bool)
    repeat_sorted[1:] = sorted_ids[1:] == sorted_ids[:-1]
    repeat = torch.empty_like(repeat_sorted)
    repeat[order] = repeat_sorted  # True where an earlier column holds the same passage
    mask = (passage_ids.unsqueeze(0) == passage_ids[targets].unsqueeze(1)) | repeat.unsqueeze(0)
    mask[torch.arange(targets.numel(), device=targets.device), targets] = False
    return mask


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """Half-precision embeddings as float32; float32/float64 unchanged."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


class EmbeddingLoss(torch.nn.Module, ABC):
    """Base of peg's losses: `forward` gathers, `compute_loss_from_embeddings` is the math.

    forward(q_emb [Bq, d], p_emb [Bq*(1+n), d], **extra): with torch.distributed initialised and
    world > 1, gathers passages with autograd (and the arguments named in `passage_extras`
    without), then scores the local queries against all passages. See `peg.losses.distributed`
    for why the result needs no rescaling under data-parallel gradient averaging.
    """

    #: keyword arguments with one row per passage, gathered across ranks like the passages
    passage_extras: tuple[str, ...] = ("passage_ids",)

    def __init__(self) -> None:
        super().__init__()
        self.step = 0
        self.total_steps = 1
        self.last_stats: dict[str, float] = {}

    def set_progress(self, step: int, total_steps: int) -> None:
        """Tell the loss the current optimizer step (0-based) of `total_steps`; used by schedules."""
        if total_steps < 1 or step < 0:
            raise ValueError(f"need step >= 0 and total_steps >= 1, got step={step}, total_steps={total_steps}")
        self.step, self.total_steps = step, total_steps

    def forward(self, q_emb: torch.Tensor, p_emb: torch.Tensor, **extra) -> torch.Tensor:
        q_emb, p_emb = at_least_float32(q_emb), at_least_float32(p_emb)
        rank, size = world()
        if size == 1:
            return self.compute_loss_from_embeddings(q_emb, p_emb, **extra)
        check_same_sizes(q_emb.size(0), p_emb.size(0), p_emb.device)
        if q_emb.size(0) == 0 or p_emb.size(0) % q_emb.size(0):
            raise ValueError(
                f"{p_emb.size(0)} passages do not split into {q_emb.size(0)} queries x (1 + hard negatives)"
            )
        for name in self.passage_extras:
            if extra.get(name) is not None:
                extra[name] = gather_detached(extra[name].to(p_emb.device))
        return self.compute_loss_from_embeddings(
            q_emb,
            gather_with_grad(p_emb),
            passages_per_query=p_emb.size(0) // q_emb.size(0),
            query_offset=rank * q_emb.size(0),
            gather_stat=gather_detached,
            **extra,
        )

    @abstractmethod
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
        """Scalar loss of local queries `q_emb` against all passages `p_emb` (pure tensor math).

        `passages_per_query` and `query_offset` (index of the first local query in the global
        batch) default to the single-process case; `gather_stat` concatenates a detached
        per-query statistic over all ranks (identity when single-process).
        """
