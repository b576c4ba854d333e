"""The `report` stage: one self-contained HTML page (and its PNGs) for a pipeline run.

It shows the base vs fine-tuned metrics table and bar chart, the training curves (loss, lr,
beta(t), query weights), and the mining score histogram with the counts dropped by each rule.
"""

from __future__ import annotations

import base64
import html
import tempfile
from pathlib import Path

from peg.pipeline.context import StageContext


def _metrics_chart(metrics: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(next(iter(metrics.values())))
    x = np.arange(len(names))
    width = 0.8 / len(metrics)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for i, (label, values) in enumerate(metrics.items()):
        bars = ax.bar(x + i * width, [values[n] for n in names], width, label=label)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks(x + width * (len(metrics) - 1) / 2, names)
    ax.set_ylim(0, 1.05)
    ax.legend()
    ax.set_title("retrieval metrics")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(rows: dict[str, dict[str, float]]) -> str:
    names = list(next(iter(rows.values())))
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    body = "".join(
        f"<tr><td>{html.escape(label)}</td>" + "".join(f"<td>{v[n]:.4f}</td>" for n in names) + "</tr>"
        for label, v in rows.items()
    )
    return f"<table><tr><th>model</th>{head}</tr>{body}</table>"


SHOWN_IDS = 10  # short-query ids listed in the report; the rest are counted


def _rows(rows: list[tuple[str, object]]) -> str:
    """A two-column table (name, value)."""
    body = "".join(f"<tr><th>{html.escape(name)}</th><td>{html.escape(_fmt(value))}</td></tr>" for name, value in rows)
    return f"<table>{body}</table>"


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return "-" if value is None else str(value)


def mining_tables(stats: dict) -> str:
    """Mining statistics as tables: counts, drops by rule, the settings, a few short query ids."""
    counts = [(name.replace("_", " "), stats[name]) for name in
              ("queries", "queries_without_positives", "candidates", "kept", "not_selected", "queries_short",
               "query_shards") if name in stats]
    dropped = [(rule.replace("_", " "), n) for rule, n in stats.get("dropped", {}).items()]
    settings = list(stats.get("mining", {}).items())
    short = stats.get("short_query_ids", [])
    parts = ["<h3>Counts</h3>", _rows(counts), "<h3>Dropped by rule</h3>", _rows(dropped or [("none", 0)]),
             "<h3>Settings</h3>", _rows(settings)]
    if short:
        listed = ", ".join(short[:SHOWN_IDS]) + (f" and {len(short) - SHOWN_IDS:,} more" if len(short) > SHOWN_IDS else "")
        parts.append(f"<p>Queries short of negatives: {html.escape(listed)}</p>")
    return "\n".join(parts)


def write_report(ctx: StageContext) -> list[str]:
    """Build report.html from the eval, train and mine artifacts; print where it is."""
    config, store = ctx.config, ctx.store
    summary = store.read_json(ctx.key("eval", "summary.json"))
    metrics = summary["metrics"]
    mine_stats = store.read_json(ctx.key("mine", "stats.json"))
    with tempfile.TemporaryDirectory(prefix="peg-report-") as tmp:
        tmp = Path(tmp)
        images = {"metrics.png": tmp / "metrics.png"}
        _metrics_chart(metrics, images["metrics.png"])
        for stage, name in (("train", "training.png"), ("mine", "scores.png")):
            if store.exists(ctx.key(stage, name)):
                images[name] = store.materialise(ctx.key(stage, name), tmp)
        sections = [
            f"<h1>peg run <code>{html.escape(config.name)}</code></h1>",
            f"<p>Model <code>{html.escape(config.model.name_or_path)}</code>, loss {config.loss.kind}"
            f" (progressive: {config.loss.progressive.enabled}), {config.batch.queries_per_step} queries x "
            f"(1 + {config.batch.hard_negatives}) passages per step, {config.train.nproc_per_node} process(es).</p>",
            f"<h2>Evaluation ({html.escape(summary['split'])} split)</h2>",
            _table(metrics),
            _img(images["metrics.png"], "metrics"),
        ]
        if "training.png" in images:
            sections += ["<h2>Training</h2>", _img(images["training.png"], "training curves")]
        sections += [
            "<h2>Hard-negative mining</h2>",
            mining_tables(mine_stats),
        ]
        if "scores.png" in images:
            sections.append(_img(images["scores.png"], "positive vs negative scores"))
        page = (
            "<!doctype html><meta charset='utf-8'><title>peg report</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{text-align:left}img{max-width:100%;display:block}"
            "</style>" + "\n".join(sections)
        )
        report = tmp / "report.html"
        report.write_text(page)
        keys = []
        for name, path in {"report.html": report, **images}.items():
            key = ctx.output_key(name)
            store.put_file(key, path, producer="report", config_hash=ctx.stage_hash)
            keys.append(key)
    return keys
