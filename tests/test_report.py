"""The report's progressive panel: beta(t), pace and query weights from the train metrics."""

from __future__ import annotations

from peg.pipeline.report import _progressive_chart


def test_progressive_chart_is_drawn_only_for_progressive_runs(tmp_path):
    records = [{"step": s, "loss": 1.0, "beta": -0.5 + 0.1 * s, "pace": 0.5 + 0.05 * s, "weight_min": 0.2,
                "weight_mean": 1.0, "weight_max": 1.8} for s in range(1, 6)]
    assert _progressive_chart(records, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not _progressive_chart([{"step": 1, "loss": 1.0}], tmp_path / "q.png")
    assert not (tmp_path / "q.png").exists()
