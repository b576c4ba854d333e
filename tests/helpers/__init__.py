"""Helpers the test modules share: run configs written as YAML (the shared fixtures are in
tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def write_config(path: Path, config: dict[str, Any], **overrides: Any) -> Path:
    """Write `config` as YAML at `path`, each override set by its dotted key first
    (`**{"mining.top_k": 30}` sets `config["mining"]["top_k"]`, creating sections); returns `path`.
    `config` itself is left unchanged."""
    config = yaml.safe_load(yaml.safe_dump(config))  # a deep copy
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = config
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump(config))
    return path


def tiny_run_config(data: Path, model: Path, store: dict[str, Any]) -> dict[str, Any]:
    """The tiny pipeline run (tests/tiny.py's BEIR folder and model): one training process without
    ZeRO, one mining shard, seconds a stage."""
    return {
        "name": "tiny",
        "data": {"beir": str(data)},
        "model": {"name_or_path": str(model), "query_max_length": 32, "passage_max_length": 48},
        "batch": {"queries_per_step": 4, "hard_negatives": 1},
        "train": {"epochs": 2, "learning_rate": 1e-3, "nproc_per_node": 1, "zero_stage": 0, "checkpoint_every": 2},
        "encode": {"batch_size": 32, "num_actors": 1, "actor_cpus": 0.5},
        "mining": {"num_shards": 1, "top_k": 20, "negatives_per_query": 1, "selection": "rank_window",
                   "rank_window": [0, 20]},
        "eval": {"k_values": [10]},
        "store": store,
    }
