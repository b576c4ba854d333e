"""PEG's corpus pretraining: RetroMAE-style masked auto-encoding, before contrastive training.

For each batch of corpus passages:
- the encoder (the run's model with a masked-LM head) reads a copy with `encoder_mask_rate` of its
  tokens masked and predicts them (encoder MLM loss); its pooled output (the run's pooling) is the
  sentence embedding;
- a one-layer decoder reads a second copy with `decoder_mask_rate` of its tokens masked, whose first
  position is replaced by the sentence embedding, and predicts the masked tokens through the same
  MLM head (decoder loss): the embedding must carry what the heavy masking hides.
Loss = encoder MLM + decoder MLM (Xiao et al. 2022, RetroMAE; PEG pretrains this way).

Exactly round(rate x maskable tokens) tokens of each passage are masked (special and padding
tokens never), drawn from a generator seeded by (seed, step, rank): a resumed run masks what the
uninterrupted one did. Training runs like `train`: torchrun processes started here (or inside a
PyTorchJob pod), `peg.train.engine.build_engine` (`EngineSettings.for_pretraining`: DeepSpeed ZeRO from `train`), the trainer's
checkpoints (with RNG state and the plan they belong to; also uploaded to the store at
`checkpoint_key`), metrics.jsonl. Output: `model/`, the encoder alone as a sentence-transformers
folder, which `train` then starts from.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import torch

from peg.config import PretrainConfig, RunConfig
from peg.data import iter_corpus
from peg.model.encoder import Encoder, clip_text, pool, resolve_model_path
from peg.progress import progress_bar
from peg.store import open_store
from peg.train.batches import BatchError
from peg.train.checkpoints import upload_checkpoint
from peg.train.metrics import MetricsLog, plot_metrics
from peg.train.rank import TrainError, check_resume, export_model, restore, save_checkpoint, seed_all, shutdown, start_rank
from peg.train.trainer import launch, runs_in_process


def pretrain(config: RunConfig, output_dir: str | Path, resume: bool = False, checkpoint_key: str | None = None) -> Path:
    """Pretrain on `data.beir`'s corpus into `output_dir`; returns the exported encoder folder.
    With `checkpoint_key`, each checkpoint is also uploaded to the store under that key."""
    output_dir = Path(output_dir)
    if runs_in_process(os.environ):
        return run_pretrain_worker(config, output_dir, resume, checkpoint_key)
    return launch(config, output_dir, resume, checkpoint_key, pretrain=True)


def mask_tokens(
    input_ids: torch.Tensor, special: torch.Tensor, rate: float, mask_id: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask round(rate x n) of each row's n maskable tokens (`special` False), at least one.

    Returns (masked ids, labels): labels hold the original id where masked and -100 elsewhere.
    """
    scores = torch.rand(input_ids.shape, generator=generator)
    scores[special] = 2.0  # never picked
    maskable = (~special).sum(dim=1)
    counts = torch.clamp(torch.round(maskable.double() * rate).long(), min=1).minimum(maskable)
    ranks = scores.argsort(dim=1).argsort(dim=1)
    chosen = ranks < counts.unsqueeze(1)
    masked = input_ids.masked_fill(chosen, mask_id)
    labels = input_ids.masked_fill(~chosen, -100)
    return masked, labels


def _mlm_head(mlm: torch.nn.Module) -> torch.nn.Module:
    for name in ("cls", "lm_head"):  # BERT-family, RoBERTa-family masked-LM heads
        if hasattr(mlm, name):
            return getattr(mlm, name)
    raise TrainError(f"pretrain: {type(mlm).__name__} has no masked-LM head (cls / lm_head) to decode with")


class RetroMAE(torch.nn.Module):
    """Encoder with an MLM head + a one-layer decoder; `forward` returns (loss, encoder, decoder)."""

    def __init__(self, mlm: torch.nn.Module, pooling: str):
        super().__init__()
        self.model = mlm  # named like Encoder.model, so the engine's options apply to it
        self.pooling = pooling
        cfg = mlm.config
        self.decoder = torch.nn.TransformerEncoderLayer(
            cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, dropout=cfg.hidden_dropout_prob,
            activation="gelu", batch_first=True, norm_first=False, layer_norm_eps=cfg.layer_norm_eps,
        )
        _mlm_head(mlm)  # fail early if there is none

    def forward(self, encoder_ids, encoder_labels, decoder_ids, decoder_labels, attention_mask):
        out = self.model(input_ids=encoder_ids, attention_mask=attention_mask, labels=encoder_labels,
                         output_hidden_states=True)
        sentence = pool(out.hidden_states[-1], attention_mask, self.pooling)
        embedded = self.model.base_model.embeddings(input_ids=decoder_ids)
        decoder_in = torch.cat([sentence.unsqueeze(1), embedded[:, 1:]], dim=1)
        hidden = self.decoder(decoder_in, src_key_padding_mask=attention_mask == 0)
        logits = _mlm_head(self.model)(hidden)
        decoder_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), decoder_labels.flatten())
        return out.loss + decoder_loss, out.loss.detach(), decoder_loss.detach()


def corpus_texts(config: RunConfig) -> list[str]:
    """The passages pretraining reads: `data.beir`'s corpus, the first `pretrain.num_passages`."""
    if not config.data.beir:
        raise TrainError("data.beir: pretraining reads the corpus of a BEIR folder")
    texts = []
    for passage in iter_corpus(config.data.beir, allow_empty=config.data.allow_empty_passages):
        if config.pretrain.num_passages is not None and len(texts) >= config.pretrain.num_passages:
            break
        texts.append(passage.full_text)
    return texts


def epoch_order(count: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The passages of each global batch of `epoch`: a seeded shuffle cut into full batches."""
    order = list(range(count))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return [order[i : i + batch_size] for i in range(0, count - batch_size + 1, batch_size)]


def pretrain_identity(config: RunConfig, texts: list[str], world_size: int, total_steps: int) -> dict:
    """What a pretraining checkpoint belongs to (its plan.json): a resume with another plan is refused."""
    p = config.pretrain
    digest = hashlib.sha256()
    for text in texts:
        digest.update(hashlib.sha256(text.encode()).digest())
    return {"pretrain.seed": p.seed, "pretrain.batch_size": p.batch_size, "pretrain.max_length": p.max_length,
            "world size": world_size, "total steps": total_steps, "passages sha256": digest.hexdigest()}


def step_masks(tokenizer, texts: list[str], p: PretrainConfig, seed: int) -> dict[str, torch.Tensor]:
    """Tokenize a rank's passages and draw both masks from a generator seeded by `seed`."""
    batch = tokenizer([clip_text(t, p.max_length) for t in texts], padding=True, truncation=True, max_length=p.max_length,
                      return_tensors="pt", return_special_tokens_mask=True)
    special = batch["special_tokens_mask"].bool() | (batch["attention_mask"] == 0)
    generator = torch.Generator().manual_seed(seed)
    enc_ids, enc_labels = mask_tokens(batch["input_ids"], special, p.encoder_mask_rate, tokenizer.mask_token_id, generator)
    dec_ids, dec_labels = mask_tokens(batch["input_ids"], special, p.decoder_mask_rate, tokenizer.mask_token_id, generator)
    return {"encoder_ids": enc_ids, "encoder_labels": enc_labels, "decoder_ids": dec_ids,
            "decoder_labels": dec_labels, "attention_mask": batch["attention_mask"]}


def run_pretrain_worker(config: RunConfig, output_dir: Path, resume: bool, checkpoint_key: str | None = None) -> Path:
    """The per-rank pretraining loop (inside torchrun); checkpoints also go to the store at `checkpoint_key`."""
    import torch.distributed as dist
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from peg.train.engine import EngineSettings, build_engine

    p = config.pretrain
    rank, world_size, ckpt_dir = start_rank(output_dir)

    texts = corpus_texts(config)
    if p.batch_size % world_size or len(texts) < p.batch_size:
        raise BatchError(f"pretrain.batch_size ({p.batch_size}) must divide across {world_size} ranks and "
                         f"not exceed the {len(texts)} passages")
    total_steps = p.max_steps or p.epochs * (len(texts) // p.batch_size)
    identity = pretrain_identity(config, texts, world_size, total_steps)
    if resume:
        check_resume(ckpt_dir, identity)
    seed_all(p.seed)
    path = resolve_model_path(config.model.name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.mask_token_id is None:
        raise TrainError(f"pretrain: the tokenizer of {config.model.name_or_path} has no mask token")
    mlm = AutoModelForMaskedLM.from_pretrained(path)
    module = RetroMAE(mlm, config.model.pooling)
    engine = build_engine(module, EngineSettings.for_pretraining(config), world_size, total_steps)

    step, epoch, index = restore(engine, ckpt_dir, rank, p.seed, resume, "pretrain")
    metrics = MetricsLog(output_dir, step if resume else None) if rank == 0 else None

    engine.train()
    per_rank = p.batch_size // world_size
    batches = epoch_order(len(texts), p.batch_size, p.seed, epoch)
    with progress_bar(total_steps, "pretrain", enabled=rank == 0, unit="step") as advance:
        advance(step)
        while step < total_steps:
            if index >= len(batches):
                epoch, index = epoch + 1, 0
                batches = epoch_order(len(texts), p.batch_size, p.seed, epoch)
            indices = batches[index]
            mine = [texts[i] for i in indices[rank * per_rank : (rank + 1) * per_rank]]
            inputs = step_masks(tokenizer, mine, p, seed=p.seed * 1_000_003 + step * 1009 + rank)
            lr = engine.get_lr()[0]
            loss, enc_loss, dec_loss = engine(**{k: v.to(engine.device) for k, v in inputs.items()})
            engine.backward(loss)
            engine.step()
            losses = torch.stack([loss.detach(), enc_loss, dec_loss]).float()
            dist.all_reduce(losses)
            step, index = step + 1, index + 1
            if metrics is not None and (step % config.train.log_every == 0 or step == total_steps):
                total, enc, dec = (losses / world_size).tolist()
                metrics.log({"step": step, "loss": total, "encoder_mlm": enc, "decoder_mlm": dec, "lr": lr})
            if p.checkpoint_every and step % p.checkpoint_every == 0 and step < total_steps:
                keep = config.train.keep_checkpoints
                tag = save_checkpoint(engine, ckpt_dir, step, epoch, index, rank, keep, identity)
                if checkpoint_key:
                    upload_checkpoint(open_store(config.store), checkpoint_key, ckpt_dir, tag, keep)
            advance(1)

    if metrics is not None:
        metrics.close()
        plot_metrics(metrics.path, output_dir / "training.png")
    encoder = Encoder(config.model, model=mlm.base_model, tokenizer=tokenizer)
    model_dir = export_model(engine, encoder, output_dir / "model", rank, matryoshka_dims=[])  # no Matryoshka in pretraining
    shutdown(engine)
    return model_dir
