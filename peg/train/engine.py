"""DeepSpeed engine for an `Encoder`, the loss from the config, and one optimizer step.

GradCache under ZeRO: the chunked replay calls `engine.backward` once per chunk, and the
gradients must be reduced across ranks ONCE per optimizer step, after the last chunk:
- ZeRO 0 and 1 reduce only at a gradient-accumulation boundary, so the boundary is set False
  for every replay but the last (`engine.set_gradient_accumulation_boundary`).
- ZeRO 2 and 3 partition gradients and would reduce-scatter in every backward; their replay
  runs inside `engine.coalesce_grad_reduction()` (DeepSpeed >= 0.19), which keeps gradients
  local and issues a single reduction when the block exits.
The DeepSpeed config uses gradient_accumulation_steps 1: one `engine.step()` per global batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from peg.config import RunConfig, TrainConfig
from peg.losses import EmbeddingLoss, GradCache
from peg.model.encoder import Encoder
from peg.train.batches import StepInputs
from peg.train.schedule import warmup_linear_decay
from peg.train.telemetry import StepTimer


@dataclass(frozen=True)
class EngineSettings:
    """What `build_engine` builds a DeepSpeed engine from, read from either section without writing
    over the config: `for_training` takes `batch` and `train`; `for_pretraining` takes `pretrain`'s
    batch size and learning rate, no gradient checkpointing, and `train`'s ZeRO stage, precision,
    warmup, clipping, weight decay and compile (`train`: those shared settings)."""

    batch_size: int  # queries (training) or passages (pretraining) per optimizer step, over all ranks
    learning_rate: float
    gradient_checkpointing: bool
    train: TrainConfig

    @classmethod
    def for_training(cls, config: RunConfig) -> EngineSettings:
        return cls(config.batch.queries_per_step, config.train.learning_rate, config.train.gradient_checkpointing, config.train)

    @classmethod
    def for_pretraining(cls, config: RunConfig) -> EngineSettings:
        return cls(config.pretrain.batch_size, config.pretrain.learning_rate, False, config.train)


def use_bf16(train: TrainConfig) -> bool:
    """`precision: auto` means bf16 on a GPU and fp32 on CPU."""
    if train.precision == "auto":
        return torch.cuda.is_available()
    return train.precision == "bf16"


def deepspeed_config(settings: EngineSettings, world_size: int) -> dict:
    """The DeepSpeed config dict derived from the engine settings (one micro-step per optimizer step)."""
    per_rank = settings.batch_size // world_size
    return {
        "train_batch_size": per_rank * world_size,
        "train_micro_batch_size_per_gpu": per_rank,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero_config(settings.train.zero_stage),
        "bf16": {"enabled": use_bf16(settings.train)},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # DeepSpeed's own default clips at 1.0; 0 switches clipping off
        "gradient_clipping": settings.train.grad_clip or 0.0,
    }


def zero_config(stage: int) -> dict:
    """ZeRO section. On CPU (no streams to overlap on) communication overlap and ZeRO-3
    prefetching are off: with them, 1 of 15 repeated 2-rank ZeRO-3 runs gave a different
    step-2 loss; without them the runs are bit-identical (the exact-resume test needs that)."""
    zero: dict = {"stage": stage}
    if not torch.cuda.is_available():
        zero["overlap_comm"] = False
        if stage == 3:
            zero["stage3_prefetch_bucket_size"] = 0
    return zero


def adamw(module: torch.nn.Module, settings: EngineSettings) -> torch.optim.Optimizer:
    """torch AdamW over the parameters that require gradients (LoRA: the adapters); no weight decay on
    biases and LayerNorm weights. Empty groups are left out: ZeRO drops them, and the lr scheduler
    must see the groups the optimizer keeps."""
    decay, no_decay = [], []
    for param in module.parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": settings.train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=settings.learning_rate)


def build_engine(
    encoder: Encoder,
    settings: EngineSettings,
    world_size: int,
    total_steps: int,
    optimizer: torch.optim.Optimizer | None = None,
):
    """`deepspeed.initialize` with AdamW (or `optimizer`) and warmup + linear decay; returns the engine."""
    import deepspeed

    if settings.gradient_checkpointing:
        encoder.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if settings.train.compile:
        encoder.model.compile(dynamic=True)  # in place: parameter names (checkpoints, export) unchanged
    optimizer = optimizer or adamw(encoder, settings)
    t = settings.train
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_linear_decay(total_steps, t.warmup_ratio, t.min_lr_ratio)
    )
    engine, _, _, _ = deepspeed.initialize(
        model=encoder, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(settings, world_size)
    )
    return engine


def auto_chunk_size(encoder: Encoder, device: torch.device, free_fraction: float = 0.5) -> int:
    """GradCache chunk whose activations fit `free_fraction` of the GPU's free memory.

    Activation memory of one text of s tokens in training, 16-bit activations (Korthikanti et
    al. 2022, no recomputation): layers x s x h x (34 + 5 x heads x s / h) bytes.
    """
    free, _ = torch.cuda.mem_get_info(device)
    config = encoder.model.config
    s = max(encoder.config.query_max_length, encoder.config.passage_max_length)
    h, heads = config.hidden_size, config.num_attention_heads
    per_text = config.num_hidden_layers * s * h * (34 + 5 * heads * s / h)
    return int(max(8, min(8192, free_fraction * free // per_text)) // 8 * 8)


@contextlib.contextmanager
def _not_a_boundary(engine) -> Iterator[None]:
    """ZeRO 0/1: a replay inside this block accumulates gradients locally without reducing."""
    engine.set_gradient_accumulation_boundary(False)
    try:
        yield
    finally:
        engine.set_gradient_accumulation_boundary(True)


def train_step(
    engine, loss_fn: EmbeddingLoss, step: StepInputs, chunk_size: int | None, timer: StepTimer | None = None
) -> torch.Tensor:
    """Forward + backward + `engine.step()` for this rank's part of one global batch.

    With `chunk_size` the backward is GradCache over the step's length-grouped chunks (constant
    activation memory); without it the whole batch goes through one graph. `timer` receives
    the forward / loss / replay / optimizer split. Returns the rank's detached loss.
    """
    timer = timer or StepTimer(engine.device)
    step = step.to(engine.device)
    engine.set_gradient_accumulation_boundary(True)
    coalesce = chunk_size is not None and engine.zero_optimization_stage() >= 2
    with engine.coalesce_grad_reduction() if coalesce else contextlib.nullcontext():
        loss = GradCache(loss_fn, chunk_size).step(
            lambda inputs: engine(**inputs),
            step.queries,
            step.passages,
            step.extra,
            backward_fn=engine.backward,
            no_sync=None if coalesce else (lambda: _not_a_boundary(engine)),
            phase=timer.phase,
        )
    with timer.phase("optimizer"):
        engine.step()
    return loss
