"""The report: its progressive panel (beta(t), pace and query weights from the train metrics) and
its mining tables."""

from __future__ import annotations

from peg.pipeline.report import _progressive_chart, dev_table, mining_tables


def test_progressive_chart_is_drawn_only_for_progressive_runs(tmp_path):
    records = [{"step": s, "loss": 1.0, "beta": -0.5 + 0.1 * s, "pace": 0.5 + 0.05 * s, "weight_min": 0.2,
                "weight_mean": 1.0, "weight_max": 1.8} for s in range(1, 6)]
    assert _progressive_chart(records, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not _progressive_chart([{"step": 1, "loss": 1.0}], tmp_path / "q.png")
    assert not (tmp_path / "q.png").exists()


def test_report_renders_mining_statistics_as_tables():
    stats = {"queries": 120, "candidates": 2400, "kept": 500, "not_selected": 7, "queries_short": 25,
             "queries_without_positives": 2, "query_shards": 3,
             "dropped": {"positive": 120, "duplicate": 4, "relative_margin": 30},
             "short_query_ids": [f"q{i}" for i in range(25)], "mining": {"top_k": 20, "selection": "topk_percpos"}}
    page = mining_tables(stats)
    assert "<table>" in page and "{" not in page
    assert "<tr><th>relative margin</th><td>30</td></tr>" in page
    assert "<tr><th>candidates</th><td>2,400</td></tr>" in page
    assert "q9, and" not in page and "q0, q1" in page and "and 15 more" in page and "q10" not in page


def test_the_dev_evaluations_during_training_are_a_table_with_the_exported_step():
    records = [{"step": 1, "loss": 1.0},
               {"step": 2, "loss": 0.9, "dev_ndcg@10": 0.61, "dev_ndcg@10_dim64": 0.52, "dev_best_step": 2.0},
               {"step": 4, "loss": 0.8, "dev_ndcg@10": 0.60, "dev_ndcg@10_dim64": 0.55, "dev_best_step": 2.0}]
    page = dev_table(records, "ndcg@10")
    assert "<th>step</th><th>dev ndcg@10</th><th>@64</th>" in page
    assert "<tr><td>step 2 (exported)</td><td>0.6100</td><td>0.5200</td></tr>" in page
    assert "<tr><td>step 4</td><td>0.6000</td><td>0.5500</td></tr>" in page
    assert dev_table([{"step": 1, "loss": 1.0}], "ndcg@10") == ""
