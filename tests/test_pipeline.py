"""The pipeline: a run killed during training resumes, skips completed stages untouched and
ends with the same result as a clean run; a changed stage config invalidates downstream only."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tiny import make_tiny_beir, make_tiny_model

from peg.config import load_config
from peg.pipeline import pipeline_status, stage_hashes
from peg.store import open_store


def write_config(root: Path, data: Path, model: Path, store: str, **overrides) -> Path:
    config = {
        "name": "tiny",
        "data": {"beir": str(data)},
        "model": {"name_or_path": str(model), "query_max_length": 32, "passage_max_length": 48},
        "loss": {"kind": "infonce", "temperature": 0.05, "progressive": {"enabled": True}},
        "batch": {"queries_per_step": 4, "hard_negatives": 1, "chunk_size": 3},
        "train": {"epochs": 3, "learning_rate": 1e-3, "nproc_per_node": 2, "zero_stage": 2, "checkpoint_every": 2},
        "encode": {"batch_size": 16, "num_actors": 1, "actor_cpus": 0.5},
        "mining": {"num_shards": 2, "top_k": 20, "negatives_per_query": 1, "selection": "rank_window", "rank_window": [0, 20]},
        "store": {"uri": store},
    }
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = config
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path = root / f"run-{Path(store).name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def peg(*args, env, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "peg", *args], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def run_to_end(config: Path, env) -> str:
    process = peg("pipeline", "run", str(config), env=env)
    output, _ = process.communicate(timeout=900)
    assert process.returncode == 0, output
    return output


def assert_quiet(output: str) -> None:
    """The console shows peg's lines, bars and results; Ray, torch, DeepSpeed, torchrun go to the log."""
    noise = [line for line in output.splitlines()
             if re.search(r"\bINFO\b|\bWARNING\b|Traceback|OMP_NUM_THREADS|core_worker|Loading weights|deepspeed", line)]
    assert not noise, noise[:5]
    assert [line.split()[1] for line in output.splitlines() if line.startswith("[run]")] == [
        "prepare", "encode", "mine", "train", "eval", "export", "report"]
    assert re.search(r"nDCG@10 on test: base \d\.\d{4} -> fine-tuned \d\.\d{4}", output)
    log = Path(re.search(r"full log: (\S+)", output).group(1)).read_text()
    assert "Started a local Ray instance" in log


def manifests(store_root: Path, stages) -> dict[str, str]:
    """The stage records and the manifests of every output they list (sha256, created time)."""
    found = {}
    for stage in stages:
        record = store_root / "tiny" / stage / "_stage.json"
        found[str(record)] = record.read_text()
        for key in json.loads(record.read_text())["outputs"]:
            found[key] = (store_root / f"{key}.manifest.json").read_text()
    return found


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    env = {**os.environ, "PEG_WORK_DIR": str(root / "work"), "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    return root, make_tiny_beir(root / "beir"), make_tiny_model(root / "model"), env


def test_killed_run_resumes_and_equals_clean_run(assets):
    root, data, model, env = assets
    clean = write_config(root, data, model, str(root / "clean"))
    assert_quiet(run_to_end(clean, env))

    resumed = write_config(root, data, model, str(root / "resumed"))
    process = peg("pipeline", "run", str(resumed), env=env)
    store_root = root / "resumed"
    deadline = time.monotonic() + 600
    while not (store_root / "tiny" / "train" / "checkpoints" / "latest").is_file():  # a checkpoint reached the store
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    work = root / "work"
    for run_dir in work.glob("tiny-*"):  # a rescheduled pod: no local disk survives, only the store
        shutil.rmtree(run_dir)
    before = manifests(store_root, ["prepare", "encode", "mine"])
    assert {s.name: s.state for s in pipeline_status(load_config(resumed), open_store(load_config(resumed).store))} == {
        "prepare": "complete", "encode": "complete", "mine": "complete", "train": "partial",
        "eval": "pending", "export": "pending", "report": "pending",
    }

    output = run_to_end(resumed, env)
    for stage in ("prepare", "encode", "mine"):
        assert f"[skip] {stage}: complete" in output
    assert "[run]  train" in output
    log = Path(re.search(r"full log: (\S+)", output).group(1).rstrip(";")).read_text()
    assert "resumed from checkpoint" in log  # the ranks' own lines go to the log file, not the console
    assert not (store_root / "tiny" / "train" / "checkpoints").exists()  # dropped once the model is stored
    assert (store_root / "tiny" / "prepare" / "data" / "beir" / "corpus.jsonl").is_file()
    assert manifests(store_root, ["prepare", "encode", "mine"]) == before  # untouched

    assert (store_root / "tiny" / "report" / "report.html").read_text().count("<img") >= 2
    summary = lambda root: json.loads((root / "tiny" / "eval" / "summary.json").read_text())  # noqa: E731
    clean_model = sorted((root / "clean" / "tiny" / "export" / "model").rglob("*.safetensors"))
    resumed_model = sorted((store_root / "tiny" / "export" / "model").rglob("*.safetensors"))
    assert clean_model and len(clean_model) == len(resumed_model)
    assert summary(store_root) == summary(root / "clean")
    assert [p.read_bytes() for p in clean_model] == [p.read_bytes() for p in resumed_model]


def test_changed_stage_config_invalidates_it_and_downstream_only(assets):
    root, data, model, _ = assets
    base = load_config(write_config(root, data, model, str(root / "h")))
    changed = load_config(write_config(root, data, model, str(root / "h"), **{"mining.top_k": 30}))
    a, b = stage_hashes(base), stage_hashes(changed)
    assert [s for s in a if a[s] == b[s]] == ["prepare", "encode"]
    eval_only = load_config(write_config(root, data, model, str(root / "h"), **{"eval.k_values": [10, 20]}))
    c = stage_hashes(eval_only)
    assert [s for s in a if a[s] != c[s]] == ["eval", "export", "report"]
