"""Gathering across data-parallel ranks for the losses.

peg's convention (docs/methods.md §1, "scale under gathering"): passages are gathered
WITH autograd (`gather_with_grad`, whose backward sums every rank's gradient into the
passages' owner) and every rank scores only its LOCAL queries against ALL
passages, averaging over its local queries. Data-parallel gradient averaging (DDP, DeepSpeed)
then yields exactly the gradient of the mean loss over all W x B/W queries, i.e. the gradient
one rank would get with the whole batch. No extra factor W is needed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def check_same_sizes(num_queries: int, num_passages: int, device: torch.device) -> None:
    """Raise ValueError unless every rank holds as many queries and passages as this one.

    `device` is where the embeddings live (NCCL gathers CUDA tensors only).
    """
    _, size = world()
    if size == 1:
        return
    mine = torch.tensor([num_queries, num_passages], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(mine) for _ in range(size)]
    dist.all_gather(sizes, mine)
    counts = [tuple(int(v) for v in s) for s in sizes]
    if len(set(counts)) != 1:
        raise ValueError(
            f"every rank must hold the same number of queries and passages; got (queries, passages) "
            f"{counts} per rank: the global batch must divide evenly across ranks"
        )


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's rows (all_reduce)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        rank, size = world()
        ctx.rows = slice(rank * tensor.size(0), (rank + 1) * tensor.size(0))
        parts = [torch.empty_like(tensor) for _ in range(size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rows]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from all ranks in rank order; gradients flow back to each owner.

    Every rank must hold the same number of rows and must call backward (collective).
    """
    _, size = world()
    if size == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


def gather_detached(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from all ranks in rank order, without gradient."""
    _, size = world()
    if size == 1:
        return tensor.detach()
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor.detach().contiguous())
    return torch.cat(parts, dim=0)
