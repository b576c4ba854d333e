"""torchrun script: GradCache under DDP (no_sync on all but the last replay) vs no caching.

Per loss, every rank (its own dropout seed) runs
  cached:   GradCache(chunk 3).step(ddp_model, ..., no_sync=ddp_model.no_sync)
  reference: the same chunks encoded with a graph by the plain module, the loss backpropagated
            directly, gradients averaged over ranks with all_reduce
  unsynced: GradCache step without no_sync
counting DDP's gradient all-reduces with a comm hook. Rank 0 writes the results to argv[1].
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).parent))
from losses_cases import ToyEncoder, global_batch, loss_extra, make_losses, rank_slice  # noqa: E402

from peg.losses import GradCache  # noqa: E402
from peg.losses.gradcache import split_inputs  # noqa: E402

CHUNK = 3


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    part = rank_slice(global_batch(), rank, world)
    results: dict = {}
    for name, loss_fn in make_losses().items():
        extra = loss_extra(name, part)
        model = ToyEncoder(dropout=0.2)
        ddp = DistributedDataParallel(model)
        allreduces = [0]

        def counting_hook(state, bucket, allreduces=allreduces):
            allreduces[0] += 1
            return allreduce_hook(state, bucket)

        ddp.register_comm_hook(None, counting_hook)

        torch.manual_seed(100 + rank)
        cached_loss = GradCache(loss_fn, CHUNK).step(ddp, part["q"], part["p"], extra, no_sync=ddp.no_sync)
        cached = {n: p.grad.clone() for n, p in model.named_parameters()}
        synced_once = allreduces[0]
        after_cached = torch.rand(4)

        model.zero_grad(set_to_none=True)
        torch.manual_seed(100 + rank)
        q = torch.cat([model(c) for c in split_inputs(part["q"], CHUNK)])
        p = torch.cat([model(c) for c in split_inputs(part["p"], CHUNK)])
        reference_loss = loss_fn(q, p, **extra)
        reference_loss.backward()
        reference = {}
        for n, param in model.named_parameters():
            dist.all_reduce(param.grad)
            reference[n] = param.grad / world
        after_reference = torch.rand(4)

        model.zero_grad(set_to_none=True)
        allreduces[0] = 0
        GradCache(loss_fn, CHUNK).step(ddp, part["q"], part["p"], extra)
        results[name] = {
            "cached": cached,
            "reference": reference,
            "cached_loss": cached_loss,
            "reference_loss": reference_loss.detach(),
            "allreduces_with_no_sync": synced_once,
            "allreduces_without_no_sync": allreduces[0],
            "replays": len(split_inputs(part["q"], CHUNK)) + len(split_inputs(part["p"], CHUNK)),
            "rng_after": (after_cached, after_reference),
        }
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
