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
from peg.progress import progress_bar
from peg.store import ArtifactStore


@dataclass
class StageContext:
    config: RunConfig
    config_path: Path
    store: ArtifactStore
    stage_hash: str

    def key(self, stage: str, name: str) -> str:
        return f"{self.config.name}/{stage}/{name}"

    def run_dir(self) -> Path:
        """This run's local scratch root ($PEG_WORK_DIR, default ~/.cache/peg/work), per store."""
        root = Path(os.environ.get("PEG_WORK_DIR", Path.home() / ".cache" / "peg" / "work"))
        store_id = hashlib.sha256(self.store.describe().encode()).hexdigest()[:8]
        return root / f"{self.config.name}-{store_id}"

    def work_dir(self, stage: str) -> Path:
        """A local scratch directory kept across reruns of the same stage config (train inputs, checkpoints)."""
        path = self.run_dir() / f"{stage}-{self.stage_hash[:16]}"
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

    def data_config(self) -> RunConfig:
        """The config with `data.beir` / `data.train_files` pointing at local copies of the data
        `prepare` put in the store: every later stage reads its data only from the store."""
        config = self.config.model_copy(deep=True)
        local = self.fetch_dir("prepare", DATA, self.run_dir() / DATA, verified_once=True)
        if config.data.beir:
            config.data.beir = str(local / "beir")
        config.data.train_files = [str(local / "train_files" / stored_train_file(i, f)) for i, f in enumerate(config.data.train_files)]
        return config

    def fetch_dir(self, stage: str, name: str, dest: Path, verified_once: bool = False) -> Path:
        """Materialise `<run>/<stage>/<name>/...` as a local directory (`verified_once`: skip the
        copy when `dest` already holds exactly these artifacts, by their sha256)."""
        prefix = self.key(stage, name)
        keys = self.store.list(prefix)
        stamp, want = dest / ".peg-fetched.json", ""
        if verified_once:
            want = json.dumps({k: self.store.require_manifest(k).sha256 for k in keys}, sort_keys=True)
            if stamp.is_file() and stamp.read_text() == want:
                return dest
        for key in keys:
            target = dest / key[len(prefix) + 1 :]
            target.parent.mkdir(parents=True, exist_ok=True)
            local = self.store.local_path(key)
            if local is not None:
                shutil.copyfile(local, target)
            else:
                self.store.get_file(key, target)
        if verified_once:
            dest.mkdir(parents=True, exist_ok=True)
            stamp.write_text(want)
        return dest


@dataclass(frozen=True)
class Stage:
    name: str
    sections: tuple[str, ...]
    needs: tuple[str, ...]
    run: Callable[[StageContext], list[str]]
    enabled: Callable[[RunConfig], bool] = field(default=lambda config: True)


DATA = "data"  # <run>/prepare/data/{beir/..., train_files/...}: the run's inputs, in the store


def stored_train_file(index: int, path: str) -> str:
    return f"{index}-{Path(path).name}"


def primary_node() -> bool:
    """False on the other nodes of a multi-node training job (PET_NODE_RANK > 0): they train
    but leave stage records and outputs to node 0."""
    return os.environ.get("PET_NODE_RANK", "0") == "0"


def _prepare(ctx: StageContext) -> list[str]:
    """Validate the BEIR data (train and eval splits; `beir:NAME` fetched first), record its counts
    and put the data (and any data.train_files) into the store, where every later stage reads it."""
    from peg.data.fetch import resolve_beir
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
    splits = list(dict.fromkeys([config.data.train_split, config.data.eval_split]))
    for split in splits:
        data = BeirDataset.load(config.data.beir, split)
        summary[split] = {"queries": len(data.queries), "qrels": sum(len(d) for d in data.qrels.values())}
        summary["passages"] = len(data.corpus)
    beir = resolve_beir(config.data.beir)
    files = {f"beir/{name}": beir / name for name in ("corpus.jsonl", "queries.jsonl", *(f"qrels/{s}.tsv" for s in splits))}
    for i, path in enumerate(config.data.train_files):
        files[f"train_files/{stored_train_file(i, path)}"] = Path(path)
    with progress_bar(len(files), "upload data", unit="file") as advance:
        for name, path in files.items():
            ctx.store.put_file(ctx.key("prepare", f"{DATA}/{name}"), path, producer="prepare", config_hash=ctx.stage_hash)
            advance(1)
    ctx.store.put_bytes(ctx.key("prepare", "data.json"), json.dumps(summary, indent=2).encode(), "prepare", ctx.stage_hash)
    return []


def _synth(ctx: StageContext) -> list[str]:
    from peg.llm.synth import run_synth

    run_synth(ctx.config, ctx.store)
    return []


def _encode(ctx: StageContext) -> list[str]:
    from peg.mine.session import ray_session
    from peg.mine.stage import run_encode

    with ray_session():
        run_encode(ctx.config, ctx.store)
    return []


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
    """Train on the upstream JSONL (+ data.train_files). Checkpoints go to the store as each one
    completes and are restored from it, so a rescheduled pod resumes exactly where it stopped."""
    from peg.train import train
    from peg.train.checkpoints import restore_checkpoint

    work = ctx.work_dir("train")
    inputs = work / "inputs"
    inputs.mkdir(exist_ok=True)
    config = ctx.config.model_copy(deep=True)
    upstream = [str(ctx.fetch(k, inputs)) for k in training_inputs(ctx.config)]
    config.data.train_files = upstream + list(ctx.config.data.train_files)
    output = work / "output"
    checkpoints = ctx.key("train", "checkpoints")
    resume = restore_checkpoint(ctx.store, checkpoints, output / "checkpoints")
    model_dir = train(config, output, resume=resume, checkpoint_key=checkpoints)
    if not primary_node():
        return []
    keys = ctx.put_dir("train", "model", model_dir)
    for name in ("metrics.jsonl", "training.png"):
        if (output / name).is_file():
            key = ctx.key("train", name)
            ctx.store.put_file(key, output / name, producer="train", config_hash=ctx.stage_hash)
            keys.append(key)
    ctx.store.delete(checkpoints)  # the model is stored: the checkpoints have done their job
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
