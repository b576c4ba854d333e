"""The pipeline's stage hashes: a changed stage config invalidates that stage and its downstream
only. (A killed run resuming from the store and equalling a clean run: tests/test_faults.py.)"""

from helpers import tiny_run_config, write_config
from tiny import make_tiny_beir, make_tiny_model

from peg.config import load_config
from peg.pipeline import stage_hashes


def test_changed_stage_config_invalidates_it_and_downstream_only(tmp_path):
    root = tmp_path
    data, model = make_tiny_beir(root / "beir"), make_tiny_model(root / "model")
    config = tiny_run_config(data, model, {"uri": str(root / "h")})
    base = load_config(write_config(root / "base.yaml", config))
    changed = load_config(write_config(root / "changed.yaml", config, **{"mining.top_k": 30}))
    a, b = stage_hashes(base), stage_hashes(changed)
    assert [s for s in a if a[s] == b[s]] == ["prepare", "encode"]
    eval_only = load_config(write_config(root / "eval.yaml", config, **{"eval.k_values": [10, 20]}))
    c = stage_hashes(eval_only)
    assert [s for s in a if a[s] != c[s]] == ["eval", "export", "report"]
