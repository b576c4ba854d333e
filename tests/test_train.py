"""Trainer: GradCache under DeepSpeed ZeRO 0-3 on real torchrun/gloo, exact resume after SIGKILL,
bad-input errors, the example configs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from peg.config import ConfigError, RunConfig, load_config, parse_config
from peg.data import DataError
from peg.model.encoder import resolve_model_path
from peg.train import BatchError, BatchPlan, PairFile
from peg.train.batches import Prefetcher
from peg.train.metrics import read_metrics
from peg.train.schedule import warmup_linear_decay
from peg.train.telemetry import device_peak, model_shape, peak_flops, step_flops, throughput
from peg.train.trainer import TrainError, runs_in_process, torchrun_command, training_plan

REPO = Path(__file__).resolve().parents[1]
DIST_SCRIPTS = Path(__file__).parent / "dist_scripts"
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def make_tiny_bert(path: Path, dropout: float) -> str:
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("sentence-transformers/all-MiniLM-L6-v2"))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def write_pairs(path: Path, topic: str, n: int, negatives: int, scores: bool = True) -> str:
    with path.open("w") as f:
        for i in range(n):
            row = {
                "query": f"{topic} question {i} about item {i * 7 % 13}",
                "pos": [f"{topic} answer {i}: item {i * 7 % 13} is described here"],
                "neg": [f"{topic} other text {i}-{j} on item {(i + j + 1) % 13}" for j in range(negatives)],
            }
            if scores:
                row["pos_scores"] = [0.9]
                row["neg_scores"] = [0.1 * j for j in range(negatives)]
            f.write(json.dumps(row) + "\n")
    return str(path)


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.mark.slow
def test_gradcache_matches_one_rank_full_batch_under_every_zero_stage(tmp_path):
    """2 ranks x B/2 through the DeepSpeed engine (uncached and GradCache chunk 3) equal the
    gradient of the loss on the whole batch B in one process, for ZeRO 0, 1, 2, 3."""
    model = make_tiny_bert(tmp_path / "tiny", dropout=0.0)
    out = tmp_path / "gradcache.json"
    script = DIST_SCRIPTS / "train_gradcache.py"
    proc = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
                str(script), model, str(out)], timeout=400)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(out.read_text())
    assert {r["stage"] for r in results} == {0, 1, 2, 3}
    assert {r["chunk"] for r in results} == {None, 3}
    for r in results:
        # the update of SGD(lr=1) equals -grad of the 1-process full-batch loss
        assert r["max_abs_diff"] <= 2e-5 + 1e-5 * r["grad_scale"], r
        assert r["grad_scale"] > 0.1, r  # a real gradient, not zeros
        assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-5), r


def _train_config(tmp_path: Path, model: str, files: list[str], **train) -> Path:
    config = {
        "name": "resume-test",
        "data": {"train_files": files, "block_bytes": 600},
        "model": {"name_or_path": model, "query_max_length": 16, "passage_max_length": 24},
        "loss": {"kind": "infonce", "progressive": {"enabled": True}},
        "batch": {"queries_per_step": 4, "hard_negatives": 2, "chunk_size": 3},
        "train": {"learning_rate": 1e-3, "nproc_per_node": 2, "zero_stage": 3, "warmup_ratio": 0.2,
                  "min_lr_ratio": 0.1, **train},
    }
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))
    return path


@pytest.mark.slow
def test_resume_after_sigkill_continues_exactly(tmp_path):
    """Kill a 2-rank ZeRO-3 GradCache run (dropout on, files streamed in several blocks, batches
    prefetched, chunks grouped by length) with SIGKILL after a checkpoint, resume: every step's
    loss and lr equal the uninterrupted run's; every step logs its throughput."""
    model = make_tiny_bert(tmp_path / "tiny", dropout=0.1)
    files = [write_pairs(tmp_path / "a.jsonl", "alpha", 12, 2), write_pairs(tmp_path / "b.jsonl", "beta", 10, 3)]
    config = _train_config(tmp_path, model, files, max_steps=14, checkpoint_every=3)
    cli = [sys.executable, "-m", "peg", "train", str(config)]

    full = run([*cli, "--output", str(tmp_path / "full")])
    assert full.returncode == 0, full.stderr[-4000:]
    reference = read_metrics(tmp_path / "full" / "metrics.jsonl")
    assert [r["step"] for r in reference] == list(range(1, 15))
    assert (tmp_path / "full" / "training.png").stat().st_size > 1000
    assert list((tmp_path / "full" / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "full" / "model" / "modules.json").is_file()
    assert reference[0]["beta"] == pytest.approx(-0.5) and reference[-1]["beta"] > 0.8  # beta(t) logged per step
    for r in reference:  # telemetry: the step's global passages (4 queries x (1 + 2)) over its seconds
        assert r["passages_per_s"] * r["step_s"] == pytest.approx(12, rel=1e-6)
        assert r["tokens_per_s"] > r["passages_per_s"] > 0 and r["peak_memory_gib"] > 0.1 and "mfu" not in r
        split = sum(r[f"time_{p}_s"] for p in ("data", "forward", "loss", "replay", "optimizer"))
        assert 0 < split <= r["step_s"] and r["time_replay_s"] > 0

    out = tmp_path / "killed"
    proc = subprocess.Popen([*cli, "--output", str(out)], env=ENV, cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and any(r["step"] >= 4 for r in read_metrics(metrics)):
            break
        time.sleep(0.02)
    # SIGKILL the launcher and every worker at once, like a lost node (torchrun's workers
    # run in their own process groups, so the launcher's group alone would miss them)
    victims = [proc.pid] + [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    psutil.wait_procs([p for p in map(_process, victims) if p is not None], timeout=30)
    killed_at = max(r["step"] for r in read_metrics(metrics))
    assert 4 <= killed_at < 14, "the run must be killed between its first checkpoint and its end"
    assert not (out / "model").exists()

    # the checkpoint knows its plan: resuming with another batch shape is refused before any worker starts
    other = json.loads(config.read_text())
    other["batch"]["queries_per_step"] = 2
    (tmp_path / "other.yaml").write_text(json.dumps(other))
    refused = run([sys.executable, "-m", "peg", "train", str(tmp_path / "other.yaml"), "--output", str(out), "--resume"])
    assert refused.returncode == 2
    assert refused.stderr.strip().count("\n") == 0 and "belongs to another training plan" in refused.stderr
    assert "batch.queries_per_step 4 -> 2" in refused.stderr and "total steps" not in refused.stderr

    resumed = run([*cli, "--output", str(out), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "train: resuming from checkpoint step000000" in resumed.stderr
    start = int(resumed.stderr.split("resuming from checkpoint step")[1].split()[0])
    assert 3 <= start <= killed_at
    after = read_metrics(metrics)
    assert [r["step"] for r in after] == list(range(1, 15))
    for ours, ref in zip(after, reference):
        for key in ("loss", "lr", "beta", "weight_mean", "weight_max"):
            assert ours[key] == pytest.approx(ref[key], rel=1e-6, abs=1e-7), (key, ours, ref)


def test_launch_mode_follows_the_environment(tmp_path):
    cfg, out = tmp_path / "c.yaml", tmp_path / "out"
    assert not runs_in_process({})  # a workstation: start torchrun here
    local = torchrun_command(2, cfg, out, True, {})
    assert local[1:6] == ["-m", "peg.process", "torch.distributed.run", "--nproc_per_node", "2"]  # dies with us
    assert "--master_addr" in local and local[-3:] == [str(cfg), str(out), "--resume"]
    pretraining = torchrun_command(1, cfg, out, True, {}, checkpoint_key="run/pretrain/checkpoints", pretrain=True)
    assert pretraining[-6:] == [str(cfg), str(out), "--checkpoint-key", "run/pretrain/checkpoints", "--resume", "--pretrain"]
    assert runs_in_process({"LOCAL_RANK": "0", "RANK": "3", "WORLD_SIZE": "8"})  # inside torchrun
    assert runs_in_process({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "job-master-0"})  # pod per rank
    pet = {"RANK": "1", "WORLD_SIZE": "2", "PET_NNODES": "2", "PET_NODE_RANK": "1", "PET_MASTER_ADDR": "m"}
    assert not runs_in_process(pet)  # PyTorchJob with nprocPerNode: torchrun reads PET_*
    assert "--master_addr" not in torchrun_command(8, cfg, out, False, pet)


def test_schedule_warms_up_then_decays_to_min_ratio():
    f = warmup_linear_decay(total_steps=10, warmup_ratio=0.2, min_lr_ratio=0.1)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0)
    assert f(6) == pytest.approx(0.1 + 0.9 * 4 / 8)
    assert f(10) == pytest.approx(0.1)


def load_dataset(path: str, hard_negatives: int, need_scores: bool, **kwargs) -> PairFile:
    return PairFile.index(path, hard_negatives, need_scores, **kwargs)


@pytest.mark.parametrize("block_bytes", [1 << 20, 300])
def test_batches_come_from_one_dataset_and_slice_per_rank(tmp_path, block_bytes):
    a = load_dataset(write_pairs(tmp_path / "a.jsonl", "alpha", 9, 2), 2, need_scores=False, block_bytes=block_bytes)
    b = load_dataset(write_pairs(tmp_path / "b.jsonl", "beta", 8, 2), 2, need_scores=False, block_bytes=block_bytes)
    assert (len(a.blocks) > 1) == (block_bytes == 300)
    plan = BatchPlan({"a": a, "b": b}, queries_per_step=4, world_size=2, seed=1)
    batches = plan.epoch_batches(0)
    assert plan.steps_per_epoch == len(batches) == 4  # 9 // 4 + 8 // 4
    assert batches == plan.epoch_batches(0) and batches != plan.epoch_batches(1)
    assert sorted(batches) == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    for epoch in (0, 1):
        seen = {"a": [], "b": []}
        for name, number in plan.epoch_batches(epoch):
            parts = [plan.rank_batch(epoch, name, number, r) for r in range(2)]
            topic = "alpha" if name == "a" else "beta"
            assert all(q.startswith(topic) for p in parts for q in p.queries)
            assert all(len(p.passages) == 2 * 3 for p in parts)
            seen[name] += [q for p in parts for q in p.queries]
        for name, n in (("a", 9), ("b", 8)):  # each epoch: distinct examples of the file, in a new order
            assert len(set(seen[name])) == len(seen[name]) == 8
            assert set(seen[name]) <= {f"{'alpha' if name == 'a' else 'beta'} question {i} about item {i * 7 % 13}" for i in range(n)}
    # a fresh plan (a resumed run) reads any position directly, equal to the sequential read
    fresh = BatchPlan({"a": a, "b": b}, queries_per_step=4, world_size=2, seed=1)
    name, number = plan.epoch_batches(1)[2]
    assert fresh.rank_batch(1, name, number, 1) == plan.rank_batch(1, name, number, 1)


def test_the_batches_do_not_depend_on_where_the_files_are(tmp_path):
    """The same files under other paths (another pipeline work directory, a pod) give the same
    batches: the plan is seeded by the datasets' order, never by their paths."""
    plans = []
    for where in ("run-a/inputs", "elsewhere/b"):
        folder = tmp_path / where
        folder.mkdir(parents=True)
        files = [write_pairs(folder / "x.jsonl", "alpha", 9, 2), write_pairs(folder / "y.jsonl", "beta", 8, 2)]
        datasets = {f: load_dataset(f, 2, need_scores=False, block_bytes=300) for f in files}
        plans.append(BatchPlan(datasets, queries_per_step=4, world_size=2, seed=1))
    for epoch in (0, 1):
        read = [[p.rank_batch(epoch, name, number, r).queries
                 for name, number in p.epoch_batches(epoch) for r in range(2)] for p in plans]
        assert read[0] == read[1]


def test_indexing_split_across_ranks_equals_one_process(tmp_path):
    path = write_pairs(tmp_path / "a.jsonl", "alpha", 40, 3, scores=False)
    lines = Path(path).read_text().splitlines()
    short = json.loads(lines[5])
    short["neg"] = short["neg"][:1]
    lines[5] = json.dumps(short)
    Path(path).write_text("\n".join(lines) + "\n")
    whole = load_dataset(path, 2, need_scores=False, block_bytes=500)

    class Gathered(Exception):
        pass

    def scan_only(shard: int):  # what rank `shard` of 3 hands to all_gather_object
        captured = []

        def gather(obj):
            captured.append(obj)
            raise Gathered

        with pytest.raises(Gathered):
            PairFile.index(path, 2, False, block_bytes=500, shard=shard, shards=3, gather=gather)
        return captured[0]

    others = [scan_only(1), scan_only(2)]
    split = PairFile.index(path, 2, False, block_bytes=500, shard=0, shards=3, gather=lambda obj: [obj, *others])
    assert len(whole.blocks) > 3 and split.blocks == whole.blocks
    assert whole.examples == 39  # line 6 has too few negatives
    assert load_dataset(path, 2, need_scores=False, block_bytes=500, limit=10).examples == 10


def test_prefetcher_keeps_order_and_raises_the_workers_error():
    def produce(i: int) -> int:
        if i == 3:
            raise ValueError("bad item 3")
        return i * i

    batches = Prefetcher(iter(range(5)), produce, depth=2)
    assert [next(batches) for _ in range(3)] == [(0, 0), (1, 1), (2, 4)]
    with pytest.raises(ValueError, match="bad item 3"):
        next(batches)
    batches.close()


def test_mfu_counts_6n_plus_attention_of_the_real_tokens(monkeypatch):
    model = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=64))  # fmt: skip
    params, layers, hidden = model_shape(model)
    assert params == sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n)
    assert (layers, hidden) == (2, 32)
    flops = step_flops((params, 2, 32), tokens=10 + 20, lengths_sq=10**2 + 20**2)  # two texts of 10 and 20 tokens
    assert flops == 6 * params * 30 + 12 * 2 * 32 * 500
    assert peak_flops(torch.device("cpu")) is None  # no MFU on CPU unless a peak is given
    monkeypatch.setenv("PEG_PEAK_TFLOPS", "100")
    peak, source = peak_flops(torch.device("cpu"))
    assert (peak, source) == (100e12, "PEG_PEAK_TFLOPS")
    rates = throughput(2.0, passages=8, tokens=30, flops=flops, world_size=2, peak=peak)
    assert rates == {"step_s": 2.0, "passages_per_s": 4.0, "tokens_per_s": 15.0, "mfu": flops / (2.0 * 2 * 100e12)}


@pytest.mark.parametrize(
    ("name", "tflops", "entry"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0, "NVIDIA H100 80GB HBM3"),  # SXM
        ("NVIDIA H100 NVL", 835.0, "NVIDIA H100 NVL"),
        ("NVIDIA H100 PCIe", 756.0, "NVIDIA H100 PCIe"),
        ("NVIDIA H200", 989.0, "NVIDIA H200"),
        ("NVIDIA H200 NVL", 835.0, "NVIDIA H200 NVL"),  # not the SXM H200's figure
        ("NVIDIA A100-SXM4-80GB", 312.0, "NVIDIA A100-SXM4-80GB"),
        ("NVIDIA A100-PCIE-40GB", 312.0, "NVIDIA A100-PCIE-40GB"),
        ("NVIDIA A100-SXM4-40GB MIG 3g.20gb", 312.0, "NVIDIA A100-SXM4-40GB"),  # a suffix after a word boundary
        ("NVIDIA L40S", 362.0, "NVIDIA L40S"),  # not L40, not L4
        ("NVIDIA L40", 181.0, "NVIDIA L40"),
        ("NVIDIA L4", 121.0, "NVIDIA L4"),
        ("NVIDIA A10G", 70.0, "NVIDIA A10G"),  # not A10
        ("NVIDIA  L4 ", 121.0, "NVIDIA L4"),  # spacing as nvidia-smi may pad it
    ],
)
def test_device_peak_reads_the_exact_board(name, tflops, entry):
    assert device_peak(name) == (tflops, entry)


@pytest.mark.parametrize("name", ["NVIDIA H100", "NVIDIA H20", "NVIDIA L4X", "Tesla T4", "AMD Instinct MI300X"])
def test_device_peak_does_not_guess_an_unknown_board(name):
    assert device_peak(name) is None


def test_batch_not_divisible_across_ranks_is_a_clear_error(tmp_path):
    a = load_dataset(write_pairs(tmp_path / "a.jsonl", "alpha", 9, 2), 2, need_scores=False)
    with pytest.raises(BatchError, match=r"batch.queries_per_step \(5\) does not divide across 2 ranks"):
        BatchPlan({"a": a}, queries_per_step=5, world_size=2, seed=1)


@pytest.mark.slow
def test_cli_rejects_a_batch_that_does_not_divide_across_ranks(tmp_path):
    # a packaged model: found offline by the check before any work, never loaded here
    config = _train_config(tmp_path, "sentence-transformers/all-MiniLM-L6-v2", [write_pairs(tmp_path / "a.jsonl", "alpha", 8, 2)])
    data = json.loads(config.read_text())
    data["batch"]["queries_per_step"] = 5
    config.write_text(json.dumps(data))
    proc = run([sys.executable, "-m", "peg", "train", str(config), "--output", str(tmp_path / "out")])
    assert proc.returncode == 2
    assert "batch.queries_per_step (5) does not divide across 2 ranks" in proc.stderr
    assert not (tmp_path / "out").exists()  # refused before any process started


@pytest.mark.slow
def test_cli_listwise_without_teacher_scores_fails_with_file_and_line(tmp_path):
    model = make_tiny_bert(tmp_path / "tiny", dropout=0.0)
    files = [write_pairs(tmp_path / "a.jsonl", "alpha", 8, 2, scores=False)]
    config = _train_config(tmp_path, model, files)
    data = json.loads(config.read_text())
    data["loss"] = {"kind": "listwise"}
    config.write_text(json.dumps(data))
    proc = run([sys.executable, "-m", "peg", "train", str(config), "--output", str(tmp_path / "out")])
    assert proc.returncode == 2
    assert "a.jsonl:1: loss.kind=listwise needs teacher scores: missing pos_scores and neg_scores" in proc.stderr


def test_listwise_without_teacher_scores_names_file_and_line(tmp_path):
    path = write_pairs(tmp_path / "a.jsonl", "alpha", 3, 2, scores=False)
    with pytest.raises(DataError, match=r"a.jsonl:1: loss.kind=listwise needs teacher scores: missing pos_scores"):
        load_dataset(path, 2, need_scores=True)
    with pytest.raises(DataError, match=r"a.jsonl:1: 2 negatives, but batch.hard_negatives asks for 3"):
        load_dataset(path, 3, need_scores=False)


def test_zero3_with_gradient_checkpointing_is_a_config_error():
    text = "model: {name_or_path: m}\ntrain:\n  zero_stage: 3\n  gradient_checkpointing: true\n"
    with pytest.raises(ConfigError, match=r"cfg.yaml:2: train: .*train.gradient_checkpointing is not supported with train.zero_stage 3"):
        parse_config(text, "cfg.yaml")
    assert parse_config(text.replace("zero_stage: 3", "zero_stage: 2"), "cfg.yaml").train.gradient_checkpointing


@pytest.mark.parametrize("name", ["peg-paper-scale.yaml", "tamber-listwise.yaml"])
def test_paper_scale_examples_load(name):
    config: RunConfig = load_config(REPO / "examples" / name)
    t, b = config.train, config.batch
    world = t.nproc_per_node * config.cluster.nodes
    assert b.queries_per_step % world == 0
    assert t.precision == "bf16" and b.chunk_size
    if name == "peg-paper-scale.yaml":
        assert b.queries_per_step * (1 + b.hard_negatives) >= 80_000 and b.hard_negatives == 5
        assert t.zero_stage == 2 and config.loss.progressive.enabled
    else:
        assert b.queries_per_step == 16 * 256 and b.hard_negatives + 1 == config.score.list_size == 20
        assert config.loss.kind == "listwise"


def _three_datasets(tmp_path: Path) -> dict[str, PairFile]:
    sizes = {"a": 9, "b": 8, "c": 12}  # 2, 2 and 3 batches of 4
    return {n: load_dataset(write_pairs(tmp_path / f"{n}.jsonl", n, k, 2), 2, need_scores=False, block_bytes=300)
            for n, k in sizes.items()}  # fmt: skip


def test_round_robin_takes_the_datasets_in_turn(tmp_path):
    plan = BatchPlan(_three_datasets(tmp_path), queries_per_step=4, world_size=2, seed=1, sampling="round_robin")
    want = [("a", 0), ("b", 0), ("c", 0), ("a", 1), ("b", 1), ("c", 1), ("c", 2)]
    assert plan.epoch_batches(0) == plan.epoch_batches(3) == want and plan.steps_per_epoch == 7


def test_weighted_sampling_draws_by_weight_and_cycles_a_small_dataset(tmp_path):
    datasets = _three_datasets(tmp_path)
    plan = BatchPlan(datasets, queries_per_step=4, world_size=2, seed=1, sampling="weighted", weights=[6.0, 0.0, 1.0])
    counts: dict[str, int] = {}
    for epoch in range(30):
        batches = plan.epoch_batches(epoch)
        assert len(batches) == plan.steps_per_epoch == 7 and batches == plan.epoch_batches(epoch)
        for name, _ in batches:
            counts[name] = counts.get(name, 0) + 1
    assert "b" not in counts and counts["a"] / (counts["a"] + counts["c"]) == pytest.approx(6 / 7, abs=0.06)
    # "a" has 2 batches a pass: batch numbers 2 and 3 are a new cycle, reshuffled, every batch from "a" alone
    cycles = [[q for r in range(2) for q in plan.rank_batch(0, "a", n, r).queries] for n in range(4)]
    first, second = cycles[0] + cycles[1], cycles[2] + cycles[3]
    assert len(set(first)) == len(set(second)) == 8 and first != second
    assert all(q.startswith("a question") for q in first + second)


@pytest.mark.parametrize("sampling", ["proportional", "round_robin", "weighted"])
def test_every_sampling_resumes_exactly_from_any_position(tmp_path, sampling):
    """A fresh plan (a resumed run) continuing from (epoch, index) reads what the uninterrupted run read."""
    datasets = _three_datasets(tmp_path)
    weights = [1.0, 2.0, 1.0] if sampling == "weighted" else None

    def read(plan: BatchPlan, epoch: int, index: int, steps: int) -> list[tuple]:
        positions, out = plan.positions(epoch, index), []
        for _ in range(steps):
            ep, i, name, number = next(positions)
            out.append((ep, i, name, tuple(q for r in range(2) for q in plan.rank_batch(ep, name, number, r).queries)))
        return out

    whole = read(BatchPlan(datasets, 4, 2, seed=5, sampling=sampling, weights=weights), 0, 0, 20)
    resumed = read(BatchPlan(datasets, 4, 2, seed=5, sampling=sampling, weights=weights), *whole[9][:2], 11)
    assert resumed == whole[9:]


def test_weights_must_match_the_training_files(tmp_path):
    files = [write_pairs(tmp_path / "a.jsonl", "a", 8, 2), write_pairs(tmp_path / "b.jsonl", "b", 8, 2)]
    config = RunConfig.model_validate({
        "name": "w", "model": {"name_or_path": "m"}, "batch": {"queries_per_step": 4, "hard_negatives": 2},
        "data": {"train_files": files, "sampling": "weighted", "dataset_weights": [1.0, 2.0, 3.0]},
    })  # fmt: skip
    with pytest.raises(TrainError, match=r"data.dataset_weights has 3 weights for 2 training files"):
        training_plan(config, world_size=2)
    config.data.dataset_weights = [1.0, 2.0]
    _, _, identity, _ = training_plan(config, world_size=2)
    assert identity["data.sampling"] == "weighted" and identity["data.dataset_weights"] == [1.0, 2.0]
    for data, message in (({"sampling": "weighted"}, "set exactly when data.sampling is weighted"),
                          ({"sampling": "weighted", "dataset_weights": [0.0, 0.0]}, "not all 0")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            RunConfig.model_validate({"name": "w", "model": {"name_or_path": "m"}, "data": data})


@pytest.mark.slow
def test_topology_does_not_change_the_trained_bytes_and_no_deepspeed_op_is_built(tmp_path):
    """1 node x 2 processes and 2 nodes x 1 process (two launchers joined through PET_*, as a
    TrainJob's pods are) train the same bytes at the same threads per rank; neither run builds a
    DeepSpeed op (the CPU accelerator's shm comm op is skipped: nothing lands in TORCH_EXTENSIONS_DIR)."""
    model = make_tiny_bert(tmp_path / "tiny", dropout=0.1)
    files = [write_pairs(tmp_path / "a.jsonl", "alpha", 12, 2)]
    one_node = _train_config(tmp_path, model, files, max_steps=3, zero_stage=2)
    two_nodes = tmp_path / "two-nodes.yaml"
    config = json.loads(one_node.read_text())
    config["train"]["nproc_per_node"] = 1
    two_nodes.write_text(json.dumps(config))
    extensions = tmp_path / "torch-extensions"
    extensions.mkdir()
    env = {**ENV, "TORCH_EXTENSIONS_DIR": str(extensions)}
    cli = [sys.executable, "-m", "peg", "train"]
    single = subprocess.run([*cli, str(one_node), "--output", str(tmp_path / "1x2")], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=400)  # fmt: skip
    assert single.returncode == 0, single.stderr[-4000:]
    assert "training on CPU: 2 processes x 1 threads" in single.stderr
    pet = {"PET_NNODES": "2", "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(_free_port())}
    nodes = [subprocess.Popen([*cli, str(two_nodes), "--output", str(tmp_path / f"2x1-{rank}")], cwd=REPO,
                              env={**env, **pet, "PET_NODE_RANK": str(rank)}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]  # fmt: skip
    errors = [node.communicate(timeout=400)[1] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], errors[0][-4000:]
    weights = "model/model.safetensors"
    assert (tmp_path / "1x2" / weights).read_bytes() == (tmp_path / "2x1-0" / weights).read_bytes()
    assert list(extensions.iterdir()) == []


@pytest.mark.slow
def test_a_finetune_fraction_exports_the_trained_update_scaled_toward_the_base(tmp_path):
    """train.finetune_fraction 0.4 exports base + 0.4 * (trained - base): the same training with
    fraction 1 gives `trained` (the trained bytes do not depend on the run, see above)."""
    from safetensors.torch import load_file

    model = make_tiny_bert(tmp_path / "tiny", dropout=0.1)
    files = [write_pairs(tmp_path / "a.jsonl", "alpha", 12, 2)]
    outputs = {}
    for fraction in (1.0, 0.4):
        config = _train_config(tmp_path, model, files, max_steps=3, zero_stage=2, finetune_fraction=fraction)
        proc = run([sys.executable, "-m", "peg", "train", str(config), "--output", str(tmp_path / str(fraction))])
        assert proc.returncode == 0, proc.stderr[-4000:]
        outputs[fraction] = load_file(tmp_path / str(fraction) / "model" / "model.safetensors")
    base = BertModel.from_pretrained(model).state_dict()
    trained, part = outputs[1.0], outputs[0.4]
    assert any(not torch.allclose(trained[k], base[k]) for k in trained)
    for key in trained:
        torch.testing.assert_close(part[key], base[key] + 0.4 * (trained[key] - base[key]), atol=1e-6, rtol=0)
