"""Evaluation during training: the dev set, its scoring and the best-checkpoint record.

The dev set (`dev_set`) is either a named qrels split of `data.beir` (`data.dev_split`) or
`data.dev_queries` queries of `data.train_split` held out by `train.seed`; held-out queries'
training examples are left out of training (matched by query text, `BatchPlan` / `PairFile`).
The corpus is the whole `data.beir` corpus. In a pipeline run `data.beir` is the local copy of
what `prepare` put in the store, so a pod reads the dev set from the store.

`dev_metrics` is `peg eval`'s metrics code (`peg.eval.evaluate_embeddings`, trec_eval) on the
dev set; with Matryoshka dimensions each prefix (L2-normalised again when the encoder
normalises) is scored too, reported as `<metric>_dim<d>`.

`BestRecord` is `best.json` in the training output folder: the step whose dev score on
`train.select_metric` is the best so far, its metrics and the folder holding that model. It is
written atomically after the model folder is complete, so a kill -9 at any moment leaves a
record that names a complete model; `--resume` reads it back.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from peg.config import RunConfig
from peg.data import iter_corpus
from peg.data.beir import load_qrels, load_queries
from peg.data.fetch import resolve_beir
from peg.errors import PegError
from peg.eval import evaluate_embeddings
from peg.eval.retrieval import evaluate_at_dims
from peg.model.encoder import Encoder
from peg.store.files import write_atomically

BEST_RECORD = "best.json"


class DevSetError(PegError, ValueError):
    """A dev set that cannot be built from the configured data."""

    bad_input = True


@dataclass(frozen=True)
class DevSet:
    """Dev queries {id: text}, their qrels, and the query texts held out of the training data."""

    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    held_out: frozenset[str] = frozenset()


def dev_set(config: RunConfig) -> DevSet | None:
    """The configured dev set, or None when `train.eval_every` is unset (no evaluation)."""
    d = config.data
    if config.train.eval_every is None:
        return None
    folder = resolve_beir(d.beir)
    queries = load_queries(folder)
    if d.dev_split is not None:
        qrels = load_qrels(folder, d.dev_split)
        return DevSet({q: queries[q] for q in qrels if q in queries}, qrels)
    qrels = load_qrels(folder, d.train_split)
    candidates = sorted(q for q in qrels if q in queries)
    if d.dev_queries >= len(candidates):
        raise DevSetError(
            f"data.dev_queries ({d.dev_queries}) must be below the {len(candidates)} queries of split "
            f"'{d.train_split}' (some must stay for training); lower it or name data.dev_split"
        )
    chosen = sorted(random.Random(f"dev:{config.train.seed}").sample(candidates, d.dev_queries))
    picked = {q: queries[q] for q in chosen}
    return DevSet(picked, {q: qrels[q] for q in chosen}, frozenset(picked.values()))


def dev_plan_identity(config: RunConfig) -> dict:
    """What the dev set changes in the training data, for a checkpoint's plan (empty: nothing)."""
    if config.train.eval_every is None or config.data.dev_split is not None:
        return {}
    return {"data.dev_queries held out of data.train_split": config.data.dev_queries}


def load_dev_corpus(config: RunConfig) -> tuple[list[str], list[str]]:
    """(passage ids, passage texts) of the whole `data.beir` corpus."""
    passages = list(iter_corpus(resolve_beir(config.data.beir), allow_empty=config.data.allow_empty_passages))
    return [p.id for p in passages], [p.full_text for p in passages]


def encode_dev_share(
    encoder: Encoder, dev: DevSet, corpus: tuple[list[str], list[str]], batch_size: int, rank: int = 0, world: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """This rank's contiguous share of the dev queries' and the corpus's embeddings (rank r of w
    takes items [r*n//w, (r+1)*n//w)): the shares of ranks 0..w-1, concatenated in rank order,
    are the embeddings of every dev query (in `dev.queries` order) and every passage."""

    def share(items: list[str]) -> list[str]:
        return items[rank * len(items) // world:(rank + 1) * len(items) // world]

    queries = [dev.queries[i] for i in dev.queries]
    return encoder.encode(share(queries), "query", batch_size), encoder.encode(share(corpus[1]), "passage", batch_size)


def dev_metrics(
    dev: DevSet,
    query_embeddings: np.ndarray,
    passage_ids: list[str],
    passage_embeddings: np.ndarray,
    k_values: tuple[int, ...],
    matryoshka_dims: list[int],
    normalize: bool,
) -> dict[str, float]:
    """`dev_<metric>` at the full dimension and `dev_<metric>_dim<d>` for each smaller Matryoshka prefix."""
    query_ids, q, p = list(dev.queries), query_embeddings, passage_embeddings
    metrics = evaluate_embeddings(query_ids, q, passage_ids, p, dev.qrels, k_values).metrics
    out = {f"dev_{name}": value for name, value in metrics.items()}
    by_dim = evaluate_at_dims(query_ids, q, passage_ids, p, dev.qrels, k_values, matryoshka_dims, normalize)
    for dim, metrics in by_dim.items():
        out.update({f"dev_{name}_dim{dim}": value for name, value in metrics.items()})
    return out


@dataclass
class BestRecord:
    """The best dev evaluation so far (`best.json`)."""

    step: int
    metric: str
    value: float
    model: str  # folder name under the output folder
    metrics: dict[str, float] = field(default_factory=dict)

    def improves_on(self, other: BestRecord | None) -> bool:
        return other is None or self.value > other.value

    def write(self, output_dir: Path) -> None:
        write_atomically(output_dir / BEST_RECORD, json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, output_dir: Path) -> BestRecord | None:
        """The record in `output_dir`, or None without one or when its model folder is gone."""
        path = output_dir / BEST_RECORD
        if not path.is_file():
            return None
        record = cls(**json.loads(path.read_text()))
        return record if (output_dir / record.model).is_dir() else None
