"""The sharded-stage template (peg/runtime/sharded.py): scope-keyed shards, summed stats, outputs,
summary lines; a rerun that reuses every shard starts no Ray."""

from __future__ import annotations

import json

import ray

from peg.runtime.sharded import ShardedStage, StageReport, run_sharded
from peg.runtime.shards import WorkerPool, shard_key
from peg.store import LocalStore
from peg.store.scope import StageScope


def test_a_rerun_reusing_every_shard_reads_them_back_sums_them_and_starts_no_ray(tmp_path):
    store = LocalStore(tmp_path / "store")
    scope = StageScope("run", "judge", "h" * 64, store, {"mine": "d" * 64})
    parts = ("stats.json", "jsonl")
    for s, (n, text) in enumerate([(2, "a\nb\n"), (1, "c\n")]):
        store.put_text(shard_key(scope.prefix, s, "stats.json"), json.dumps({"examples": n, "dropped": s}), "judge",
                       scope.shard_hash)
        store.put_text(shard_key(scope.prefix, s, "jsonl"), text, "judge", scope.shard_hash)

    def never_built():
        raise AssertionError("no shard is computed")

    declaration = ShardedStage(parts, never_built, WorkerPool(), shard_size=2)
    shards = run_sharded(scope, declaration, ["q1", "q2", "q3"], show_progress=False)
    assert not ray.is_initialized()
    assert (shards.computed, shards.reused) == ([], [0, 1])
    assert shards.summed() == {"examples": 3, "dropped": 1}
    assert shards.joined("jsonl") == "a\nb\nc\n"
    keys = shards.put({"report.json": {"examples": 3}, "train.jsonl": shards.joined("jsonl")})
    assert keys == ("run/judge/report.json", "run/judge/train.jsonl")
    assert store.read_text("run/judge/train.jsonl") == "a\nb\nc\n"
    report = StageReport({"examples": 3}, keys, lambda r: [f"{r['examples']} examples"])
    assert report.summary_lines() == ["3 examples", "wrote run/judge/report.json, run/judge/train.jsonl"]


def test_shards_of_other_inputs_are_not_reused():
    same = StageScope("run", "judge", "h" * 64, None, {"mine": "d" * 64})
    other_input = StageScope("run", "judge", "h" * 64, None, {"mine": "e" * 64})
    other_config = StageScope("run", "judge", "g" * 64, None, {"mine": "d" * 64})
    assert len({same.shard_hash, other_input.shard_hash, other_config.shard_hash}) == 3
    assert same.key("train.jsonl") == "run/judge/train.jsonl" and same.key_of("mine", "x") == "run/mine/x"


class Doubler:
    def __call__(self, shard: int, items: list) -> dict[str, str]:
        return {"jsonl": "".join(f"{2 * x}\n" for x in items)}


@ray.remote(num_cpus=0.5)
class Occupant:
    def ready(self) -> bool:
        return True


def test_a_pool_larger_than_the_free_cpus_runs_on_the_actors_that_fit(tmp_path, ray_local, caplog):
    """2 CPUs, 0.5 held by another actor (as synth's search index holds mining.actor_cpus): a pool
    of two 1-CPU actors used to start one and leave a shard waiting forever on the other."""
    import sys

    from ray import cloudpickle

    from peg.runtime.shards import run_shards

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors cannot import this test module
    occupant = Occupant.remote()
    ray.get(occupant.ready.remote())
    store = LocalStore(tmp_path / "store")
    computed, reused = run_shards(stage="synth", store=store, base="run/synth", items=list(range(6)), shard_size=2,
                                  parts=("jsonl",), build=Doubler, pool=WorkerPool(num_actors=2, actor_cpus=1.0),
                                  config_hash="h", show_progress=False)
    assert (computed, reused) == ([0, 1, 2], [])
    assert [store.read_text(shard_key("run/synth", s, "jsonl")) for s in computed] == ["0\n2\n", "4\n6\n", "8\n10\n"]
    assert "2 actors of 1 CPUs / 0 GPUs asked, 1 fit" in caplog.text
    ray.kill(occupant)


def test_a_pool_whose_actor_does_not_fit_is_refused_naming_the_free_resources(ray_local):
    import pytest

    from peg.config import ConfigError
    from peg.runtime.shards import actors_that_fit

    with pytest.raises(ConfigError, match=r"score: an actor of 3 CPUs and 0 GPUs does not fit the Ray session \([\d.]+ of 2 CPUs"):
        actors_that_fit("score", WorkerPool(num_actors=1, actor_cpus=3.0), 1, wait_seconds=1)
