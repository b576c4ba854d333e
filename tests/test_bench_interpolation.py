"""bench/interpolation.py: the fraction is chosen on dev alone, averaged over the collections that have one."""

from __future__ import annotations

import pytest

from bench.interpolation import summary


def _row(collection: str, fraction: float | None, dev: list[float] | None, test: list[float]) -> dict:
    row = {"collection": collection, "run": f"{collection}-run", "fraction": fraction,
           "test_ndcg@10": sum(test) / len(test), "test_per_query_ndcg@10": {f"t{i}": v for i, v in enumerate(test)}}
    if dev is not None:
        row.update({"dev_ndcg@10": sum(dev) / len(dev), "dev_per_query_ndcg@10": {f"d{i}": v for i, v in enumerate(dev)}})
    return row


def test_the_fraction_with_the_best_mean_dev_gain_wins_whatever_test_says():
    rows = [
        _row("a", None, [0.5, 0.5], [0.5, 0.5]),
        _row("a", 0.5, [0.6, 0.5], [0.9, 0.9]),  # dev +0.05, test far better
        _row("a", 1.0, [0.7, 0.5], [0.5, 0.5]),  # dev +0.10
        _row("b", None, [0.2, 0.2], [0.2, 0.2]),
        _row("b", 0.5, [0.3, 0.2], [0.2, 0.2]),  # dev +0.05
        _row("b", 1.0, [0.1, 0.2], [0.2, 0.2]),  # dev -0.05: mean over a and b 0.025 < 0.05
        _row("c", None, None, [0.4]),  # no dev set: reported, never chooses
        _row("c", 0.5, None, [0.1]),
        _row("c", 1.0, None, [0.9]),
    ]
    table, chosen = summary(rows)
    assert chosen == 0.5
    entry = next(e for e in table if e["collection"] == "a" and e["fraction"] == 1.0)
    assert entry["dev"]["gain"] == pytest.approx(0.10) and entry["test"]["gain"] == pytest.approx(0.0)
    assert "dev" not in next(e for e in table if e["collection"] == "c")
    assert summary([r for r in rows if r["collection"] == "c"])[1] is None
