"""Training metrics: a JSONL file and TensorBoard every step, a PNG summary after the run."""

from __future__ import annotations

import json
from pathlib import Path

from peg.store.files import atomic_output, write_atomically
from peg.train.telemetry import PHASES


class MetricsLog:
    """Rank 0's step log. On resume, records after the checkpoint's step are dropped first."""

    def __init__(self, output_dir: Path, resume_step: int | None):
        self.path = output_dir / "metrics.jsonl"
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
            write_atomically(self.path, "".join(line + "\n" for line in kept))
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=(resume_step or 0) + 1)
        self.file = self.path.open("a")

    def log(self, record: dict) -> None:
        """Append one step's record ({"step": int, name: float, ...}) to the JSONL and TensorBoard."""
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(name, value, record["step"])

    def close(self) -> None:
        self.file.close()
        self.writer.close()


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_metrics(metrics_path: Path, png_path: Path) -> None:
    """One panel each over steps: loss, lr, beta(t), query weights; passages/s, time split, peak memory, MFU."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    steps = [r["step"] for r in records]
    weight_keys = sorted({k for r in records for k in r if k.startswith("weight")})
    time_keys = [f"time_{name}_s" for name in PHASES]
    panels = [
        ("loss", ["loss", "infonce"]), ("learning rate", ["lr"]), ("beta(t)", ["beta"]), ("query weights", weight_keys),
        ("passages/s", ["passages_per_s"]), ("time per step (s)", ["step_s", *time_keys]),
        ("peak memory (GiB)", ["peak_memory_gib"]), ("MFU", ["mfu"]),
    ]  # fmt: skip
    fig, axes = plt.subplots(2, 4, figsize=(16, 6.4))
    for ax, (title, keys) in zip(axes.flat, panels):
        for key in keys:
            values = [r.get(key) for r in records]
            if any(v is not None for v in values):
                label = key.removeprefix("time_").removesuffix("_s") if key.startswith("time_") else key
                ax.plot(steps, [float("nan") if v is None else v for v in values], label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        if len(keys) > 1 and ax.lines:
            ax.legend(fontsize=7)
        if not ax.lines:
            ax.text(0.5, 0.5, "not used", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    with atomic_output(png_path) as out:
        fig.savefig(out, dpi=100, format="png")
    plt.close(fig)
