"""The stage graph, declared once: prepare -> [synth] -> encode -> mine -> [judge] -> [score]
-> [pretrain] -> train -> [eval] -> export -> report.

Each stage names the config sections it reads (its hash), the stages it needs, and a `run`
function that reads inputs from the store, writes outputs under `<run name>/<stage>/` and
returns any extra output keys it made elsewhere. Heavy imports happen inside `run`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from peg.config import BEIR_PREFIX, STAGE_SECTIONS, RunConfig
from peg.pipeline.context import DATA, StageContext, primary_node, stored_train_file
from peg.progress import progress_bar
from peg.store.keys import EMBEDDING_CACHE


@dataclass(frozen=True)
class Stage:
    """A stage: what it needs, how it runs, when it is enabled, and where else it writes.

    Its config sections are `STAGE_SECTIONS[name]` (peg/config.py), the declaration the stage's
    own shard-reuse hash uses too. `writes` names stages whose prefixes it may add to besides its
    own; `shared` names store-wide prefixes it may add to (`EMBEDDING_CACHE`, which every run in
    the store shares).
    """

    name: str
    needs: tuple[str, ...]
    run: Callable[[StageContext], list[str]]
    enabled: Callable[[RunConfig], bool] = field(default=lambda config: True)
    writes: tuple[str, ...] = ()
    shared: tuple[str, ...] = ()

    @property
    def sections(self) -> tuple[str, ...]:
        return STAGE_SECTIONS[self.name]


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
    return []


def _synth(ctx: StageContext) -> list[str]:
    from peg.llm.synth import run_synth

    run_synth(ctx.config, ctx.store)
    return []


def _encode(ctx: StageContext) -> list[str]:
    from peg.mine.stage import run_encode

    corpus, queries = run_encode(ctx.config, ctx.store)
    return [key for folder in (corpus.key, queries.key) for key in ctx.store.list(folder)]


def _mine(ctx: StageContext) -> list[str]:
    from peg.mine.stage import run_mine

    run_mine(ctx.config, ctx.store)
    return []


def _judge(ctx: StageContext) -> list[str]:
    from peg.llm.judge import run_judge

    run_judge(ctx.config, ctx.store)
    return []


def _score(ctx: StageContext) -> list[str]:
    from peg.llm.teacher import run_score

    run_score(ctx.config, ctx.store)
    return []


def training_inputs(ctx: StageContext) -> list[str]:
    """Store keys of the training JSONL: the last of mine/judge/score, plus the synthetic queries
    when mining did not already turn them into training data (`data.train_queries: human`)."""
    config = ctx.config
    last = "score" if config.score.enabled else "judge" if config.judge.enabled else "mine"
    keys = [ctx.key(last, "train.jsonl")]
    if config.synth.enabled and config.data.train_queries == "human":
        keys.append(ctx.key("synth", "train.jsonl"))
    return keys


def _pretrain(ctx: StageContext) -> list[str]:
    """Masked auto-encoding on the corpus; checkpoints go to the store and resume like `train`'s."""
    from peg.train.pretrain import pretrain

    output = ctx.work_dir() / "output"
    return _run_with_store_checkpoints(
        ctx, output, lambda resume, key: pretrain(ctx.config, output, resume=resume, checkpoint_key=key)
    )


def _run_with_store_checkpoints(ctx: StageContext, output: Path, run: Callable[[bool, str], Path]) -> list[str]:
    """Run a training loop, `run(resume, checkpoint key)`, whose checkpoints go to the store as each
    one completes and are restored from it (a rescheduled pod resumes exactly where it stopped);
    then put the model folder and metrics.jsonl / training.png under this stage (node 0 only)."""
    from peg.train.checkpoints import restore_checkpoint

    checkpoints = ctx.output_key("checkpoints")
    single_node = os.environ.get("PET_NNODES", "1") == "1"
    resume = restore_checkpoint(ctx.store, checkpoints, output / "checkpoints", trust_local=single_node)
    model_dir = run(resume, checkpoints)
    if not primary_node():
        return []
    keys = ctx.put_dir("model", model_dir)
    for name in ("metrics.jsonl", "training.png", "best.json"):
        if (output / name).is_file():
            key = ctx.output_key(name)
            ctx.store.put_file(key, output / name, producer=ctx.stage, config_hash=ctx.stage_hash)
            keys.append(key)
    ctx.store.delete(checkpoints)  # the model is stored: the checkpoints have done their job
    return keys


def _train(ctx: StageContext) -> list[str]:
    """Train on the upstream JSONL and the user's own `data.train_files` (kept, after the pipeline's),
    from the pretrained encoder when `pretrain` ran."""
    from peg.train import train

    work = ctx.work_dir()
    inputs = work / "inputs"
    config = ctx.config.model_copy(deep=True)
    if config.pretrain.enabled:
        config.model.name_or_path = str(ctx.materialise_dir("pretrain", "model", work / "pretrained"))
    fetched = [str(ctx.store.materialise(k, inputs)) for k in training_inputs(ctx)]
    config.data.train_files = [*fetched, *ctx.config.data.train_files]
    output = work / "output"
    return _run_with_store_checkpoints(
        ctx, output, lambda resume, key: train(config, output, resume=resume, checkpoint_key=key)
    )


def _eval(ctx: StageContext) -> list[str]:
    from peg.pipeline.evaluate import evaluate_base_and_finetuned

    return evaluate_base_and_finetuned(ctx)


def _export(ctx: StageContext) -> list[str]:
    from peg.pipeline.evaluate import export_model

    return export_model(ctx)


def _report(ctx: StageContext) -> list[str]:
    from peg.pipeline.report import write_report

    return write_report(ctx)


STAGES: tuple[Stage, ...] = (
    Stage("prepare", (), _prepare),
    Stage("synth", ("prepare",), _synth, lambda c: c.synth.enabled, shared=(EMBEDDING_CACHE,)),
    Stage("encode", ("prepare", "synth"), _encode, shared=(EMBEDDING_CACHE,)),
    Stage("mine", ("encode",), _mine, shared=(EMBEDDING_CACHE,)),
    Stage("judge", ("mine",), _judge, lambda c: c.judge.enabled),
    Stage("score", ("mine", "judge"), _score, lambda c: c.score.enabled),
    Stage("pretrain", ("prepare",), _pretrain, lambda c: c.pretrain.enabled),
    Stage("train", ("mine", "judge", "score", "synth", "pretrain"), _train),
    Stage("eval", ("train",), _eval, lambda c: c.eval.enabled, shared=(EMBEDDING_CACHE,)),
    Stage("export", ("train", "eval"), _export),
    Stage("report", ("mine", "train", "eval"), _report),
)


def enabled_stages(config: RunConfig) -> list[Stage]:
    return [s for s in STAGES if s.enabled(config)]
