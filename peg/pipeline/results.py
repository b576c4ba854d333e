"""A finished run's results, and the one place that knows their layout.

- The eval summary, `<run>/eval/summary.json`: `{"split": ..., "metrics": {row: {metric: value}}}`
  with rows `base` and `fine-tuned` (and `base @128d`-style rows for Matryoshka prefixes). The
  eval stage writes it (`EvalSummary.to_json`); the export's model card, the report, the last
  lines of `peg pipeline run` and the operator read it (`read_eval_summary`).
- The report page, `<run>/report/report.html`, and the exported model folder, `<run>/export/model/`.
"""

from __future__ import annotations

from dataclasses import dataclass

from peg.config import RunConfig
from peg.store import ArtifactStore, artifact_key

BASE, FINE_TUNED = "base", "fine-tuned"  # the summary's rows of the two models
EVAL_SUMMARY = ("eval", "summary.json")
REPORT_PAGE = ("report", "report.html")
EXPORTED_MODEL = ("export", "model")


def result_key(run: str, where: tuple[str, str]) -> str:
    """The key of a result of run `run`: `result_key(run, EVAL_SUMMARY)`."""
    return artifact_key(run, *where)


@dataclass(frozen=True)
class EvalSummary:
    split: str
    metrics: dict[str, dict[str, float]]  # row (BASE, FINE_TUNED, "base @128d", ...) -> metric -> value

    def to_json(self) -> dict:
        return {"split": self.split, "metrics": self.metrics}

    @classmethod
    def from_json(cls, data: dict) -> EvalSummary:
        return cls(data["split"], data["metrics"])

    def ndcg_change(self) -> str:
        """One line: nDCG@10 of the base and the fine-tuned model and the change."""
        base, tuned = self.metrics[BASE]["ndcg@10"], self.metrics[FINE_TUNED]["ndcg@10"]
        return f"nDCG@10 on {self.split}: base {base:.4f} -> fine-tuned {tuned:.4f} ({tuned - base:+.4f})"


def read_eval_summary(store: ArtifactStore, run: str) -> EvalSummary:
    """The eval stage's summary of run `run`, verified."""
    return EvalSummary.from_json(store.read_json(result_key(run, EVAL_SUMMARY)))


def result_lines(config: RunConfig, store: ArtifactStore) -> list[str]:
    """What a finished pipeline shows its user: the metrics table, the nDCG@10 change and where
    the exported model and the report are (none of it before the eval stage's summary exists)."""
    if not store.exists(result_key(config.name, EVAL_SUMMARY)):
        return []
    from peg.eval.retrieval import markdown_table

    summary = read_eval_summary(store, config.name)
    lines = [markdown_table(summary.metrics).rstrip("\n"), summary.ndcg_change()]
    model_folder = result_key(config.name, EXPORTED_MODEL)
    for label, key, shown in (("model", f"{model_folder}/modules.json", model_folder + "/"),
                              ("report", result_key(config.name, REPORT_PAGE), result_key(config.name, REPORT_PAGE))):
        if store.exists(key):
            local = store.local_path(key)
            where = (local.parent if label == "model" else local) if local else f"{config.store.uri.rstrip('/')}/{shown}"
            lines.append(f"{label}: {where}")
    return lines
