"""The `eval` and `export` stages: base vs fine-tuned metrics, and the published model folder."""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

import numpy as np

from peg.config import ModelConfig, RunConfig
from peg.data import BeirDataset
from peg.eval import evaluate_embeddings
from peg.eval.retrieval import EvalResult, evaluate_at_dims, markdown_table
from peg.pipeline.context import StageContext
from peg.pipeline.results import BASE, EVAL_SUMMARY, FINE_TUNED, EvalSummary, read_eval_summary
from peg.store.files import write_atomically

LABELS = {"base": BASE, "finetuned": FINE_TUNED}


def _evaluate(config: RunConfig, ctx: StageContext, data: BeirDataset) -> tuple[EvalResult, dict[int, dict[str, float]]]:
    """The metrics at the full dimension, and {dim: metrics} at each smaller `loss.matryoshka_dims` prefix."""
    from peg.runtime import encode_corpus, encode_queries

    corpus = encode_corpus(config, ctx.store, data.corpus.values(), show_progress=True)
    queries = encode_queries(config, ctx.store, data.queries, show_progress=True)
    k_values = tuple(config.eval.k_values)
    result = evaluate_embeddings(queries.ids, queries.matrix, corpus.ids, corpus.matrix, data.qrels, k_values)
    by_dim = evaluate_at_dims(queries.ids, queries.matrix, corpus.ids, corpus.matrix, data.qrels, k_values,
                              config.loss.matryoshka_dims, config.model.normalize)  # fmt: skip
    return result, by_dim


def eval_split(config: RunConfig) -> BeirDataset:
    return BeirDataset.load(config.data.beir, config.data.eval_split, allow_empty=config.data.allow_empty_passages)


def finetuned_config(ctx: StageContext, model_dir: Path) -> RunConfig:
    config = ctx.config.model_copy(deep=True)
    config.model.name_or_path = str(model_dir)
    return config


def evaluate_base_and_finetuned(ctx: StageContext) -> list[str]:
    """Evaluate the base model (embeddings cached by the encode stage) and the trained one; with
    `loss.matryoshka_dims`, each also at every smaller prefix (rows `base @128d`, `fine-tuned @128d`)."""
    from peg.runtime import ray_scope

    data = eval_split(ctx.config)
    model_dir = ctx.materialise_dir("train", "model", ctx.work_dir() / "model")
    results = {}
    with ray_scope(), tempfile.TemporaryDirectory(prefix="peg-eval-") as tmp:  # Ray only if an encode needs actors
        for name, config in (("base", ctx.config), ("finetuned", finetuned_config(ctx, model_dir))):
            result, by_dim = _evaluate(config, ctx, data)
            paths = result.write(Path(tmp) / name, title=LABELS[name])
            for path in paths.values():
                ctx.store.put_file(ctx.output_key(f"{name}/{path.name}"), path, "eval", ctx.stage_hash)
            results[LABELS[name]] = result.metrics
            results.update({f"{LABELS[name]} @{dim}d": metrics for dim, metrics in by_dim.items()})  # Matryoshka
    table = markdown_table(results)
    summary = EvalSummary(ctx.config.data.eval_split, results)
    ctx.store.put_text(ctx.output_key("metrics.md"), table, "eval", ctx.stage_hash)
    ctx.store.put_json(ctx.key(*EVAL_SUMMARY), summary.to_json(), "eval", ctx.stage_hash)
    return []



def export_model(ctx: StageContext) -> list[str]:
    """Publish the trained model as a sentence-transformers folder with a model card.

    The folder is checked before it is published: `SentenceTransformer(folder)` must give the
    same embeddings as peg's encoder on a sample of evaluation queries (of corpus passages when
    the run has no eval).
    """
    from peg.data import iter_corpus

    model_dir = ctx.materialise_dir("train", "model", ctx.work_dir() / "model")
    model = ctx.config.model
    if ctx.config.eval.enabled:
        kind, prefix, sample = "query", model.query_prefix, list(eval_split(ctx.config).queries.values())[:16]
    else:
        passages = itertools.islice(iter_corpus(ctx.config.data.beir, allow_empty=ctx.config.data.allow_empty_passages), 16)
        kind, prefix, sample = "passage", model.passage_prefix, [p.full_text for p in passages]
    check_export(model_dir, finetuned_config(ctx, model_dir).model, sample, kind, prefix)
    summary = read_eval_summary(ctx.store, ctx.scope.run) if ctx.config.eval.enabled else None
    card = model_card(ctx.config, summary)
    write_atomically(model_dir / "README.md", card)
    return ctx.put_dir("model", model_dir)


def check_export(model_dir: Path, model: ModelConfig, sample: list[str], kind: str, prefix: str | None) -> None:
    """Raise RuntimeError unless `SentenceTransformer(model_dir)` embeds `sample` as peg's encoder
    does (1e-5). Both run in fp32 on the CPU: the check is of the folder (weights, pooling,
    normalisation, prefix), and `model.cpu_backend: torch_bf16` would differ by bf16 rounding."""
    from sentence_transformers import SentenceTransformer

    from peg.model import Encoder

    ours = Encoder(model.model_copy(update={"cpu_backend": "torch_fp32"})).encode(sample, kind)
    theirs = SentenceTransformer(str(model_dir), device="cpu").encode(sample, prompt=prefix or None)
    if not np.allclose(ours, theirs, atol=1e-5):
        raise RuntimeError(f"export check failed: sentence-transformers embeddings differ from peg's by {np.abs(ours - theirs).max():.2e}")


def model_card(config: RunConfig, summary: EvalSummary | None) -> str:
    """The folder's README: provenance, usage and the eval table (`summary` None: not evaluated)."""
    card = (
        f"# {config.name}\n\n"
        f"Fine-tuned from `{config.model.name_or_path}` with peg (loss: {config.loss.kind}, "
        f"progressive: {config.loss.progressive.enabled}, training queries: {config.data.train_queries}).\n\n"
        "```python\nfrom sentence_transformers import SentenceTransformer\n"
        "model = SentenceTransformer(\"path/to/this/folder\")\n```\n\n"
    )
    if config.loss.matryoshka_dims:
        dims = sorted(config.loss.matryoshka_dims, reverse=True)
        card += (
            f"Trained with Matryoshka losses for the embedding dimensions {dims}: "
            f"`SentenceTransformer(\"path/to/this/folder\", truncate_dim={dims[-1]})` gives {dims[-1]}-d embeddings.\n\n"
        )
    if summary is None:
        return card + "Not evaluated (eval.enabled is false).\n"
    return card + f"## Evaluation ({summary.split} split)\n\n" + markdown_table(summary.metrics)
