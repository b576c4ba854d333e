"""The pipeline's stage hashes: a changed stage config invalidates that stage and its downstream
only. (A killed run resuming from the store and equalling a clean run: tests/test_faults.py.)"""

from pathlib import Path

import yaml
from tiny import make_tiny_beir, make_tiny_model

from peg.config import load_config
from peg.pipeline import stage_hashes


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


def test_changed_stage_config_invalidates_it_and_downstream_only(tmp_path):
    root = tmp_path
    data, model = make_tiny_beir(root / "beir"), make_tiny_model(root / "model")
    base = load_config(write_config(root, data, model, str(root / "h")))
    changed = load_config(write_config(root, data, model, str(root / "h"), **{"mining.top_k": 30}))
    a, b = stage_hashes(base), stage_hashes(changed)
    assert [s for s in a if a[s] == b[s]] == ["prepare", "encode"]
    eval_only = load_config(write_config(root, data, model, str(root / "h"), **{"eval.k_values": [10, 20]}))
    c = stage_hashes(eval_only)
    assert [s for s in a if a[s] != c[s]] == ["eval", "export", "report"]
