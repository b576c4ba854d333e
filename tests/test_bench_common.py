"""The benchmarks' shared helpers: config overrides and the paired per-query comparison that says
whether a variant's nDCG@10 difference from base is more than query sampling noise."""

from __future__ import annotations

import random

import pytest

from bench.common import merged, paired_difference


def test_merged_overrides_nested_keys_and_leaves_both_inputs_unchanged():
    base = {"loss": {"kind": "listwise", "listwise": {"teacher_temperature": 0.3, "nce_weight": 0.1}}, "name": "r"}
    overrides = {"loss": {"listwise": {"teacher_temperature": 0.1}}, "train": {"max_steps": 144}}
    out = merged(base, overrides)
    assert out == {"loss": {"kind": "listwise", "listwise": {"teacher_temperature": 0.1, "nce_weight": 0.1}},
                   "name": "r", "train": {"max_steps": 144}}
    assert base["loss"]["listwise"]["teacher_temperature"] == 0.3 and "train" not in base


def test_a_uniform_shift_is_reported_exactly_with_a_degenerate_interval():
    old = {f"q{i}": i / 100 for i in range(50)}
    new = {q: v + 0.02 for q, v in old.items()}
    d = paired_difference(new, old)
    assert d["mean"] == pytest.approx(0.02)
    assert d["ci95"] == pytest.approx([0.02, 0.02])
    assert (d["queries"], d["better"], d["worse"]) == (50, 50, 0)


def test_the_interval_excludes_zero_only_when_the_gain_outweighs_the_spread():
    rng = random.Random(0)
    old = {f"q{i}": rng.random() for i in range(300)}
    noise = {q: rng.gauss(0, 0.1) for q in old}
    small = paired_difference({q: v + 0.001 + noise[q] for q, v in old.items()}, old)
    large = paired_difference({q: v + 0.05 + noise[q] for q, v in old.items()}, old)
    assert small["ci95"][0] < 0 < small["ci95"][1]
    assert 0 < large["ci95"][0] < 0.05 < large["ci95"][1]


def test_only_queries_scored_in_both_runs_are_compared_and_none_shared_is_an_error():
    d = paired_difference({"a": 1.0, "b": 0.5}, {"b": 0.25, "c": 0.0})
    assert (d["mean"], d["queries"]) == (0.25, 1)
    with pytest.raises(ValueError, match="share no query"):
        paired_difference({"a": 1.0}, {"b": 1.0})
