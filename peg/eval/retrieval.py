"""Encode, search exactly (FAISS inner product) and score a BEIR split."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from peg.config import ModelConfig
from peg.data import BeirDataset
from peg.eval.metrics import DEFAULT_K, Qrels, Run, compute_metrics, search_depth
from peg.eval.runfile import write_run
from peg.model import Encoder


@dataclass
class EvalResult:
    metrics: dict[str, float]
    run: Run
    num_queries: int
    num_passages: int

    def write(self, output_dir: str | Path, title: str = "peg eval") -> dict[str, Path]:
        """Write run.trec, metrics.json and metrics.md into `output_dir`; return their paths."""
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"run": out / "run.trec", "json": out / "metrics.json", "markdown": out / "metrics.md"}
        write_run(paths["run"], self.run)
        payload = {"metrics": self.metrics, "num_queries": self.num_queries, "num_passages": self.num_passages}
        paths["json"].write_text(json.dumps(payload, indent=2) + "\n")
        paths["markdown"].write_text(markdown_table({title: self.metrics}))
        return paths


def markdown_table(rows: dict[str, dict[str, float]]) -> str:
    """A markdown table with one row per named metrics dict and one column per measure."""
    names = list(next(iter(rows.values())).keys())
    lines = ["| model | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for label, metrics in rows.items():
        lines.append(f"| {label} | " + " | ".join(f"{metrics[n]:.4f}" for n in names) + " |")
    return "\n".join(lines) + "\n"


def search(query_emb: np.ndarray, passage_emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k: (scores [Q,k], passage indices [Q,k])."""
    index = faiss.IndexFlatIP(passage_emb.shape[1])
    index.add(np.ascontiguousarray(passage_emb, dtype=np.float32))
    return index.search(np.ascontiguousarray(query_emb, dtype=np.float32), min(k, passage_emb.shape[0]))


def truncate_embeddings(embeddings: np.ndarray, dim: int, normalize: bool) -> np.ndarray:
    """A Matryoshka prefix: the first `dim` components, L2-normalised again when `normalize` (the
    encoder normalises; the prefix of a unit vector is not one)."""
    part = np.ascontiguousarray(embeddings[:, :dim])
    if normalize:
        part = part / np.maximum(np.linalg.norm(part, axis=1, keepdims=True), 1e-12)
    return part


def evaluate_at_dims(
    query_ids: list[str],
    query_emb: np.ndarray,
    passage_ids: list[str],
    passage_emb: np.ndarray,
    qrels: Qrels,
    k_values: tuple[int, ...],
    dims: list[int],
    normalize: bool,
) -> dict[int, dict[str, float]]:
    """{dim: metrics} for each Matryoshka dimension in `dims` below the embeddings' own, largest first."""
    full = query_emb.shape[1]
    return {
        dim: evaluate_embeddings(query_ids, truncate_embeddings(query_emb, dim, normalize), passage_ids,
                                 truncate_embeddings(passage_emb, dim, normalize), qrels, k_values).metrics
        for dim in sorted((d for d in dims if d < full), reverse=True)
    }  # fmt: skip


def evaluate_embeddings(
    query_ids: list[str],
    query_emb: np.ndarray,
    passage_ids: list[str],
    passage_emb: np.ndarray,
    qrels: Qrels,
    k_values: tuple[int, ...] = DEFAULT_K,
) -> EvalResult:
    """Retrieve the top passages per query and compute the metrics at `k_values` against `qrels`."""
    scores, indices = search(query_emb, passage_emb, search_depth(k_values))
    run: Run = {
        qid: {passage_ids[j]: float(s) for j, s in zip(idx, sc) if j >= 0}
        for qid, idx, sc in zip(query_ids, indices, scores)
    }
    return EvalResult(compute_metrics(qrels, run, k_values), run, len(query_ids), len(passage_ids))


def evaluate_model(
    model: ModelConfig | Encoder,
    data: BeirDataset,
    batch_size: int = 64,
    k_values: tuple[int, ...] = DEFAULT_K,
    show_progress: bool = True,
) -> EvalResult:
    """Encode the split's queries and the whole corpus with `model`, then evaluate."""
    encoder = model if isinstance(model, Encoder) else Encoder(model)
    query_ids = list(data.queries)
    passage_ids = list(data.corpus)
    q = encoder.encode([data.queries[i] for i in query_ids], "query", batch_size, show_progress)
    p = encoder.encode([data.corpus[i].full_text for i in passage_ids], "passage", batch_size, show_progress)
    return evaluate_embeddings(query_ids, q, passage_ids, p, data.qrels, k_values)
