"""The `report` stage: one self-contained HTML page (and its PNGs) for a pipeline run.

It shows the base vs fine-tuned metrics table and bar chart, the training curves (loss, lr,
beta(t), query weights), and the mining score histogram with the counts dropped by each rule.
"""

from __future__ import annotations

import base64
import html
import json
import tempfile
from pathlib import Path

from peg.pipeline.stages import StageContext


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


def write_report(ctx: StageContext) -> list[str]:
    """Build report.html from the eval, train and mine artifacts; print where it is."""
    config, store = ctx.config, ctx.store
    summary = json.loads(store.get_bytes(ctx.key("eval", "summary.json")))
    metrics = summary["metrics"]
    mine_stats = json.loads(store.get_bytes(ctx.key("mine", "stats.json")))
    with tempfile.TemporaryDirectory(prefix="peg-report-") as tmp:
        tmp = Path(tmp)
        images = {"metrics.png": tmp / "metrics.png"}
        _metrics_chart(metrics, images["metrics.png"])
        for stage, name in (("train", "training.png"), ("mine", "scores.png")):
            if store.exists(ctx.key(stage, name)):
                images[name] = ctx.fetch(ctx.key(stage, name), tmp)
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
            f"<pre>{html.escape(json.dumps(mine_stats, indent=2))}</pre>",
        ]
        if "scores.png" in images:
            sections.append(_img(images["scores.png"], "positive vs negative scores"))
        page = (
            "<!doctype html><meta charset='utf-8'><title>peg report</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}img{max-width:100%;display:block}"
            "</style>" + "\n".join(sections)
        )
        report = tmp / "report.html"
        report.write_text(page)
        keys = []
        for name, path in {"report.html": report, **images}.items():
            key = ctx.key("report", name)
            store.put_file(key, path, producer="report", config_hash=ctx.stage_hash)
            keys.append(key)
    return keys
