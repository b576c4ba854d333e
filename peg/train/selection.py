"""Dev evaluation during training, the best model kept, early stopping (`train.eval_every`).

`DevSelection` is built on every rank before the DeepSpeed engine (under ZeRO-3 rank 0 keeps a
CPU copy of the encoder then, to load the gathered weights into). Its `evaluate` is collective:
under ZeRO 0-2 each rank encodes its share of the dev queries and the corpus and rank 0 gathers
the embeddings and scores them (`peg.train.devset.dev_metrics`), so the dev encode takes 1/world
of the time and no rank idles through it (a corpus one rank encodes alone could outlast the
process group's 10-minute timeout while the others wait); under ZeRO-3 every rank takes part in
gathering the weights and rank 0 encodes everything with its copy. When the score on
`train.select_metric` beats the best so far, rank 0 exports that model as
`best-step<N>/` (a sentence-transformers folder), then atomically rewrites `best.json` naming it,
then deletes the previous best folder: at every moment `best.json` names a complete folder, so
the best so far survives a kill -9 and `--resume` continues from it. With a store key (a pipeline
run) the best also goes to the store (`peg.train.checkpoints.upload_best`) and a resumed pod with a
fresh disk gets it back from there. Early stopping: with
`train.early_stopping_patience` P, training stops once P evaluations have passed since the best
one (steps since the best >= P x eval_every; rank 0 decides, every rank follows).
`finish` makes `model/` a copy of the best folder (the last weights are in `last-model/`).
"""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path

import numpy as np
import torch

from peg.config import RunConfig
from peg.model.encoder import Encoder
from peg.model.export import copy_model_folder, export_sentence_transformers
from peg.store import open_store
from peg.train.checkpoints import restore_best, upload_best
from peg.train.devset import BEST_RECORD, BestRecord, DevSet, dev_metrics, encode_dev_share, load_dev_corpus

logger = logging.getLogger(__name__)

BEST_PREFIX = "best-step"


class DevSelection:
    """Evaluate, keep the best, stop early; every method is called on every rank."""

    def __init__(
        self, config: RunConfig, dev: DevSet, encoder: Encoder, output_dir: Path, rank: int, resume: bool,
        store_key: str | None = None,
    ):
        self.config, self.dev, self.encoder, self.output_dir, self.rank = config, dev, encoder, output_dir, rank
        self.store = open_store(config.store) if store_key and rank == 0 else None
        self.store_key = store_key
        t = config.train
        self.metric, self.every, self.patience = t.select_metric, t.eval_every, t.early_stopping_patience
        self.corpus = load_dev_corpus(config)
        # ZeRO-3 partitions the encoder's weights in place: rank 0 scores a full copy instead
        self.eval_copy = copy.deepcopy(encoder) if rank == 0 and t.zero_stage == 3 else None
        self.best: BestRecord | None = None
        if rank == 0:
            if resume:
                if self.store:
                    restore_best(self.store, store_key, output_dir)
                self.best = BestRecord.read(output_dir)
            else:
                (output_dir / BEST_RECORD).unlink(missing_ok=True)
                self._remove_best_folders(keep=None)

    def due(self, step: int, total_steps: int) -> bool:
        return step % self.every == 0 or step == total_steps

    def evaluate(self, engine, step: int) -> tuple[dict[str, float], bool]:
        """Score the dev set at `step`: (rank 0: the dev metrics, other ranks: {}; stop early?)."""
        import torch.distributed as dist

        model = self._gathered_model(engine)
        batch_size = self.config.encode.batch_size
        if model is self.encoder:  # ZeRO 0-2: every rank holds the whole encoder and encodes its share
            world = dist.get_world_size()
            share = encode_dev_share(model, self.dev, self.corpus, batch_size, self.rank, world)
            shares = [None] * world if self.rank == 0 else None
            dist.gather_object(share, shares, dst=0)
        elif self.rank == 0:  # ZeRO-3: rank 0 encodes everything with its gathered copy
            model.to(engine.device)
            shares = [encode_dev_share(model, self.dev, self.corpus, batch_size)]
        metrics: dict[str, float] = {}
        stop = False
        if self.rank == 0:
            q, p = (np.concatenate([s[i] for s in shares]) for i in (0, 1))
            metrics = dev_metrics(self.dev, q, self.corpus[0], p, tuple(self.config.eval.k_values),
                                  self.config.loss.matryoshka_dims, model.config.normalize)  # fmt: skip
            record = BestRecord(step, self.metric, metrics[f"dev_{self.metric}"], f"{BEST_PREFIX}{step:08d}", metrics)
            if record.improves_on(self.best):
                self._keep(model, record)
            if model is self.eval_copy:
                model.to("cpu")
            metrics["dev_best_step"] = float(self.best.step)
            stop = self.patience is not None and step - self.best.step >= self.patience * self.every
            if stop:
                logger.info("train: early stop at step %d: no better dev %s since step %d", step, self.metric, self.best.step)
        flag = torch.tensor([int(stop)], device=engine.device)
        dist.broadcast(flag, 0)
        return metrics, bool(flag.item())

    def finish(self, model_dir: Path) -> None:
        """Rank 0: `model_dir` becomes a copy of the best model folder (atomically replaced)."""
        if self.rank != 0:
            return
        best = self.best
        copy_model_folder(self.output_dir / best.model, model_dir)
        logger.info("train: best dev %s %.4f at step %d: exported to %s", best.metric, best.value, best.step, model_dir)

    def _gathered_model(self, engine) -> Encoder:
        """The model rank 0 scores: the engine's encoder, or under ZeRO-3 the copy loaded with the
        gathered weights (collective)."""
        if engine.zero_optimization_stage() != 3:
            return self.encoder
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.encoder.model.parameters()), modifier_rank=None):
            if self.rank == 0:
                state = {k: v.detach().float().cpu() for k, v in self.encoder.model.state_dict().items()}
                self.eval_copy.model.load_state_dict(state)
        return self.eval_copy

    def _keep(self, model: Encoder, record: BestRecord) -> None:
        state = {k: v.detach().float().cpu().clone() for k, v in model.model.state_dict().items()}
        export_sentence_transformers(model, self.output_dir / record.model, state_dict=state,
                                     matryoshka_dims=self.config.loss.matryoshka_dims,
                                     finetune_fraction=self.config.train.finetune_fraction)  # fmt: skip
        record.write(self.output_dir)
        self.best = record
        self._remove_best_folders(keep=record.model)
        if self.store:
            upload_best(self.store, self.store_key, self.output_dir, record)

    def _remove_best_folders(self, keep: str | None) -> None:
        for folder in self.output_dir.glob(f"{BEST_PREFIX}*"):
            if folder.name != keep:
                shutil.rmtree(folder, ignore_errors=True)


def best_summary(output_dir: Path) -> str | None:
    """One line naming the step whose model was exported, or None without evaluation."""
    best = BestRecord.read(output_dir)
    if best is None:
        return None
    return f"best: dev {best.metric} {best.value:.4f} at step {best.step} (exported to model/; last step: last-model/)"
