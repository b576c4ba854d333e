"""`train(config, output_dir, resume)`: the training loop, one process per rank.

Where it runs, decided from the environment:
- inside torchrun (LOCAL_RANK set), or one process per pod (RANK and WORLD_SIZE set, no
  PET_NNODES): trains in the calling process;
- in a TrainJob or PyTorchJob pod (PET_NNODES / PET_NODE_RANK / PET_MASTER_ADDR / PET_MASTER_PORT): starts
  torchrun with `config.train.nproc_per_node` processes, which reads the PET_* values itself;
- otherwise (a workstation): starts torchrun with `nproc_per_node` processes on 127.0.0.1.
Output directory layout:
    config.yaml            the run config the workers read, as given
    inputs.json            the training inputs the workers read (`TrainInputs`: train files, initial model)
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

import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from peg.config import ModelConfig, RunConfig
from peg.console import cause_since, log_size
from peg.model.encoder import Encoder
from peg.model.lora import apply_lora, parameter_counts
from peg.process import available_cpus, child_env
from peg.progress import progress_bar
from peg.store import open_store
from peg.store.files import file_sha256, write_atomically
from peg.train.batches import BatchPlan, PairFile, Prefetcher, prepare_step
from peg.train.checkpoints import upload_checkpoint
from peg.train.rank import (
    TrainError,
    check_no_live_writer,
    check_resume,
    export_model,
    restore,
    save_checkpoint,
    seed_all,
    shutdown,
    start_rank,
)
from peg.train.devset import DevSet, dev_plan_identity, dev_set
from peg.train.selection import DevSelection
from peg.train.metrics import MetricsLog, plot_metrics
from peg.train.telemetry import StepTimer, model_shape, peak_flops, peak_memory_gib, progress_text, step_flops, throughput

logger = logging.getLogger(__name__)


INPUTS_FILE = "inputs.json"  # beside config.yaml in the output folder: the `TrainInputs` the workers read


@dataclass(frozen=True)
class TrainInputs:
    """What training reads besides its config, passed explicitly rather than written into it: the
    training-pair files in order, and the model to start from (None: `model.name_or_path`)."""

    train_files: tuple[str, ...]
    init_model: str | None = None

    @classmethod
    def from_config(cls, config: RunConfig) -> TrainInputs:
        """The inputs `peg train CONFIG` trains on: `data.train_files`, from `model.name_or_path`."""
        return cls(tuple(config.data.train_files))

    def model_config(self, config: RunConfig) -> ModelConfig:
        """The model settings to build the encoder from: the config's, starting from `init_model`."""
        return config.model if self.init_model is None else config.model.model_copy(update={"name_or_path": self.init_model})

    def to_json(self) -> str:
        return json.dumps({"train_files": list(self.train_files), "init_model": self.init_model}, indent=2) + "\n"

    @classmethod
    def read(cls, path: Path) -> TrainInputs:
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(tuple(data["train_files"]), data["init_model"])


def train(config: RunConfig, output_dir: str | Path, resume: bool = False, checkpoint_key: str | None = None,
          inputs: TrainInputs | None = None) -> Path:
    """Train on `inputs` (default: `TrainInputs.from_config`), checkpoint and export to `output_dir`;
    returns the exported model directory. With `checkpoint_key`, each checkpoint is also uploaded
    to the store under that key. The config is passed on to the workers unchanged."""
    output_dir = Path(output_dir)
    inputs = inputs or TrainInputs.from_config(config)
    if runs_in_process(os.environ):
        return run_worker(config, output_dir, resume, checkpoint_key, inputs)
    return launch(config, output_dir, resume, checkpoint_key, inputs=inputs)


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
    config: RunConfig, world_size: int, rank: int = 0, gather: Callable[[object], list[object]] | None = None,
    files: Sequence[str] | None = None,
) -> tuple[BatchPlan, int, dict, DevSet | None]:
    """Index and check the training data: (batch plan, total steps, the plan's identity, the dev set
    or None without `train.eval_every`); the dev set's held-out queries are left out of the batches.

    With `gather` (inside the workers) each rank scans its share of the blocks; without it (the
    launcher, before any worker starts) this process scans them all. Raises `DataError` /
    `BatchError` / `TrainError` naming the file, line or key at fault. `files`: the training-pair
    files (default: `data.train_files`).
    """
    files = list(config.data.train_files if files is None else files)
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


def launch(config: RunConfig, output_dir: Path, resume: bool, checkpoint_key: str | None = None,
           pretrain: bool = False, inputs: TrainInputs | None = None) -> Path:
    """Check the data and the plan here (training: `pretrain` workers check theirs), then start
    `nproc_per_node` workers (training on `inputs`, or `pretrain`ing) with torch.distributed.run.
    The workers read `config` as given (config.yaml) and the training inputs (inputs.json)."""
    world_size = config.train.nproc_per_node * int(os.environ.get("PET_NNODES", "1"))
    if not pretrain:
        inputs = inputs or TrainInputs.from_config(config)
        _, _, identity, _ = training_plan(config, world_size, files=inputs.train_files)
        if resume and (tag := check_resume(output_dir / "checkpoints", identity)):
            logger.info("train: resuming from checkpoint %s", tag)
    output_dir.mkdir(parents=True, exist_ok=True)
    check_no_live_writer(output_dir)
    config_path = write_atomically(output_dir / "config.yaml", yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    if inputs is not None:
        write_atomically(output_dir / INPUTS_FILE, inputs.to_json())
    env = child_env(os.environ)  # torchrun (peg.process) watches this process
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", str(cpu_threads_per_rank(config.train.nproc_per_node)))
        logger.info("training on CPU: %s processes x %s threads", config.train.nproc_per_node,
                 env["OMP_NUM_THREADS"])
    cmd = torchrun_command(config.train.nproc_per_node, config_path, output_dir, resume, env, checkpoint_key, pretrain)
    mark = log_size()
    rc = subprocess.run(cmd, env=env).returncode
    if rc != 0:
        cause = cause_since(mark)  # the ranks' tracebacks are in the log: show their last error line
        raise TrainError(f"training workers failed (exit status {rc})" + (f": {cause}" if cause else ""))
    return output_dir / "model"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(config: RunConfig, output_dir: Path, resume: bool, checkpoint_key: str | None = None,
               inputs: TrainInputs | None = None) -> Path:
    """The per-rank training loop (inside torchrun) on `inputs` (default: `TrainInputs.from_config`);
    checkpoints also go to the store at `checkpoint_key`."""
    import torch.distributed as dist

    from peg.losses import build_loss
    from peg.train.engine import EngineSettings, auto_chunk_size, build_engine, train_step

    rank, world_size, ckpt_dir = start_rank(output_dir)

    def gather(obj: object) -> list[object]:
        parts: list[object] = [None] * world_size
        dist.all_gather_object(parts, obj)
        return parts

    inputs = inputs or TrainInputs.from_config(config)
    plan, total_steps, identity, dev = training_plan(config, world_size, rank, gather, files=inputs.train_files)
    if resume:
        check_resume(ckpt_dir, identity)

    seed_all(config.train.seed)
    encoder = Encoder(inputs.model_config(config))
    if config.model.lora.enabled:
        apply_lora(encoder, config.model.lora)
        if rank == 0:
            trainable, total = parameter_counts(encoder)
            logger.info("train: LoRA trains %d of %d parameters (%.2f%%)", trainable, total, 100 * trainable / total)
    selection = DevSelection(config, dev, encoder, output_dir, rank, resume, checkpoint_key) if dev else None
    engine = build_engine(encoder, EngineSettings.for_training(config), world_size, total_steps)
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
                    tag = save_checkpoint(engine, ckpt_dir, step, epoch, index, rank, config.train.keep_checkpoints,
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
    export_model(engine, encoder, output_dir / "last-model" if selection else model_dir, rank, config.loss.matryoshka_dims,
                 config.train.finetune_fraction)
    if selection:
        selection.finish(model_dir)
    shutdown(engine)
    return model_dir
