"""The stage graph, declared once: prepare -> [synth] -> encode -> mine -> [judge] -> [score]
-> [pretrain] -> train -> [eval] -> export -> report.

Each `Stage` declares every fact about itself in one place: the config sections it reads (its
hash), the stages it needs, when it is enabled, where it runs (`local`: where the data is;
`ray`: a Ray job; `torchrun`: a training job), the store-wide prefixes it shares, and a `run`
function that reads inputs through its scope, writes outputs under `<run name>/<stage>/` and
returns a `StageDone`. Heavy imports happen inside `run`. Adding a stage is one `Stage(...)` in
`STAGES`; the runner, the hashes, the contracts test and the Kubernetes renderers read it from here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from peg.config import BEIR_PREFIX, RunConfig
from peg.pipeline.context import DATA, StageContext, primary_node, stored_train_file
from peg.progress import progress_bar
from peg.store.keys import EMBEDDING_CACHE

Runs = Literal["local", "ray", "torchrun"]


@dataclass(frozen=True)
class StageDone:
    """What a stage body returns: output keys it made outside its own prefix (the shared embedding
    cache) and the lines a single-stage command (`peg mine CONFIG`) prints."""

    extra_keys: list[str] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Stage:
    """A stage, declared once: what it needs, the config sections it reads (a change reruns it and,
    through its outputs, what follows), where it runs, when it is enabled, and the store-wide
    prefixes it may add to besides its own (`shared`: `EMBEDDING_CACHE`, which every run in the
    store shares)."""

    name: str
    needs: tuple[str, ...]
    run: Callable[[StageContext], StageDone]
    sections: tuple[str, ...]
    runs: Runs = "ray"
    enabled: Callable[[RunConfig], bool] = field(default=lambda config: True)
    shared: tuple[str, ...] = ()


def _prepare(ctx: StageContext) -> list[str]:
    """Validate the BEIR data and training files this run reads (`beir:NAME` fetched first), record its counts and put
    that data (and any data.train_files) into the store, where every later stage reads it: the
    corpus, the train split when training uses human queries, the eval split when eval is on
    (nothing else is read)."""
    from peg.data import BeirDataset, iter_corpus, iter_examples
    from peg.data.fetch import resolve_beir

    config = ctx.config
    if not config.data.beir:
        raise ValueError("data.beir: the pipeline needs a BEIR folder")
    summary = {}
    if config.data.beir.startswith(BEIR_PREFIX):
        from peg.data.fetch import archive

        spec = archive(config.data.beir.removeprefix(BEIR_PREFIX))
        summary["source"] = {"dataset": config.data.beir, "licence": spec.licence, "homepage": spec.homepage}
        print(f"{config.data.beir}: licence {spec.licence}; see {spec.homepage}", flush=True)
    allow_empty = config.data.allow_empty_passages
    summary["passages"] = sum(1 for _ in iter_corpus(config.data.beir, allow_empty=allow_empty))
    splits = [config.data.train_split] if config.data.train_queries != "synthetic" else []
    if config.eval.enabled:
        splits.append(config.data.eval_split)
    if config.data.dev_split is not None:
        splits.append(config.data.dev_split)  # the dev set scored during training (train.eval_every)
    splits = list(dict.fromkeys(splits))
    for split in splits:
        data = BeirDataset.load(config.data.beir, split, allow_empty=allow_empty)
        summary[split] = {"queries": len(data.queries), "qrels": sum(len(d) for d in data.qrels.values())}
    beir = resolve_beir(config.data.beir)
    names = ["corpus.jsonl", *(["queries.jsonl"] if splits else []), *(f"qrels/{s}.tsv" for s in splits)]
    files = {f"beir/{name}": beir / name for name in names}
    for i, path in enumerate(config.data.train_files):
        for _ in iter_examples(path):  # a malformed line or a NaN teacher score stops the run here, not in training
            pass
        files[f"train_files/{stored_train_file(i, path)}"] = Path(path)
    with progress_bar(len(files), "upload data", unit="file") as advance:
        for name, path in files.items():
            ctx.store.put_file(ctx.key("prepare", f"{DATA}/{name}"), path, producer="prepare", config_hash=ctx.stage_hash)
            advance(1)
    ctx.store.put_json(ctx.output_key("data.json"), summary, "prepare", ctx.stage_hash)
    return StageDone()


def _synth(ctx: StageContext) -> StageDone:
    from peg.llm.synth import run_synth

    return StageDone(summary=run_synth(ctx.config, ctx.scope).summary_lines())


def _encode(ctx: StageContext) -> StageDone:
    from peg.mine.stage import run_encode

    result = run_encode(ctx.config, ctx.scope)
    keys = [key for folder in (result.corpus.key, result.queries.key) for key in ctx.store.list(folder)]
    return StageDone(keys, result.summary_lines())


def _mine(ctx: StageContext) -> StageDone:
    from peg.mine.stage import run_mine

    return StageDone(summary=run_mine(ctx.config, ctx.scope).summary_lines())


def _judge(ctx: StageContext) -> StageDone:
    from peg.llm.judge import run_judge

    return StageDone(summary=run_judge(ctx.config, ctx.scope).summary_lines())


def _score(ctx: StageContext) -> StageDone:
    from peg.llm.teacher import run_score

    return StageDone(summary=run_score(ctx.config, ctx.scope).summary_lines())


def training_inputs(ctx: StageContext) -> list[str]:
    """Store keys of the training JSONL: the last of mine/judge/score, plus the synthetic queries
    when mining did not already turn them into training data (`data.train_queries: human`)."""
    config = ctx.config
    last = "score" if config.score.enabled else "judge" if config.judge.enabled else "mine"
    keys = [ctx.key(last, "train.jsonl")]
    if config.synth.enabled and config.data.train_queries == "human":
        keys.append(ctx.key("synth", "train.jsonl"))
    return keys


def _pretrain(ctx: StageContext) -> StageDone:
    """Masked auto-encoding on the corpus; checkpoints go to the store and resume like `train`'s."""
    from peg.train.pretrain import pretrain

    output = ctx.work_dir() / "output"
    return _run_with_store_checkpoints(
        ctx, output, lambda resume, key: pretrain(ctx.config, output, resume=resume, checkpoint_key=key)
    )


def _run_with_store_checkpoints(ctx: StageContext, output: Path, run: Callable[[bool, str], Path]) -> StageDone:
    """Run a training loop, `run(resume, checkpoint key)`, whose checkpoints go to the store as each
    one completes and are restored from it (a rescheduled pod resumes exactly where it stopped);
    then put the model folder and metrics.jsonl / training.png under this stage (node 0 only)."""
    from peg.train.checkpoints import restore_checkpoint

    checkpoints = ctx.output_key("checkpoints")
    single_node = os.environ.get("PET_NNODES", "1") == "1"
    resume = restore_checkpoint(ctx.store, checkpoints, output / "checkpoints", trust_local=single_node)
    model_dir = run(resume, checkpoints)
    if not primary_node():
        return StageDone()
    ctx.put_dir("model", model_dir)
    for name in ("metrics.jsonl", "training.png", "best.json"):
        if (output / name).is_file():
            key = ctx.output_key(name)
            ctx.store.put_file(key, output / name, producer=ctx.stage, config_hash=ctx.stage_hash)
    ctx.store.delete(checkpoints)  # the model is stored: the checkpoints have done their job
    return StageDone(summary=[f"wrote {ctx.output_key('model')}/"])


def _train(ctx: StageContext) -> StageDone:
    """Train on the upstream JSONL and the user's own `data.train_files` (kept, after the pipeline's),
    from the pretrained encoder when `pretrain` ran; the config goes to training unchanged."""
    from peg.train import TrainInputs, train

    work = ctx.work_dir()
    fetched = [str(ctx.store.materialise(k, work / "inputs")) for k in training_inputs(ctx)]
    pretrained = ctx.materialise_dir("pretrain", "model", work / "pretrained") if ctx.config.pretrain.enabled else None
    inputs = TrainInputs((*fetched, *ctx.config.data.train_files), str(pretrained) if pretrained else None)
    output = work / "output"
    return _run_with_store_checkpoints(
        ctx, output, lambda resume, key: train(ctx.config, output, resume=resume, checkpoint_key=key, inputs=inputs)
    )


def _eval(ctx: StageContext) -> StageDone:
    from peg.pipeline.evaluate import evaluate_base_and_finetuned

    return StageDone(evaluate_base_and_finetuned(ctx))


def _export(ctx: StageContext) -> StageDone:
    from peg.pipeline.evaluate import export_model

    return StageDone(export_model(ctx))


def _report(ctx: StageContext) -> StageDone:
    from peg.pipeline.report import write_report

    return StageDone(write_report(ctx))


SAMPLE_EVAL = ("model", "data", "loss", "eval")  # export: sample eval queries, or corpus passages without eval; model card

STAGES: tuple[Stage, ...] = (
    Stage("prepare", (), _prepare, ("data",), runs="local"),
    Stage("synth", ("prepare",), _synth, ("model", "data", "encode", "mining", "synth", "score"),  # encoder + index
          enabled=lambda c: c.synth.enabled, shared=(EMBEDDING_CACHE,)),                           # for the round trip
    Stage("encode", ("prepare", "synth"), _encode, ("model", "data", "encode"), shared=(EMBEDDING_CACHE,)),
    Stage("mine", ("encode",), _mine, ("model", "data", "encode", "mining"), shared=(EMBEDDING_CACHE,)),
    Stage("judge", ("mine",), _judge, ("judge",), enabled=lambda c: c.judge.enabled),  # + its input's digest
    Stage("score", ("mine", "judge"), _score, ("score",), enabled=lambda c: c.score.enabled),  # + its input's digest
    Stage("pretrain", ("prepare",), _pretrain, ("model", "data", "pretrain", "train"), runs="torchrun",
          enabled=lambda c: c.pretrain.enabled),  # the corpus; engine settings from train
    Stage("train", ("mine", "judge", "score", "synth", "pretrain"), _train, ("model", "data", "loss", "batch", "train"),
          runs="torchrun"),
    Stage("eval", ("train",), _eval, ("model", "data", "encode", "eval"), enabled=lambda c: c.eval.enabled,
          shared=(EMBEDDING_CACHE,)),
    Stage("export", ("train", "eval"), _export, SAMPLE_EVAL),
    Stage("report", ("mine", "train", "eval"), _report, ("model", "data", "loss", "batch", "train", "eval")),
)
STAGE_BY_NAME = {s.name: s for s in STAGES}


def enabled_stages(config: RunConfig) -> list[Stage]:
    return [s for s in STAGES if s.enabled(config)]

