"""Fault injection on real runs (real processes, torchrun, Ray, real S3 on 127.0.0.1).

One run per store kind, reused: the local run is killed with kill -9 of its process group
during training and resumed on a fresh disk from the store alone (a rescheduled pod): completed
stages are skipped untouched, training restarts from the stored checkpoint, and a clean S3 run
must equal it byte for byte. On each store one byte of an output
of every stage is then flipped (and one `_stage.json` damaged): `status` names each bad
artifact, a rerun redoes exactly those stages while a second, concurrent run is refused naming
the holder, and the final outputs equal the run's before the damage. The runs the tests share are
module fixtures (`killed_and_resumed`, `clean_s3`), so any test runs alone (`-k`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from helpers import tiny_run_config, write_config
from s3server import ADMIN
from tiny import flip_stored_byte, make_tiny_beir, make_tiny_model

from peg.config import load_config
from peg.pipeline import pipeline_status
from peg.pipeline.state import read_record
from peg.store import open_store

pytestmark = pytest.mark.slow  # real pipeline runs: torchrun, Ray, the S3 server

MARK = "PEG_FAULT_TEST_MARK"
# The output whose byte is flipped, per stage (a key prefix picks the first key under it; the
# encode stage's outputs are the embedding cache every run in the store shares).
FLIPPED = {
    "prepare": "tiny/prepare/data.json",
    "encode": "encode/passage-",
    "mine": "tiny/mine/train.jsonl",
    "train": "tiny/train/model/model.safetensors",
    "eval": "tiny/eval/summary.json",
    "export": "tiny/export/model/model.safetensors",
}
DAMAGED_RECORD = "report"  # its `_stage.json` gets a flipped byte


def peg(*args, env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "peg", *args], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run_to_end(config: Path, env) -> str:
    process = peg("pipeline", "run", str(config), env=env)
    output, _ = process.communicate(timeout=1200)
    assert process.returncode == 0, output
    return output


def marked_processes(mark: str) -> list[str]:
    """Live processes whose environment carries `mark` (every descendant of a test run does)."""
    found = []
    needle = f"{MARK}={mark}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                state = next((line for line in (proc / "status").read_text().splitlines() if line.startswith("State")), "")
                if "zombie" not in state:
                    command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                    found.append(f"{proc.name}: {command[:120]}")
        except OSError:
            continue
    return found


def assert_quiet(output: str) -> None:
    """The console shows peg's lines, bars and results; Ray, torch, DeepSpeed, torchrun go to the log."""
    noise = [line for line in output.splitlines()
             if re.search(r"\bINFO\b|\bWARNING\b|Traceback|OMP_NUM_THREADS|core_worker|Loading weights|deepspeed", line)]
    assert not noise, noise[:5]
    assert [line.split()[1] for line in output.splitlines() if line.startswith("[run]")] == [
        "train", "eval", "export", "report"]
    assert re.search(r"nDCG@10 on test: base \d\.\d{4} -> fine-tuned \d\.\d{4}", output)
    log = Path(re.search(r"full log: (\S+)", output).group(1).rstrip(";")).read_text()
    assert "Loading weights" in log and "resuming from checkpoint" in log  # transformers' and the ranks' output


def manifests(store_root: Path, stages) -> dict[str, str]:
    """The stage records and the manifests of every output they list (sha256, created time)."""
    found = {}
    for stage in stages:
        record = store_root / "tiny" / stage / "_stage.json"
        found[str(record)] = record.read_text()
        for key in json.loads(record.read_text())["outputs"]:
            found[key] = (store_root / f"{key}.manifest.json").read_text()
    return found


def outputs(store_config: Path, dest: Path) -> dict[str, bytes]:
    """The final results as plain verified files: eval summary, metrics and the exported model
    (not the stage records: they hold digests of inputs such as the training log's timings)."""
    store = open_store(load_config(store_config).store)
    found = {}
    for prefix in ("tiny/eval", "tiny/export/model"):
        folder = store.materialise_prefix(prefix, dest / prefix)
        found |= {f"{prefix}/{p.relative_to(folder).as_posix()}": p.read_bytes()
                  for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "_stage.json"}
    return found


@pytest.fixture(scope="module")
def assets(tmp_path_factory, s3_server):
    root = tmp_path_factory.mktemp("faults")
    mark = uuid.uuid4().hex
    credentials = {"AWS_ACCESS_KEY_ID": ADMIN[0], "AWS_SECRET_ACCESS_KEY": ADMIN[1]}
    env = {**os.environ, "PEG_WORK_DIR": str(root / "work"), "DS_ACCELERATOR": "cpu",
           "TOKENIZERS_PARALLELISM": "false", MARK: mark, **credentials}
    data, model = make_tiny_beir(root / "beir"), make_tiny_model(root / "model")
    bucket = f"faults-{mark[:8]}"
    s3_server.client().make_bucket(bucket)
    s3 = write_config(root / "s3.yaml", tiny_run_config(data, model, {"uri": f"s3://{bucket}/runs", "endpoint": s3_server.endpoint,
                                          "secure": False}))
    local = write_config(root / "local.yaml", tiny_run_config(data, model, {"uri": str(root / "store")}))
    with pytest.MonkeyPatch.context() as patch:  # this process reads the S3 store too
        for name, value in credentials.items():
            patch.setenv(name, value)
        yield root, env, mark, s3, local


@dataclass(frozen=True)
class KilledRun:
    """What a local run killed (kill -9 of its process group) while training and rerun showed."""

    survivors: list[str]  # processes of the killed run still alive
    states: dict[str, str]  # `pipeline status` between the kill and the rerun
    output: str  # the rerun's console
    log: str  # the rerun's log file
    manifests_before: dict[str, str]  # records and manifests of the stages before train, after the kill
    manifests_after: dict[str, str]  # the same after the rerun
    checkpoints_left: bool  # the stored checkpoints still exist after the rerun
    report: str  # the rerun's report.html
    outputs: dict[str, bytes]  # the final results (`outputs`)


@pytest.fixture(scope="module")
def killed_and_resumed(assets) -> KilledRun:
    """The local run, killed once a checkpoint reached the store and rerun on a fresh disk."""
    root, env, mark, _, local = assets
    process = peg("pipeline", "run", str(local), env=env)
    deadline = time.monotonic() + 900
    while not (root / "store" / "tiny" / "train" / "checkpoints" / "latest").is_file():  # a checkpoint reached the store
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert any("peg.train.worker" in p for p in marked_processes(mark))  # training is running
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    survivors = marked_processes(mark)
    for _ in range(50):  # the kernel delivers the parent-death signals at once; give exits a moment
        if not survivors:
            break
        time.sleep(0.1)
        survivors = marked_processes(mark)
    for run_dir in (root / "work").glob("tiny-*"):  # a rescheduled pod: no local disk survives, only the store
        shutil.rmtree(run_dir)
    store_root = root / "store"
    before = manifests(store_root, ["prepare", "encode", "mine"])
    states = {s.name: s.state for s in pipeline_status(load_config(local), open_store(load_config(local).store))}
    output = run_to_end(local, env)  # the dead run's lease (same host, pid gone) is taken over at once
    return KilledRun(
        survivors=survivors, states=states, output=output,
        log=Path(re.search(r"full log: (\S+)", output).group(1).rstrip(";")).read_text(),
        manifests_before=before, manifests_after=manifests(store_root, ["prepare", "encode", "mine"]),
        checkpoints_left=(store_root / "tiny" / "train" / "checkpoints").exists(),
        report=(store_root / "tiny" / "report" / "report.html").read_text(),
        outputs=outputs(local, root / "resumed"),
    )


@pytest.fixture(scope="module")
def clean_s3(assets) -> dict[str, bytes]:
    """The final results of an uninterrupted run on the S3 store."""
    root, env, _, s3, _ = assets
    run_to_end(s3, env)
    return outputs(s3, root / "clean-s3")


def test_kill_9_during_train_leaves_no_process_and_the_run_resumes(killed_and_resumed):
    run = killed_and_resumed
    assert run.survivors == []
    assert run.states == {"prepare": "complete", "encode": "complete", "mine": "complete", "train": "partial",
                          "eval": "pending", "export": "pending", "report": "pending"}
    assert_quiet(run.output)
    for stage in ("prepare", "encode", "mine"):
        assert f"[skip] {stage}: complete" in run.output
    assert "resumed from checkpoint" in run.log  # restored from the store's checkpoints; the ranks log to the file
    assert run.manifests_after == run.manifests_before  # untouched
    assert not run.checkpoints_left  # dropped once the model is stored
    assert run.report.count("<img") >= 2


def heal(assets, kind: str) -> dict[str, bytes]:
    """Flip a byte in an output of every stage and damage one record; check status, a refused
    concurrent run, and the healing run; return the final outputs."""
    root, env, mark, s3, local = assets
    config_path = local if kind == "local" else s3
    config = load_config(config_path)
    store = open_store(config.store)
    assert {s.state for s in pipeline_status(config, store)} == {"complete"}
    flipped = {}
    for stage, pattern in FLIPPED.items():  # an output the stage's record lists (eval adds to encode/ too)
        recorded = sorted(read_record(store, f"tiny/{stage}").outputs)
        key = next(k for k in recorded if k.startswith(pattern))
        flip_stored_byte(store, key)
        flipped[stage] = key
    flip_stored_byte(store, f"tiny/{DAMAGED_RECORD}/_stage.json")

    status = {s.name: s for s in pipeline_status(config, store)}
    for stage, key in flipped.items():
        assert status[stage].state == "invalid" and key in status[stage].detail, status[stage]
    assert status[DAMAGED_RECORD].state == "partial" and "damaged record" in status[DAMAGED_RECORD].detail

    first = peg("pipeline", "run", str(config_path), env=env)
    deadline = time.monotonic() + 300
    while store.read_object("tiny/_lease.json") is None:
        assert first.poll() is None, first.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.1)
    second = peg("pipeline", "run", str(config_path), env=env)
    refused, _ = second.communicate(timeout=300)
    assert second.returncode == 2, refused
    assert f"in use by 'peg pipeline run {config_path}' (pid {first.pid} on" in " ".join(refused.split())
    output, _ = first.communicate(timeout=1800)
    assert first.returncode == 0, output

    for stage, key in flipped.items():  # redone for its bad output, or as stale if its inputs came out different
        assert f"[redo] {stage}: {key}" in output or f"[run]  {stage} (stale: outputs of" in output, stage
    assert f"[run]  {DAMAGED_RECORD} (partial: damaged record" in output
    assert {s.state for s in pipeline_status(config, store)} == {"complete"}
    for key in store.list("tiny"):
        store.verify(key)
    assert marked_processes(mark) == []
    return outputs(config_path, root / f"healed-{kind}")


def test_a_clean_s3_run_equals_the_killed_and_resumed_local_run(clean_s3, killed_and_resumed):
    assert clean_s3 == killed_and_resumed.outputs


def test_a_flipped_byte_in_every_stage_is_found_and_healed_local(assets, killed_and_resumed, clean_s3):
    healed = heal(assets, "local")  # the local store is complete once the killed run was resumed
    assert healed.keys() == clean_s3.keys()
    assert healed == clean_s3  # the healed run retrains from scratch: equal to a clean run


def test_a_flipped_byte_in_every_stage_is_found_and_healed_s3(assets, clean_s3):
    healed = heal(assets, "s3")
    assert healed.keys() == clean_s3.keys()
    assert healed == clean_s3


def latest_checkpoint(store, key: str) -> str | None:
    """The step `<key>/latest` names, or None while there is none (not written yet, or caught
    between the trainer's replacing it and its next write)."""
    from peg.store import StoreError

    try:
        return store.read_text(f"{key}/latest")
    except StoreError:
        return None


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_a_corrupt_stored_checkpoint_falls_back_to_the_one_before(assets, clean_s3, kind):
    """Killed after two checkpoints reached the store, the newest one gets a flipped byte: the
    rerun on a fresh disk resumes from the one before and stores what a clean run stores."""
    root, env, mark, s3, local = assets
    config = yaml.safe_load((local if kind == "local" else s3).read_text())
    config["store"]["uri"] = str(root / "store-ckpt") if kind == "local" else config["store"]["uri"] + "-ckpt"
    config_path = root / f"ckpt-{kind}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    store = open_store(load_config(config_path).store)
    env = {**env, "PEG_WORK_DIR": str(root / f"work-ckpt-{kind}")}
    key = "tiny/train/checkpoints"
    process = peg("pipeline", "run", str(config_path), env=env)
    deadline = time.monotonic() + 900
    while latest_checkpoint(store, key) in (None, "step00000002"):
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    newest = latest_checkpoint(store, key)
    assert newest is not None
    flip_stored_byte(store, f"{key}/{newest}/mp_rank_00_model_states.pt")
    shutil.rmtree(root / f"work-ckpt-{kind}")  # a fresh disk: the checkpoint can only come from the store

    output = run_to_end(config_path, env)
    log = Path(re.search(r"full log: (\S+)", output).group(1).rstrip(";")).read_text()
    assert f"checkpoint {key}/{newest} does not verify" in log
    assert re.search(r"resumed from checkpoint step\d{8}", log)
    assert outputs(config_path, root / f"ckpt-{kind}-out") == clean_s3
