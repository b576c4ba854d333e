"""torchrun script: each rank computes every loss on its share of `losses_cases.global_batch`.

Writes (rank 0) to argv[1] a torch file with, per loss, the parameter gradients averaged over
ranks (as DDP would), every rank's loss value, and the error raised for an uneven batch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from losses_cases import ToyEncoder, global_batch, loss_extra, make_losses, rank_slice  # noqa: E402


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    part = rank_slice(global_batch(), rank, world)
    results: dict = {}
    for name, loss_fn in make_losses().items():
        model = ToyEncoder()
        loss = loss_fn(model(part["q"]), model(part["p"]), **loss_extra(name, part))
        loss.backward()
        grads = {}
        for pname, param in model.named_parameters():
            dist.all_reduce(param.grad)
            grads[pname] = param.grad / world
        losses = [torch.zeros(()) for _ in range(world)]
        dist.all_gather(losses, loss.detach())
        results[name] = {"grads": grads, "rank_losses": torch.stack(losses), "stats": loss_fn.last_stats}

    q, p = part["q"], part["p"]
    if rank == 1:  # drop one query and its passages: the batch no longer divides evenly
        q, p = q[:-1], p[: -(p.size(0) // q.size(0))]
    try:
        make_losses()["infonce"](q, p)
        results["uneven_error"] = None
    except ValueError as e:
        results["uneven_error"] = str(e)
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
