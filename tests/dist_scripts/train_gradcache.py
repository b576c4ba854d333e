"""Run under torchrun (gloo): one SGD step (lr 1) of the DeepSpeed engine per ZeRO stage and loss,
with and without GradCache; writes each case's largest deviation of the parameter update from
-grad of the loss on the WHOLE global batch in one process (the 1-rank-with-B reference).

usage: torchrun --nproc_per_node 2 train_gradcache.py MODEL_DIR OUT_JSON
"""

import json
import sys

import deepspeed
import torch
import torch.distributed as dist

from peg.config import RunConfig
from peg.losses import build_loss, passage_ids_from_texts
from peg.model.encoder import Encoder
from peg.train.batches import RankBatch, prepare_step
from peg.train.engine import EngineSettings, build_engine, train_step

model_dir, out_path = sys.argv[1], sys.argv[2]
deepspeed.init_distributed(dist_backend="gloo")
rank, world = dist.get_rank(), dist.get_world_size()

Q, N = 8, 2  # global queries, hard negatives
queries = [f"query number {i} about topic {i % 3}" for i in range(Q)]
passages = []
for i in range(Q):
    passages += [f"positive passage for query {i} " * (1 + i % 3), f"hard negative {i}a", f"hard negative {i}b words"]
passages[4] = passages[0]  # a duplicate of query 0's positive in another query's list (dedup path)
teacher = [[5.0, 3.0 - 0.1 * i, 1.0] for i in range(Q)]

CASES = [  # (zero stage, loss kind, progressive, gradient checkpointing)
    (0, "infonce", False, False),
    (1, "infonce", True, False),
    (2, "listwise", False, False),
    (2, "infonce", True, True),
    (3, "infonce", True, False),
    (3, "listwise", False, False),
]


def config_for(stage, kind, progressive, ckpt, chunk):
    return RunConfig.model_validate({
        # listwise needs teacher scores from the data: this script passes them in its batches directly
        "data": {"train_files": ["in-script-batches-with-teacher-scores.jsonl"]},
        "model": {"name_or_path": model_dir, "query_max_length": 16, "passage_max_length": 24},
        "loss": {"kind": kind, "progressive": {"enabled": progressive, "beta_start": 0.3}},
        "batch": {"queries_per_step": Q, "hard_negatives": N, "chunk_size": chunk},
        "train": {"zero_stage": stage, "grad_clip": None, "warmup_ratio": 0.0, "min_lr_ratio": 1.0,
                  "gradient_checkpointing": ckpt, "learning_rate": 1.0, "weight_decay": 0.0},
    })


def full_params(engine):
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=engine.zero_optimization_stage() == 3):
        return [p.detach().clone() for p in params]


def reference_grads(config):
    torch.manual_seed(0)
    encoder = Encoder(config.model)
    loss_fn = build_loss(config.loss)
    loss_fn.set_progress(3, 10)
    q = encoder(**encoder.tokenize(queries, "query"))
    p = encoder(**encoder.tokenize(passages, "passage"))
    extra = {"passage_ids": passage_ids_from_texts(passages)}
    if config.loss.kind == "listwise":
        extra["teacher_scores"] = torch.tensor(teacher)
    loss = loss_fn.compute_loss_from_embeddings(q, p, **extra)
    loss.backward()
    return float(loss.detach()), [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in encoder.parameters()]


per_rank = Q // world
mine = slice(rank * per_rank, (rank + 1) * per_rank)
batch = RankBatch(
    "synthetic", queries[mine], passages[rank * per_rank * (1 + N) : (rank + 1) * per_rank * (1 + N)], teacher[mine]
)
results = []
for stage, kind, progressive, ckpt in CASES:
    ref_loss, ref_grads = reference_grads(config_for(stage, kind, progressive, False, None))
    for chunk in (None, 3):
        config = config_for(stage, kind, progressive, ckpt, chunk)
        torch.manual_seed(0)
        encoder = Encoder(config.model)
        engine = build_engine(encoder, EngineSettings.for_training(config), world, total_steps=10,
                              optimizer=torch.optim.SGD(encoder.parameters(), lr=1.0))
        before = full_params(engine)
        loss_fn = build_loss(config.loss)
        loss_fn.set_progress(3, 10)
        rank_batch = batch if kind == "listwise" else RankBatch(batch.dataset, batch.queries, batch.passages, None)
        loss = train_step(engine, loss_fn, prepare_step(encoder, rank_batch, chunk), chunk)  # chunks grouped by length
        dist.all_reduce(loss)
        after = full_params(engine)
        diff = max(float((b - a - g).abs().max()) for b, a, g in zip(before, after, ref_grads))
        scale = max(float(g.abs().max()) for g in ref_grads)
        results.append({"stage": stage, "kind": kind, "progressive": progressive, "checkpointing": ckpt,
                        "chunk": chunk, "max_abs_diff": diff, "grad_scale": scale,
                        "loss": float(loss) / world, "ref_loss": ref_loss})
        engine.destroy()
        del engine, encoder
if rank == 0:
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)
dist.barrier()
dist.destroy_process_group()
