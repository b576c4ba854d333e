"""`train(config, output_dir, resume)`: the training loop, one process per rank.

Where it runs, decided from the environment:
- inside torchrun (LOCAL_RANK set), or one process per pod (RANK and WORLD_SIZE set, no
  PET_NNODES): trains in the calling process;
- in a TrainJob or PyTorchJob pod (PET_NNODES / PET_NODE_RANK / PET_MASTER_ADDR / PET_MASTER_PORT): starts
  torchrun with `config.train.nproc_per_node` processes, which reads the PET_* values itself;
- otherwise (a workstation): starts torchrun with `nproc_per_node` processes on 127.0.0.1.
Output directory layout:
    config.yaml            the resolved run config the workers read
    metrics.jsonl          one record a step (loss, lr, beta, weight statistics, throughput), rank 0
    tensorboard/           the same scalars as TensorBoard events
    training.png           loss / lr / beta(t) / weights / throughput / time split over steps, after the run
    checkpoints/<tag>/     DeepSpeed checkpoints (+ rng-rank<r>.pt, plan.json), every checkpoint_every steps

A checkpoint records the training plan it belongs to (`plan.json`: seed, batch shape, world
size, total steps, the training data's sha256); `--resume` with another plan is refused, naming
what differs, instead of continuing at a batch index of another plan.
    model/                 the final model as a sentence-transformers folder: with train.eval_every, the
                           best on the dev set (best.json names its step; the last step's is last-model/)
    best.json, best-step<N>/  the best dev evaluation so far and its model (see peg.train.selection)
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
import yaml

from peg.config import RunConfig
from peg.console import cause_since, log_size
from peg.errors import PegError
from peg.model.encoder import Encoder
from peg.model.export import export_sentence_transformers
from peg.model.lora import apply_lora, parameter_counts
from peg.process import available_cpus, child_env
from peg.progress import progress_bar
from peg.store import open_store
from peg.store.files import atomic_output, file_sha256, write_atomically
from peg.train.batches import BatchPlan, PairFile, Prefetcher, prepare_step
from peg.train.checkpoints import upload_checkpoint
from peg.train.devset import DevSet, dev_plan_identity, dev_set
from peg.train.selection import DevSelection
from peg.train.metrics import MetricsLog, plot_metrics
from peg.train.telemetry import StepTimer, model_shape, peak_flops, peak_memory_gib, progress_text, step_flops, throughput

logger = logging.getLogger(__name__)


class TrainError(PegError, RuntimeError):
    """Training could not run or a worker failed."""


def train(config: RunConfig, output_dir: str | Path, resume: bool = False, checkpoint_key: str | None = None) -> Path:
    """Train, checkpoint and export to `output_dir`; returns the exported model directory.
    With `checkpoint_key`, each checkpoint is also uploaded to the store under that key."""
    output_dir = Path(output_dir)
    if runs_in_process(os.environ):
        return run_worker(config, output_dir, resume, checkpoint_key)
    return launch(config, output_dir, resume, checkpoint_key)


def runs_in_process(env: Mapping[str, str]) -> bool:
    """True inside torchrun (LOCAL_RANK) or as one process of a pod-per-rank job (RANK, WORLD_SIZE)."""
    return "LOCAL_RANK" in env or ("RANK" in env and "WORLD_SIZE" in env and "PET_NNODES" not in env)


def cpu_threads_per_rank(nproc_per_node: int) -> int:
    """Threads each CPU training rank uses: the CPUs this process may use (a pod's CPU limit, not the
    node's cores) shared by the node's ranks, at least 1.

    The number of threads splits each matmul's sums differently, so it decides the trained bytes: a
    run of 1 node x 2 processes on 2 CPUs and one of 2 pods x 1 process with `cpu: 1` each train
    with 1 thread per rank and give the same model. torchrun alone would give the pods every core of
    their node (it sets OMP_NUM_THREADS=1 only with several processes per node).
    """
    return max(1, available_cpus() // nproc_per_node)


def torchrun_command(
    nproc_per_node: int, config_path: Path, output_dir: Path, resume: bool, env: Mapping[str, str],
    checkpoint_key: str | None = None, pretrain: bool = False,
) -> list[str]:
    """The torch.distributed.run command line that starts the workers (`pretrain`: pretraining workers)."""
    # peg.process runs torchrun so that it dies with this process (and its workers die with it)
    cmd = [sys.executable, "-m", "peg.process", "torch.distributed.run", "--nproc_per_node", str(nproc_per_node)]
    if "PET_NNODES" not in env:  # TrainJob / PyTorchJob pods: torchrun reads nodes, rank and master from PET_*
        cmd += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    cmd += ["-m", "peg.train.worker", str(config_path), str(output_dir)]
    if checkpoint_key:
        cmd += ["--checkpoint-key", checkpoint_key]
    return cmd + ["--resume"] * resume + ["--pretrain"] * pretrain


def training_plan(
    config: RunConfig, world_size: int, rank: int = 0, gather: Callable[[object], list[object]] | None = None
) -> tuple[BatchPlan, int, dict, DevSet | None]:
    """Index and check the training data: (batch plan, total steps, the plan's identity, the dev set
    or None without `train.eval_every`); the dev set's held-out queries are left out of the batches.

    With `gather` (inside the workers) each rank scans its share of the blocks; without it (the
    launcher, before any worker starts) this process scans them all. Raises `DataError` /
    `BatchError` / `TrainError` naming the file, line or key at fault.
    """
    files = list(config.data.train_files)
    if not files:
        raise TrainError("data.train_files is empty: training needs at least one training-pair JSONL file")
    need_scores = config.loss.kind == "listwise"
    dev = dev_set(config)
    held_out = dev.held_out if dev else frozenset()
    datasets = {
        f: PairFile.index(f, config.batch.hard_negatives, need_scores, limit=config.data.max_train_queries,
                          block_bytes=config.data.block_bytes, shard=rank if gather else 0,
                          shards=world_size if gather else 1, gather=gather, held_out=held_out)
        for f in files
    }  # fmt: skip
    d = config.data
    if d.dataset_weights is not None and len(d.dataset_weights) != len(files):
        raise TrainError(
            f"data.dataset_weights has {len(d.dataset_weights)} weights for {len(files)} training files ({', '.join(files)})"
        )
    plan = BatchPlan(datasets, config.batch.queries_per_step, world_size, config.train.seed, d.sampling, d.dataset_weights)
    total_steps = config.train.max_steps or config.train.epochs * plan.steps_per_epoch
    digest = hashlib.sha256()
    for f in files:
        digest.update(file_sha256(Path(f))[1].encode())
    identity = {
        "train.seed": config.train.seed,
        "batch.queries_per_step": config.batch.queries_per_step,
        "batch.hard_negatives": config.batch.hard_negatives,
        "world size": world_size,
        "total steps": total_steps,
        "data.max_train_queries": config.data.max_train_queries,
        "data.block_bytes": config.data.block_bytes,
        "training data sha256": digest.hexdigest(),
        **dev_plan_identity(config),
        **({} if d.sampling == "proportional" else {"data.sampling": d.sampling, "data.dataset_weights": d.dataset_weights}),
    }
    return plan, total_steps, identity, dev


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


def launch(config: RunConfig, output_dir: Path, resume: bool, checkpoint_key: str | None = None,
           pretrain: bool = False) -> Path:
    """Check the data and the plan here (training: `pretrain` workers check theirs), then start
    `nproc_per_node` workers (training, or `pretrain`ing) with torch.distributed.run."""
    world_size = config.train.nproc_per_node * int(os.environ.get("PET_NNODES", "1"))
    if not pretrain:
        _, _, identity, _ = training_plan(config, world_size)
        if resume and (tag := check_resume(output_dir / "checkpoints", identity)):
            logger.info("train: resuming from checkpoint %s", tag)
    output_dir.mkdir(parents=True, exist_ok=True)
    check_no_live_writer(output_dir)
    config_path = write_atomically(output_dir / "config.yaml", yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    env = child_env(os.environ)  # torchrun (peg.process) watches this process
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", str(cpu_threads_per_rank(config.train.nproc_per_node)))
        logger.info("training on CPU: %s processes x %s threads (OMP_NUM_THREADS)", config.train.nproc_per_node,
                 env["OMP_NUM_THREADS"])
    cmd = torchrun_command(config.train.nproc_per_node, config_path, output_dir, resume, env, checkpoint_key, pretrain)
    mark = log_size()
    rc = subprocess.run(cmd, env=env).returncode
    if rc != 0:
        cause = cause_since(mark)  # the ranks' tracebacks are in the log: show their last error line
        raise TrainError(f"training workers failed (exit status {rc})" + (f": {cause}" if cause else ""))
    return output_dir / "model"


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def _seed_all(seed: int) -> None:
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
    """Join the process group (NCCL on GPUs, else gloo), take this rank's GPU and claim
    `output_dir` for this process: (rank, world size, checkpoint folder)."""
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


def run_worker(config: RunConfig, output_dir: Path, resume: bool, checkpoint_key: str | None = None) -> Path:
    """The per-rank training loop (inside torchrun); checkpoints also go to the store at `checkpoint_key`."""
    import torch.distributed as dist

    from peg.losses import build_loss
    from peg.train.engine import auto_chunk_size, build_engine, train_step

    rank, world_size, ckpt_dir = start_rank(output_dir)

    def gather(obj: object) -> list[object]:
        parts: list[object] = [None] * world_size
        dist.all_gather_object(parts, obj)
        return parts

    plan, total_steps, identity, dev = training_plan(config, world_size, rank, gather)
    if resume:
        check_resume(ckpt_dir, identity)

    _seed_all(config.train.seed)
    encoder = Encoder(config.model)
    if config.model.lora.enabled:
        apply_lora(encoder, config.model.lora)
        if rank == 0:
            trainable, total = parameter_counts(encoder)
            logger.info("train: LoRA trains %d of %d parameters (%.2f%%)", trainable, total, 100 * trainable / total)
    selection = DevSelection(config, dev, encoder, output_dir, rank, resume, checkpoint_key) if dev else None
    engine = build_engine(encoder, config, world_size, total_steps)
    loss_fn = build_loss(config.loss, config.model.normalize)
    if config.loss.matryoshka_dims and max(config.loss.matryoshka_dims) > encoder.dim:
        raise TrainError(
            f"loss.matryoshka_dims: {max(config.loss.matryoshka_dims)} exceeds the model's embedding dimension {encoder.dim}"
        )
    chunk_size, chunk_tokens = config.batch.chunk_size, config.batch.chunk_tokens
    if chunk_size is None and chunk_tokens is None and engine.device.type == "cuda":
        chunk_size = auto_chunk_size(encoder, engine.device)

    step, epoch, index = restore(engine, ckpt_dir, rank, config.train.seed, resume, "train")
    metrics = MetricsLog(output_dir, step if resume else None) if rank == 0 else None

    engine.train()
    device = engine.device
    shape, peak = model_shape(encoder.model), peak_flops(device)
    if rank == 0 and device.type == "cuda":
        if peak:
            logger.info("train: MFU against %.0f TFLOP/s (%s)", peak[0] / 1e12, peak[1])
        else:
            logger.info("train: no MFU: %s is not in the peak table and PEG_PEAK_TFLOPS is not set",
                        torch.cuda.get_device_name(device))
    pin = device.type == "cuda"

    def prepare(position: tuple[int, int, str, int]):
        ep, _, dataset, number = position
        group = chunk_size if config.batch.group_by_length else None  # None: one batch padded to its longest
        return prepare_step(encoder, plan.rank_batch(ep, dataset, number, rank), group, pin_memory=pin,
                            chunk_tokens=chunk_tokens)

    positions = plan.positions(epoch, index)
    batches = Prefetcher(positions, prepare, config.train.prefetch) if config.train.prefetch else (
        (p, prepare(p)) for p in positions)  # fmt: skip
    try:
        with progress_bar(total_steps, "train", enabled=rank == 0, unit="step") as advance:
            advance(step)
            while step < total_steps:
                timer = StepTimer(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                start = time.perf_counter()
                with timer.phase("data"):
                    (epoch, index, _, _), inputs = next(batches)
                loss_fn.set_progress(step, total_steps)
                lr = engine.get_lr()[0]
                # token-budget chunks arrive as Chunks: any chunk size makes GradCache cache them
                loss = train_step(engine, loss_fn, inputs, chunk_size or chunk_tokens, timer)
                counts = torch.tensor(
                    [float(loss), inputs.passage_count, inputs.tokens, step_flops(shape, inputs.tokens, inputs.lengths_sq)],
                    dtype=torch.float64, device=device,
                )
                dist.all_reduce(counts)
                seconds = time.perf_counter() - start
                step, index = step + 1, index + 1
                rates = throughput(seconds, float(counts[1]), float(counts[2]), float(counts[3]), world_size,
                                   peak[0] if peak else None)
                rates["peak_memory_gib"] = peak_memory_gib(device)
                dev_metrics, stop = {}, False
                if selection and selection.due(step, total_steps):
                    dev_metrics, stop = selection.evaluate(engine, step)
                if metrics is not None and (step % config.train.log_every == 0 or step == total_steps or dev_metrics):
                    record = {"step": step, "loss": float(counts[0]) / world_size, "lr": lr}
                    record.update({k: v for k, v in loss_fn.last_stats.items() if k != "loss"})
                    record.update(rates)
                    record.update({f"time_{name}_s": value for name, value in timer.seconds.items()})
                    metrics.log({**record, **dev_metrics})
                if config.train.checkpoint_every and step % config.train.checkpoint_every == 0 and step < total_steps:
                    tag = _save_checkpoint(engine, ckpt_dir, step, epoch, index, rank, config.train.keep_checkpoints,
                                           identity)
                    if checkpoint_key:
                        upload_checkpoint(open_store(config.store), checkpoint_key, ckpt_dir, tag, config.train.keep_checkpoints)
                advance(1, status=progress_text(rates))
                if stop:  # early stopping: the best model is already kept
                    break
    finally:
        if isinstance(batches, Prefetcher):
            batches.close()

    if metrics is not None:
        metrics.close()
        plot_metrics(metrics.path, output_dir / "training.png")
    model_dir = output_dir / "model"
    _export(engine, encoder, output_dir / "last-model" if selection else model_dir, rank, config.loss.matryoshka_dims)
    if selection:
        selection.finish(model_dir)
    _shutdown(engine)
    return model_dir


def restore(engine, ckpt_dir: Path, rank: int, seed: int, resume: bool, label: str) -> tuple[int, int, int]:
    """(step, epoch, index) to start from: the newest checkpoint's, with this rank's RNG state,
    when resuming and one exists; else (0, 0, 0) with the RNGs seeded per rank."""
    if not (resume and (ckpt_dir / "latest").is_file()):
        _seed_all(seed + 1000 * rank)
        return 0, 0, 0
    _, client = engine.load_checkpoint(str(ckpt_dir))
    tag = (ckpt_dir / "latest").read_text().strip()
    _set_rng_state(torch.load(ckpt_dir / tag / f"rng-rank{rank}.pt", weights_only=False))
    if rank == 0:
        logger.info("%s: resumed from checkpoint %s at step %d", label, tag, client["step"])
    return client["step"], client["epoch"], client["index"]


def _save_checkpoint(engine, ckpt_dir: Path, step: int, epoch: int, index: int, rank: int, keep: int,
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


def _export(engine, encoder: Encoder, model_dir: Path, rank: int, matryoshka_dims: list[int]) -> Path:
    """Rank 0 writes the sentence-transformers folder; under ZeRO-3 the weights are gathered first."""
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
            export_sentence_transformers(encoder, model_dir, state_dict=state, matryoshka_dims=matryoshka_dims)
    dist.barrier()
    return model_dir


def _shutdown(engine) -> None:
    """Release DeepSpeed's state and the process group in an order that exits cleanly; DeepSpeed's
    cached groups go with it, so the process can train again (pod-per-rank mode, tests)."""
    import deepspeed.comm as ds_dist
    import torch.distributed as dist

    dist.barrier()
    engine.destroy()
    ds_dist.destroy_process_group()
