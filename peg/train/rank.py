"""One training rank's lifecycle, shared by the trainer and the pretrainer: join the process group
and claim the output folder (`start_rank`), seed, restore from the newest checkpoint or start
fresh (`restore`, after `check_resume` refused another plan's checkpoint), save checkpoints with
every rank's RNG state (`save_checkpoint`), export the model (`export_model`) and shut down in an
order that exits cleanly (`shutdown`). The launcher checks no earlier worker still writes the
output folder (`check_no_live_writer`) before it starts new ones.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from peg.errors import PegError
from peg.model.encoder import Encoder
from peg.model.export import export_sentence_transformers
from peg.store.files import atomic_output, write_atomically

logger = logging.getLogger(__name__)


class TrainError(PegError, RuntimeError):
    """Training could not run or a worker failed."""


def check_resume(ckpt_dir: Path, identity: dict) -> str | None:
    """The newest checkpoint's tag (None without one); refuses, naming what differs, one written
    for another training plan."""
    latest = ckpt_dir / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    record = ckpt_dir / tag / "plan.json"
    if not record.is_file():
        raise TrainError(f"cannot resume from {ckpt_dir / tag}: it has no plan.json (written by another peg version)")
    stored = json.loads(record.read_text())
    differs = [f"{k} {stored.get(k)} -> {v}" for k, v in identity.items() if stored.get(k) != v]
    if differs:
        raise TrainError(f"cannot resume from {ckpt_dir / tag}: it belongs to another training plan ({'; '.join(differs)})")
    return tag


WRITER_LOCK = ".writer.lock"


def claim_output_dir(output_dir: Path) -> int:
    """Hold a shared lock on `output_dir` for the life of this process (a training worker).

    Returns the lock's file descriptor; the kernel releases the lock when the process dies.
    """
    fd = os.open(output_dir / WRITER_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def check_no_live_writer(output_dir: Path) -> None:
    """Raise TrainError if a live process (a worker of an earlier launch) still writes `output_dir`."""
    fd = os.open(output_dir / WRITER_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise TrainError(
            f"{output_dir} is still being written by a live training process (an earlier launch's worker); "
            "it must exit before training resumes there"
        ) from None
    finally:
        os.close(fd)  # closing drops the probe's lock


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def skip_deepspeed_shm_comm() -> None:
    """Keep DeepSpeed's CPU accelerator from compiling its shared-memory comm op in `init_distributed`.

    That op (`deepspeed_shm_comm`) serves only `inference_all_reduce`; ZeRO training reduces through
    torch.distributed (gloo), so the op is never called. Its just-in-time build takes about a minute
    on an idle node (6-12 minutes on 2 busy cores), once in every fresh pod. DeepSpeed builds an op
    only when `deepspeed.ops.__compatible_ops__` marks it compatible (deepspeed/comm/torch.py,
    `build_shm_op`); marking it not compatible gives the gloo path it falls back to anyway.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def start_rank(output_dir: Path) -> tuple[int, int, Path]:
    """Join the process group (NCCL on GPUs, else gloo; no DeepSpeed op is built on CPU), take this
    rank's GPU and claim `output_dir` for this process: (rank, world size, checkpoint folder)."""
    import deepspeed
    import torch.distributed as dist

    if not torch.cuda.is_available():
        skip_deepspeed_shm_comm()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    output_dir.mkdir(parents=True, exist_ok=True)
    claim_output_dir(output_dir)
    return dist.get_rank(), dist.get_world_size(), output_dir / "checkpoints"


def restore(engine, ckpt_dir: Path, rank: int, seed: int, resume: bool, label: str) -> tuple[int, int, int]:
    """(step, epoch, index) to start from: the newest checkpoint's, with this rank's RNG state,
    when resuming and one exists; else (0, 0, 0) with the RNGs seeded per rank."""
    if not (resume and (ckpt_dir / "latest").is_file()):
        seed_all(seed + 1000 * rank)
        return 0, 0, 0
    _, client = engine.load_checkpoint(str(ckpt_dir))
    tag = (ckpt_dir / "latest").read_text().strip()
    _set_rng_state(torch.load(ckpt_dir / tag / f"rng-rank{rank}.pt", weights_only=False))
    if rank == 0:
        logger.info("%s: resumed from checkpoint %s at step %d", label, tag, client["step"])
    return client["step"], client["epoch"], client["index"]


def save_checkpoint(engine, ckpt_dir: Path, step: int, epoch: int, index: int, rank: int, keep: int,
                     identity: dict) -> str:
    """DeepSpeed checkpoint + every rank's RNG state + the plan; `latest` moves only once all are written.
    Returns the tag."""
    import torch.distributed as dist

    tag = f"step{step:08d}"
    (ckpt_dir / tag).mkdir(parents=True, exist_ok=True)
    with atomic_output(ckpt_dir / tag / f"rng-rank{rank}.pt") as out:
        torch.save(_rng_state(), out)
    if rank == 0:
        write_atomically(ckpt_dir / tag / "plan.json", json.dumps(identity, indent=2) + "\n")
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step, "epoch": epoch, "index": index})
    dist.barrier()
    if os.environ.get("LOCAL_RANK", "0") == "0":  # each node prunes its own disk
        tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step"))
        for old in tags[:-keep]:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    return tag


def export_model(engine, encoder: Encoder, model_dir: Path, rank: int, matryoshka_dims: list[int],
                 finetune_fraction: float = 1.0) -> Path:
    """Rank 0 writes the sentence-transformers folder (interpolated toward the base weights when
    `finetune_fraction` < 1: train.finetune_fraction); under ZeRO-3 the weights are gathered first."""
    import deepspeed
    import torch.distributed as dist

    params = list(encoder.model.parameters())
    gather = (
        deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        if engine.zero_optimization_stage() == 3
        else torch.no_grad()
    )
    with gather:
        if rank == 0:
            state = {k: v.detach().float().cpu().clone() for k, v in encoder.model.state_dict().items()}
            export_sentence_transformers(encoder, model_dir, state_dict=state, matryoshka_dims=matryoshka_dims,
                                         finetune_fraction=finetune_fraction)
    dist.barrier()
    return model_dir


def shutdown(engine) -> None:
    """Release DeepSpeed's state and the process group in an order that exits cleanly; DeepSpeed's
    cached groups go with it, so the process can train again (pod-per-rank mode, tests)."""
    import deepspeed.comm as ds_dist
    import torch.distributed as dist

    dist.barrier()
    engine.destroy()
    ds_dist.destroy_process_group()
