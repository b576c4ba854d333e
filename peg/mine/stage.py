"""The `encode` and `mine` stages: BEIR train split -> embeddings -> training-pair JSONL.

Artifacts (keys under `<run name>/mine/`):

    shard-NNNNN.jsonl         training examples of query shard NNNNN (put last: the shard is done)
    shard-NNNNN.scores.jsonl  retrieval scores of its positives and negatives, per query
    shard-NNNNN.stats.json    its selection counts
    train.jsonl               all shards' examples, in query order
    retrieval_scores.jsonl    all shards' retrieval scores
    stats.json                totals: kept, dropped by rule, queries short of negatives
    scores.png                histogram of positive vs selected negative retrieval scores

Query shards run on the shared shard runner (`peg.runtime.shards`): Ray actors search the sharded
corpus index and select negatives. Off a cluster, a corpus whose texts, embeddings and index fit in
memory is mined in this process instead (`mining.placement`, decided by `run_here` and logged): the
same encoder batches, shard searchers, merge and selection with all cores and no Ray actors, so
the negatives are identical to the Ray path's. Each finished shard is put to the store at once; a rerun skips
shards already stored with the same config hash, so a stage killed midway, or with a failed shard,
redoes only what is missing.
The retrieval scores stay out of the training file: its `neg_scores` are for teacher scores.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from peg.config import ConfigError, MiningConfig, RunConfig
from peg.data import BeirDataset, DataError, TrainingExample, iter_corpus, iter_examples
from peg.data.fetch import resolve_beir
from peg.mine.select import RULES, reference_positive_score, select_negatives
from peg.runtime import EmbeddingSet, ShardedIndex, encode_corpus, encode_queries, ray_scope, ray_session
from peg.runtime.index import search_shards
from peg.runtime.sharded import ShardedStage, ShardRun, run_sharded
from peg.runtime.shards import WorkerPool, run_here
from peg.store.scope import StageScope
from peg.store import ArtifactStore

# A query shard's files; the examples file goes last: its presence marks the shard as done.
PARTS = ("scores.jsonl", "stats.json", "jsonl")


@dataclass
class MineResult:
    """What a `mine` run did: shards computed now and reused from the store, and the totals."""

    computed: list[int]
    reused: list[int]
    stats: dict
    keys: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def summary_lines(self) -> list[str]:
        """What `peg mine` prints: shards, queries, negatives kept and dropped by rule, the files written."""
        stats, mining = self.stats, self.stats["mining"]
        return [
            f"query shards: {len(self.computed)} mined, {len(self.reused)} reused; {self.seconds:.1f} s",
            f"queries: {stats['queries']:,}, negatives kept: {stats['kept']:,}, "
            f"queries short of {mining['negatives_per_query']}: {stats['queries_short']:,}",
            "dropped by rule: " + ", ".join(f"{k}={v:,}" for k, v in stats["dropped"].items()),
            f"wrote {', '.join(self.keys.values())}",
        ]


@dataclass
class EncodeResult:
    """The corpus and training-query embeddings `encode` cached in the store."""

    corpus: EmbeddingSet
    queries: EmbeddingSet

    def summary_lines(self) -> list[str]:
        return [f"{name}: {len(emb.ids):,} embeddings of dim {emb.matrix.shape[1]} at {emb.key}"
                for name, emb in (("passages", self.corpus), ("queries", self.queries))]


SYNTHETIC_SPLIT = "synthetic"


def load_train_split(config: RunConfig, scope: StageScope | None) -> BeirDataset:
    """The corpus and the training queries with their positives (`data.train_queries`).

    human: the BEIR folder's train split (first `data.max_train_queries` if set); synthetic: the
    synth stage's kept queries (`<run>/synth/train.jsonl`), each with its source passage as the one
    positive (trained on as the synth stage wrote it: with the query cut out, `positive_texts`), and
    only corpus.jsonl read from the BEIR folder; both: the two together. `scope`, the stage reading
    them, is needed only for synthetic queries.
    """
    if not config.data.beir:
        raise ConfigError("data.beir: `peg encode` / `peg mine` need a BEIR folder")
    source = config.data.train_queries
    allow_empty = config.data.allow_empty_passages
    if source == "synthetic":
        corpus = {p.id: p for p in iter_corpus(config.data.beir, allow_empty=allow_empty)}
        dataset = BeirDataset(resolve_beir(config.data.beir), SYNTHETIC_SPLIT, corpus, {}, {})
    else:
        dataset = BeirDataset.load(config.data.beir, config.data.train_split, allow_empty=allow_empty)
        if config.data.max_train_queries is not None:
            keep = list(dataset.queries)[: config.data.max_train_queries]
            dataset.queries = {q: dataset.queries[q] for q in keep}
    if source != "human":
        if scope is None:
            raise ConfigError("data.train_queries: synthetic queries are read from a run's synth stage")
        _add_synthetic_queries(dataset, scope.store, scope.key_of("synth", "train.jsonl"))
    return dataset


def _add_synthetic_queries(dataset: BeirDataset, store: ArtifactStore, key: str) -> None:
    """Add the synth stage's kept queries (ids `synth-...`) with their source passages as qrels and
    the positive texts the synth stage wrote (the passage less the query, for the generation-free
    types) as `positive_texts`, so training never pairs a query with a passage that contains it."""
    if not store.exists(key):
        raise ConfigError(f"data.train_queries: {key} is not in the store; run the synth stage first")
    with tempfile.TemporaryDirectory(prefix="peg-synth-queries-") as tmp:
        path = store.materialise(key, tmp)  # verified against its sha256, like every store read
        for example in iter_examples(path):
            unknown = [p for p in example.pos_ids or [] if p not in dataset.corpus]
            if example.query_id is None or not example.pos_ids or unknown:
                raise DataError(Path(key), None, f"synthetic query {example.query_id!r} lacks a known source passage id")
            dataset.queries[example.query_id] = example.query
            dataset.qrels[example.query_id] = dict.fromkeys(example.pos_ids, 1)
            dataset.positive_texts[example.query_id] = list(example.pos)


def run_encode(config: RunConfig, scope: StageScope, show_progress: bool = True) -> EncodeResult:
    """Encode the corpus and the training queries (cached in the store): in this process with all
    cores where `mine` would run in process too (`run_here` with `mining.placement`: `peg mine`
    then starts no Ray at all), else on Ray actors. The embeddings are the same either way."""
    dataset = load_train_split(config, scope)
    here = run_here("encode", mine_memory_bytes(config, dataset), config.mining.placement)
    with ray_scope():  # one Ray session for both, started only if one needs actors
        corpus = encode_corpus(config, scope.store, dataset.corpus.values(), show_progress, in_process=here)
        queries = encode_queries(config, scope.store, dataset.queries, show_progress, in_process=here)
    return EncodeResult(corpus, queries)


class MineProcessor:
    """Built once per Ray actor: searches a query shard on every corpus shard and selects negatives."""

    def __init__(self, searchers: list, mining: dict):
        self.searchers = searchers
        self.config = MiningConfig(**mining)

    def __call__(self, shard: int, queries: list[dict]) -> dict:
        config = self.config
        matrix = np.stack([q["vector"] for q in queries]).astype(np.float32)
        scores, rows = search_shards(self.searchers, matrix, config.top_k)
        dropped: Counter = Counter()
        records, not_selected, short = [], 0, []
        for i, q in enumerate(queries):
            selection = select_negatives(q["id"], rows[i].tolist(), scores[i].tolist(), set(q["positives"]),
                                         set(q["duplicates"]), reference_positive_score(q["positive_scores"], config), config)
            dropped.update(selection.dropped)
            not_selected += selection.not_selected
            if len(selection.rows) < config.negatives_per_query:
                short.append(q["id"])
            records.append({"neg_rows": selection.rows, "neg_scores": selection.scores})
        stats = {
            "queries": len(queries),
            "candidates": int((rows >= 0).sum()),
            "kept": sum(len(r["neg_rows"]) for r in records),
            "dropped": {rule: dropped.get(rule, 0) for rule in RULES},
            "not_selected": not_selected,
            "queries_short": len(short),
            "short_query_ids": short,
        }
        return {"records": records, "stats": stats}


def mining_queries(dataset: BeirDataset, corpus: EmbeddingSet, texts: list[str], queries: EmbeddingSet) -> list[dict]:
    """One item per query that has positives (relevance > 0): id, embedding, positive rows, the
    rows of passages with a positive's exact text (not positives themselves) and positive scores."""
    ids = [q for q in dataset.queries if any(r > 0 for r in dataset.qrels[q].values())]
    query_rows = queries.rows()
    rows_of = corpus.rows()
    rows_of_text: dict[str, list[int]] = {}
    for row, text in enumerate(texts):
        rows_of_text.setdefault(text, []).append(row)
    items = []
    for qid in ids:
        vector = queries.matrix[query_rows[qid]]
        positives = [rows_of[p] for p, r in dataset.qrels[qid].items() if r > 0]
        duplicates = sorted({d for p in positives for d in rows_of_text[texts[p]]} - set(positives))
        items.append({"id": qid, "vector": vector, "positives": positives, "duplicates": duplicates,
                      "positive_scores": (corpus.matrix[positives] @ vector).tolist()})
    return items


def mine_memory_bytes(config: RunConfig, dataset: BeirDataset) -> int:
    """Memory the mine stage holds for its corpus: the texts, the float32 embedding matrix and
    the flat index's copy of it (the model's hidden size taken as the embedding size)."""
    from transformers import AutoConfig

    from peg.model import resolve_model_path

    dim = getattr(AutoConfig.from_pretrained(resolve_model_path(config.model.name_or_path)), "hidden_size", 1024)
    texts = sum(len(p.full_text.encode()) for p in dataset.corpus.values())
    return texts + 2 * 4 * dim * len(dataset.corpus)


def run_mine(config: RunConfig, scope: StageScope, show_progress: bool = True) -> MineResult:
    """Mine hard negatives for the train split; resumable per query shard (see the module docstring)."""
    started = time.monotonic()
    dataset = load_train_split(config, scope)
    mining = config.mining
    store = scope.store
    here = run_here("mine", mine_memory_bytes(config, dataset), mining.placement)
    with contextlib.nullcontext() if here else ray_session(), tempfile.TemporaryDirectory(prefix="peg-mine-") as tmpdir:
        tmp = Path(tmpdir)
        corpus = encode_corpus(config, store, dataset.corpus.values(), show_progress, in_process=here)
        texts = [dataset.corpus[pid].full_text for pid in corpus.ids]
        # the set `peg encode` caches
        queries = encode_queries(config, store, dataset.queries, show_progress, in_process=here)
        items = mining_queries(dataset, corpus, texts, queries)
        index = ShardedIndex(
            corpus.matrix, corpus.ids, mining.num_shards, mining.index,
            actor_cpus=mining.actor_cpus, actor_gpus=mining.actor_gpus,
            ivf_nlist=mining.ivf_nlist, ivf_nprobe=mining.ivf_nprobe,
            hnsw_m=mining.hnsw_m, hnsw_ef_search=mining.hnsw_ef_search, in_process=here,
        )
        size = mining.query_shard_size
        declaration = ShardedStage(
            PARTS, partial(MineProcessor, index.actors, mining.model_dump(mode="json")),
            pool=WorkerPool(num_actors=1, actor_cpus=mining.actor_cpus), shard_size=size, unit="queries",
            to_files=lambda s, result: shard_files(result, items[s * size : (s + 1) * size], dataset, corpus, texts),
        )
        try:
            shards = run_sharded(scope, declaration, items, show_progress, in_process=here)
        finally:
            index.close()
        extra = {"queries_without_positives": len(dataset.queries) - len(items),
                 "corpus_embeddings": corpus.key, "query_embeddings": queries.key}
        stats, keys = _combine(config, shards, tmp, extra)
    return MineResult(computed=shards.computed, reused=shards.reused, stats=stats, keys=keys, seconds=time.monotonic() - started)


def _jsonl(objs) -> str:
    return "".join(json.dumps(obj, ensure_ascii=False) + "\n" for obj in objs)


def shard_files(result: dict, queries: list[dict], dataset: BeirDataset, corpus: EmbeddingSet,
                texts: list[str]) -> dict[str, str]:
    """One finished query shard's files: retrieval scores, stats and training examples."""
    examples, scores = [], []
    for q, record in zip(queries, result["records"], strict=True):
        neg_rows = record["neg_rows"]
        pos_ids = [corpus.ids[r] for r in q["positives"]]
        neg_ids = [corpus.ids[r] for r in neg_rows]
        examples.append(TrainingExample(
            query=dataset.queries[q["id"]], pos=dataset.positive_texts.get(q["id"]) or [texts[r] for r in q["positives"]],
            neg=[texts[r] for r in neg_rows],
            query_id=q["id"], pos_ids=pos_ids, neg_ids=neg_ids,
        ).to_json() + "\n")
        scores.append({"query_id": q["id"], "pos_ids": pos_ids, "pos_scores": q["positive_scores"],
                       "neg_ids": neg_ids, "neg_scores": record["neg_scores"]})
    return {"scores.jsonl": _jsonl(scores), "stats.json": json.dumps(result["stats"], indent=2) + "\n",
            "jsonl": "".join(examples)}


def _combine(config: RunConfig, shards: ShardRun, tmp: Path, extra: dict):
    """Concatenate the shards into train.jsonl / retrieval_scores.jsonl, sum stats, draw the histogram."""
    scope = shards.scope
    keys = {"train": scope.key("train.jsonl"), "scores": scope.key("retrieval_scores.jsonl"),
            "stats": scope.key("stats.json"), "histogram": scope.key("scores.png")}
    totals = {"queries": 0, "candidates": 0, "kept": 0, "dropped": Counter(), "not_selected": 0, "queries_short": 0}
    short_ids: list[str] = []
    train_path, scores_path = tmp / "train.jsonl", tmp / "retrieval_scores.jsonl"
    pos_scores, neg_scores = [], []
    train_path.write_text(shards.joined("jsonl"), encoding="utf-8")
    scores_path.write_text(shards.joined("scores.jsonl"), encoding="utf-8")
    for shard_scores, stats_text in zip(shards.texts["scores.jsonl"], shards.texts["stats.json"], strict=True):
        for line in shard_scores.splitlines():
            record = json.loads(line)
            pos_scores.extend(record["pos_scores"])
            neg_scores.extend(record["neg_scores"])
        shard_stats = json.loads(stats_text)
        for name in ("queries", "candidates", "kept", "not_selected", "queries_short"):
            totals[name] += shard_stats[name]
        totals["dropped"].update(shard_stats["dropped"])
        short_ids.extend(shard_stats["short_query_ids"])
    stats = {
        **totals,
        "dropped": {rule: totals["dropped"].get(rule, 0) for rule in RULES},
        "short_query_ids": short_ids,
        "query_shards": len(shards.computed) + len(shards.reused),
        **extra,
        "mining": config.mining.model_dump(mode="json"),
    }
    _plot_histogram(tmp / "scores.png", pos_scores, neg_scores, config.mining)
    store, config_hash = scope.store, scope.shard_hash
    store.put_json(keys["stats"], stats, producer="mine", config_hash=config_hash)
    for name, path in (("train", train_path), ("scores", scores_path), ("histogram", tmp / "scores.png")):
        store.put_file(keys[name], path, producer="mine", config_hash=config_hash)
    return stats, keys


def _plot_histogram(path: Path, pos_scores: list[float], neg_scores: list[float], mining: MiningConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    values = pos_scores + neg_scores
    bins = np.linspace(min(values), max(values), 51) if values else 50
    ax.hist(pos_scores, bins=bins, alpha=0.6, label=f"positives ({len(pos_scores)})")
    ax.hist(neg_scores, bins=bins, alpha=0.6, label=f"selected negatives ({len(neg_scores)})")
    ax.set_xlabel("retrieval score s(q, d)")
    ax.set_ylabel("count")
    ax.set_title(f"mined negatives: {mining.selection}, {mining.negatives_per_query} per query")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
