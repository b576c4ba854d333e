"""The stage graph, declared once: prepare -> [synth] -> encode -> mine -> [judge] -> [score]
-> train -> eval -> export -> report.

Each stage names the config sections it reads (its hash), the stages it needs, and a `run`
function that reads inputs from the store, writes outputs under `<run name>/<stage>/` and
returns any extra output keys it made elsewhere. Heavy imports happen inside `run`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from peg.config import BEIR_PREFIX, RunConfig
from peg.store import ArtifactStore


@dataclass
class StageContext:
    config: RunConfig
    config_path: Path
    store: ArtifactStore
    stage_hash: str

    def key(self, stage: str, name: str) -> str:
        return f"{self.config.name}/{stage}/{name}"

    def work_dir(self, stage: str) -> Path:
        """A local scratch directory kept across reruns of the same stage config (train checkpoints)."""
        root = Path(os.environ.get("PEG_WORK_DIR", Path.home() / ".cache" / "peg" / "work"))
        store_id = hashlib.sha256(self.store.describe().encode()).hexdigest()[:8]
        path = root / f"{self.config.name}-{store_id}" / f"{stage}-{self.stage_hash[:16]}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def fetch(self, key: str, dest_dir: Path) -> Path:
        """A local file holding the artifact: the store's own file if local, else a verified copy."""
        return self.store.local_path(key) or self.store.get_file(key, dest_dir / Path(key).name)

    def put_dir(self, stage: str, name: str, directory: Path) -> list[str]:
        """Put every file under `directory` at `<run>/<stage>/<name>/<relative path>`."""
        keys = []
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            key = self.key(stage, f"{name}/{path.relative_to(directory).as_posix()}")
            self.store.put_file(key, path, producer=stage, config_hash=self.stage_hash)
            keys.append(key)
        return keys

    def fetch_dir(self, stage: str, name: str, dest: Path) -> Path:
        """Materialise `<run>/<stage>/<name>/...` as a local directory."""
        prefix = self.key(stage, name)
        for key in self.store.list(prefix):
            target = dest / key[len(prefix) + 1 :]
            target.parent.mkdir(parents=True, exist_ok=True)
            local = self.store.local_path(key)
            if local is not None:
                shutil.copyfile(local, target)
            else:
                self.store.get_file(key, target)
        return dest


@dataclass(frozen=True)
class Stage:
    name: str
    sections: tuple[str, ...]
    needs: tuple[str, ...]
    run: Callable[[StageContext], list[str]]
    enabled: Callable[[RunConfig], bool] = field(default=lambda config: True)


def _prepare(ctx: StageContext) -> list[str]:
    """Validate the BEIR data (train and eval splits; `beir:NAME` fetched first) and record its counts."""
    from peg.data import BeirDataset

    config = ctx.config
    if not config.data.beir:
        raise ValueError("data.beir: the pipeline needs a BEIR folder")
    summary = {}
    if config.data.beir.startswith(BEIR_PREFIX):
        from peg.data.fetch import archive

        spec = archive(config.data.beir.removeprefix(BEIR_PREFIX))
        summary["source"] = {"dataset": config.data.beir, "licence": spec.licence, "homepage": spec.homepage}
        print(f"{config.data.beir}: licence {spec.licence}; see {spec.homepage}", flush=True)
    for split in dict.fromkeys([config.data.train_split, config.data.eval_split]):
        data = BeirDataset.load(config.data.beir, split, allow_empty=config.data.allow_empty_passages)
        summary[split] = {"queries": len(data.queries), "qrels": sum(len(d) for d in data.qrels.values())}
        summary["passages"] = len(data.corpus)
    ctx.store.put_bytes(ctx.key("prepare", "data.json"), json.dumps(summary, indent=2).encode(), "prepare", ctx.stage_hash)
    return []


def _synth(ctx: StageContext) -> list[str]:
    from peg.llm.synth import run_synth

    run_synth(ctx.config, ctx.store)
    return []


def _encode(ctx: StageContext) -> list[str]:
    from peg.runtime import ray_session
    from peg.mine.stage import run_encode

    with ray_session():
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


def training_inputs(config: RunConfig) -> list[str]:
    """Store keys of the training JSONL: the last of mine/judge/score, plus synthetic queries."""
    last = "score" if config.score.enabled else "judge" if config.judge.enabled else "mine"
    keys = [f"{config.name}/{last}/train.jsonl"]
    if config.synth.enabled:
        keys.append(f"{config.name}/synth/train.jsonl")
    return keys


def _train(ctx: StageContext) -> list[str]:
    """Train on the upstream JSONL; checkpoints in the work dir make a killed run resume."""
    from peg.train import train

    work = ctx.work_dir("train")
    inputs = work / "inputs"
    inputs.mkdir(exist_ok=True)
    config = ctx.config.model_copy(deep=True)
    config.data.train_files = [str(ctx.fetch(k, inputs)) for k in training_inputs(ctx.config)]
    output = work / "output"
    resume = (output / "checkpoints" / "latest").exists()
    model_dir = train(config, output, resume=resume)
    keys = ctx.put_dir("train", "model", model_dir)
    for name in ("metrics.jsonl", "training.png"):
        if (output / name).is_file():
            key = ctx.key("train", name)
            ctx.store.put_file(key, output / name, producer="train", config_hash=ctx.stage_hash)
            keys.append(key)
    return keys


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
    Stage("prepare", ("data",), (), _prepare),
    Stage("synth", ("model", "data", "synth", "score"), ("prepare",), _synth, lambda c: c.synth.enabled),
    Stage("encode", ("model", "data", "encode"), ("prepare",), _encode),
    Stage("mine", ("mining",), ("encode",), _mine),
    Stage("judge", ("judge",), ("mine",), _judge, lambda c: c.judge.enabled),
    Stage("score", ("score",), ("mine", "judge"), _score, lambda c: c.score.enabled),
    Stage("train", ("loss", "batch", "train"), ("mine", "judge", "score", "synth"), _train),
    Stage("eval", ("eval",), ("train",), _eval),
    Stage("export", (), ("train", "eval"), _export),
    Stage("report", (), ("mine", "train", "eval"), _report),
)


def enabled_stages(config: RunConfig) -> list[Stage]:
    return [s for s in STAGES if s.enabled(config)]
