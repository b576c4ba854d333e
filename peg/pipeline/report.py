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

from peg.pipeline.context import StageContext
from peg.pipeline.results import read_eval_summary


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


def _table(rows: dict[str, dict[str, float]], first: str = "model") -> str:
    names = list(next(iter(rows.values())))
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    body = "".join(
        f"<tr><td>{html.escape(label)}</td>" + "".join(f"<td>{v[n]:.4f}</td>" for n in names) + "</tr>"
        for label, v in rows.items()
    )
    return f"<table><tr><th>{html.escape(first)}</th>{head}</tr>{body}</table>"


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


def dev_table(records: list[dict], metric: str) -> str:
    """The dev evaluations during training (`train.eval_every`) from the train stage's metrics.jsonl
    records: one row per evaluated step, `metric` at the full dimension and at each Matryoshka
    prefix, the row of the exported (best) step marked; "" when the run evaluated nothing."""
    evaluated = [r for r in records if f"dev_{metric}" in r]
    if not evaluated:
        return ""
    dims = [k.removeprefix(f"dev_{metric}_") for k in evaluated[0] if k.startswith(f"dev_{metric}_dim")]
    best = evaluated[-1].get("dev_best_step")
    rows = {f"step {r['step']}" + (" (exported)" if r["step"] == best else ""):
            {f"dev {metric}": r[f"dev_{metric}"], **{f"@{d.removeprefix('dim')}": r[f"dev_{metric}_{d}"] for d in dims}}
            for r in evaluated}  # fmt: skip
    return _table(rows, "step")


def draw_progressive(records: list[dict], schedule, weights) -> bool:
    """beta(t) and the pace on the `schedule` axes, the query-weight range on `weights`, from a
    train stage's metrics.jsonl records; False (nothing drawn) if the run logged no beta."""
    logged = [r for r in records if "beta" in r]
    if not logged:
        return False
    steps = [r["step"] for r in logged]
    schedule.plot(steps, [r["beta"] for r in logged], label="beta(t)")
    if any("pace" in r for r in logged):
        schedule.plot(steps, [r.get("pace", float("nan")) for r in logged], label="pace")
    schedule.set_title("progressive schedule")
    for key in ("weight_min", "weight_mean", "weight_max"):
        if any(key in r for r in logged):
            weights.plot(steps, [r.get(key, float("nan")) for r in logged], label=key.removeprefix("weight_"))
    weights.set_title("query weights")
    for ax in (schedule, weights):
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=7)
    return True


def _progressive_chart(records: list[dict], path: Path) -> bool:
    """The progressive schedule as a PNG at `path`; False if the run logged none."""
    if not any("beta" in r for r in records):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (schedule, weights) = plt.subplots(1, 2, figsize=(8, 3.2))
    draw_progressive(records, schedule, weights)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_report(ctx: StageContext) -> list[str]:
    """Build report.html from the eval, train and mine artifacts; print where it is.

    The evaluation table and chart sit next to the progressive schedule (beta(t), pace, query
    weights from the train stage's metrics.jsonl) when the run used one; without eval
    (`eval.enabled: false`) the page says so."""
    config, store = ctx.config, ctx.store
    summary = read_eval_summary(store, ctx.scope.run) if config.eval.enabled else None
    mine_stats = store.read_json(ctx.key("mine", "stats.json"))
    with tempfile.TemporaryDirectory(prefix="peg-report-") as tmp:
        tmp = Path(tmp)
        images: dict[str, Path] = {}
        if summary is not None:
            images["metrics.png"] = tmp / "metrics.png"
            _metrics_chart(summary.metrics, images["metrics.png"])
        for stage, name in (("train", "training.png"), ("mine", "scores.png")):
            if store.exists(ctx.key(stage, name)):
                images[name] = store.materialise(ctx.key(stage, name), tmp)
        records = []
        if store.exists(ctx.key("train", "metrics.jsonl")):
            records = [json.loads(line) for line in store.read_text(ctx.key("train", "metrics.jsonl")).splitlines() if line]
            if _progressive_chart(records, tmp / "progressive.png"):
                images["progressive.png"] = tmp / "progressive.png"
        sections = [
            f"<h1>peg run <code>{html.escape(config.name)}</code></h1>",
            f"<p>Model <code>{html.escape(config.model.name_or_path)}</code>, loss {config.loss.kind}"
            f" (progressive: {config.loss.progressive.enabled}), {config.batch.queries_per_step} queries x "
            f"(1 + {config.batch.hard_negatives}) passages per step, {config.train.nproc_per_node} process(es), "
            f"training queries: {config.data.train_queries}.</p>",
        ]
        if summary is None:
            sections.append("<h2>Evaluation</h2><p>Not evaluated (eval.enabled is false).</p>")
        else:
            sections += [f"<h2>Evaluation ({html.escape(summary.split)} split)</h2>", _table(summary.metrics)]
        side = [_img(images[n], n.removesuffix(".png")) for n in ("metrics.png", "progressive.png") if n in images]
        if side:
            sections.append("<div style='display:flex;gap:1em;align-items:flex-start'>" + "".join(side) + "</div>")
        if "training.png" in images:
            sections += ["<h2>Training</h2>", _img(images["training.png"], "training curves")]
        dev = dev_table(records, config.train.select_metric)
        if dev:
            sections += [f"<h2>Development set during training ({html.escape(config.train.select_metric)})</h2>", dev]
        sections += [
            "<h2>Hard-negative mining</h2>",
            mining_tables(mine_stats),
        ]
        if "scores.png" in images:
            sections.append(_img(images["scores.png"], "positive vs negative scores"))
        page = (
            "<!doctype html><meta charset='utf-8'><title>peg report</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{text-align:left}"
            "img{max-width:100%;display:block}div img{min-width:0;flex:1}"
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
