"""The `encode` and `mine` stages: BEIR train split -> embeddings -> training-pair JSONL.

Artifacts (keys under `<run name>/mine/`):

    shard-NNNNN.jsonl         training examples of query shard NNNNN (put last: the shard is done)
    shard-NNNNN.scores.jsonl  retrieval scores of its positives and negatives, per query
    shard-NNNNN.stats.json    its selection counts
    train.jsonl               all shards' examples, in query order
    retrieval_scores.jsonl    all shards' retrieval scores
    stats.json                totals: kept, dropped by rule, queries short of negatives
    scores.png                histogram of positive vs selected negative retrieval scores

Query shards run as Ray tasks that search the sharded corpus index and select negatives. Each
finished shard is put to the store at once; a rerun skips shards already stored with the same
config hash, so a stage killed midway, or with a failed shard, redoes only what is missing.
The retrieval scores stay out of the training file: its `neg_scores` are for teacher scores.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray

from peg.errors import PegError
from peg.config import ConfigError, MiningConfig, RunConfig
from peg.data import BeirDataset, TrainingExample, write_examples
from peg.mine.encode import EmbeddingSet, encode_corpus, encode_queries
from peg.mine.search import ShardedIndex, search_shards
from peg.mine.select import RULES, select_negatives
from peg.mine.session import ray_session
from peg.progress import progress_bar
from peg.store import ArtifactStore

# Fault injection for tests and drills: comma-separated query shard numbers whose Ray task raises.
FAIL_SHARDS_ENV = "PEG_MINE_FAIL_SHARDS"


class MiningError(PegError, RuntimeError):
    """One or more query shards failed; `failed` maps shard number -> error text."""

    def __init__(self, failed: dict[int, str], stored: int):
        self.failed = failed
        lines = [f"query shard {s:05d} failed: {err}" for s, err in sorted(failed.items())]
        super().__init__(
            "\n".join(lines) + f"\n{stored} other shard(s) are stored; rerun `peg mine` to redo only the failed shard(s)"
        )


@dataclass
class MineResult:
    """What a `mine` run did: shards computed now and reused from the store, and the totals."""

    computed: list[int]
    reused: list[int]
    stats: dict
    keys: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def load_train_split(config: RunConfig) -> BeirDataset:
    """The BEIR folder's train split (config.data.beir, config.data.train_split), first N queries if set."""
    if not config.data.beir:
        raise ConfigError("data.beir: `peg encode` / `peg mine` need a BEIR folder")
    dataset = BeirDataset.load(config.data.beir, config.data.train_split)
    if config.data.max_train_queries is not None:
        keep = list(dataset.queries)[: config.data.max_train_queries]
        dataset.queries = {q: dataset.queries[q] for q in keep}
    return dataset


def run_encode(config: RunConfig, store: ArtifactStore, show_progress: bool = True) -> tuple[EmbeddingSet, EmbeddingSet]:
    """Encode the corpus and the train-split queries (cached in the store)."""
    dataset = load_train_split(config)
    with ray_session():
        corpus = encode_corpus(config, store, dataset.corpus.values(), show_progress)
        queries = encode_queries(config, store, dataset.queries, show_progress)
    return corpus, queries


def _mine_shard(shard: int, queries: np.ndarray, query_ids: list[str], positives: list[list[int]],
                duplicates: list[list[int]], min_positive: list[float], actors: list, mining: dict,
                fail: bool) -> dict:
    """Ray task: search one query shard on every corpus shard and select its negatives."""
    if fail:
        raise RuntimeError(f"injected failure ({FAIL_SHARDS_ENV}) in query shard {shard:05d}")
    config = MiningConfig(**mining)
    scores, rows = search_shards(actors, queries, config.top_k)
    dropped: Counter = Counter()
    records, not_selected, short = [], 0, []
    for i, qid in enumerate(query_ids):
        selection = select_negatives(
            qid, rows[i].tolist(), scores[i].tolist(), set(positives[i]), set(duplicates[i]), min_positive[i], config
        )
        dropped.update(selection.dropped)
        not_selected += selection.not_selected
        if len(selection.rows) < config.negatives_per_query:
            short.append(qid)
        records.append({"query_id": qid, "neg_rows": selection.rows, "neg_scores": selection.scores})
    stats = {
        "queries": len(query_ids),
        "candidates": int((rows >= 0).sum()),
        "kept": sum(len(r["neg_rows"]) for r in records),
        "dropped": {rule: dropped.get(rule, 0) for rule in RULES},
        "not_selected": not_selected,
        "queries_short": len(short),
        "short_query_ids": short,
    }
    return {"records": records, "stats": stats}


def _shard_keys(config: RunConfig, shard: int) -> dict[str, str]:
    base = f"{config.name}/mine/shard-{shard:05d}"
    # The examples file goes last: its presence marks the shard as done.
    return {"scores": f"{base}.scores.jsonl", "stats": f"{base}.stats.json", "examples": f"{base}.jsonl"}


def _is_stored(store: ArtifactStore, keys: dict[str, str], config_hash: str) -> bool:
    for key in keys.values():
        manifest = store.manifest(key) if store.exists(key) else None
        if manifest is None or manifest.config_hash != config_hash:
            return False
    return True


def _failed_shards_from_env() -> set[int]:
    value = os.environ.get(FAIL_SHARDS_ENV, "").strip()
    try:
        return {int(s) for s in value.split(",") if s.strip()}
    except ValueError:
        raise ConfigError(f"{FAIL_SHARDS_ENV}={value!r}: expected comma-separated shard numbers") from None


def _write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj, indent=2) + "\n")
    return path


def _write_jsonl(path: Path, objs) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for obj in objs:
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
    return path


@dataclass
class MiningQueries:
    """The queries that have positives, aligned lists: ids, embeddings, positive rows and scores."""

    ids: list[str]
    matrix: np.ndarray
    positives: list[list[int]]  # corpus rows of each query's positives
    duplicates: list[list[int]]  # corpus rows with a positive's exact text (not positives themselves)
    positive_scores: list[list[float]]

    def shard(self, shard: int, size: int) -> MiningQueries:
        span = slice(shard * size, (shard + 1) * size)
        return MiningQueries(self.ids[span], self.matrix[span], self.positives[span], self.duplicates[span],
                             self.positive_scores[span])


def mining_queries(dataset: BeirDataset, corpus: EmbeddingSet, texts: list[str], queries: EmbeddingSet) -> MiningQueries:
    """Positives (relevance > 0), their exact-text duplicates and scores, for each query that has positives."""
    ids = [q for q in dataset.queries if any(r > 0 for r in dataset.qrels[q].values())]
    matrix = queries.matrix[[queries.rows()[q] for q in ids]]
    rows_of = corpus.rows()
    rows_of_text: dict[str, list[int]] = {}
    for row, text in enumerate(texts):
        rows_of_text.setdefault(text, []).append(row)
    positives = [[rows_of[p] for p, r in dataset.qrels[q].items() if r > 0] for q in ids]
    duplicates = [sorted({d for p in pos for d in rows_of_text[texts[p]]} - set(pos)) for pos in positives]
    scores = [(corpus.matrix[pos] @ matrix[i]).tolist() for i, pos in enumerate(positives)]
    return MiningQueries(ids, matrix, positives, duplicates, scores)


def run_mine(config: RunConfig, store: ArtifactStore, show_progress: bool = True) -> MineResult:
    """Mine hard negatives for the train split; resumable per query shard (see the module docstring)."""
    started = time.monotonic()
    dataset = load_train_split(config)
    config_hash = config.stage_config_hash("mine")
    with ray_session(), tempfile.TemporaryDirectory(prefix="peg-mine-") as tmpdir:
        tmp = Path(tmpdir)
        corpus = encode_corpus(config, store, dataset.corpus.values(), show_progress)
        texts = [dataset.corpus[pid].full_text for pid in corpus.ids]
        queries = encode_queries(config, store, dataset.queries, show_progress)  # the set `peg encode` caches
        table = mining_queries(dataset, corpus, texts, queries)

        size = config.mining.query_shard_size
        shards = list(range((len(table.ids) + size - 1) // size))
        reused = [s for s in shards if _is_stored(store, _shard_keys(config, s), config_hash)]
        todo = [s for s in shards if s not in reused]
        if todo:
            failed = _mine_shards(config, store, todo, table, dataset, corpus, texts, config_hash, tmp, show_progress)
            if failed:
                raise MiningError(failed, stored=len(shards) - len(failed))
        extra = {"queries_without_positives": len(dataset.queries) - len(table.ids),
                 "corpus_embeddings": corpus.key, "query_embeddings": queries.key}
        stats, keys = _combine(config, store, shards, config_hash, tmp, extra)
    return MineResult(computed=todo, reused=reused, stats=stats, keys=keys, seconds=time.monotonic() - started)


def _mine_shards(config: RunConfig, store: ArtifactStore, todo: list[int], table: MiningQueries, dataset: BeirDataset,
                 corpus: EmbeddingSet, texts: list[str], config_hash: str, tmp: Path, show_progress: bool) -> dict[int, str]:
    """Run the `todo` query shards as Ray tasks, storing each as it finishes; returns {shard: error} of failures."""
    mining = config.mining
    fail_shards = _failed_shards_from_env()
    size = mining.query_shard_size
    index = ShardedIndex(
        corpus.matrix, corpus.ids, mining.num_shards, mining.index,
        actor_cpus=mining.actor_cpus, actor_gpus=mining.actor_gpus,
        ivf_nlist=mining.ivf_nlist, ivf_nprobe=mining.ivf_nprobe,
        hnsw_m=mining.hnsw_m, hnsw_ef_search=mining.hnsw_ef_search,
    )
    failed: dict[int, str] = {}
    try:
        task = ray.remote(num_cpus=mining.actor_cpus, max_retries=0)(_mine_shard)
        pending = {}
        for s in todo:
            part = table.shard(s, size)
            ref = task.remote(s, part.matrix, part.ids, part.positives, part.duplicates,
                              [min(scores) for scores in part.positive_scores], index.actors,
                              mining.model_dump(mode="json"), s in fail_shards)
            pending[ref] = s
        total = sum(len(table.shard(s, size).ids) for s in todo)
        with progress_bar(total, "mine query shards", enabled=show_progress, unit="queries") as advance:
            while pending:
                [ref], _ = ray.wait(list(pending), num_returns=1)
                s = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as e:  # a Ray task/actor failure: record it, finish the other shards
                    failed[s] = _root_cause(e)
                    continue
                _store_shard(config, store, s, result, dataset, table.shard(s, size), corpus, texts, config_hash, tmp)
                advance(len(result["records"]))
    finally:
        index.close()
    return failed


def _root_cause(error: Exception) -> str:
    """The innermost error of a Ray task failure, one line: 'Type: message'."""
    cause = getattr(error, "cause", None) or error
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}".rstrip(": ")


def _store_shard(config: RunConfig, store: ArtifactStore, shard: int, result: dict, dataset: BeirDataset,
                 part: MiningQueries, corpus: EmbeddingSet, texts: list[str], config_hash: str, tmp: Path) -> None:
    """Write one finished query shard's examples, retrieval scores and stats, and put them (examples last)."""
    keys = _shard_keys(config, shard)
    examples, scores = [], []
    for qid, pos, pos_scores, record in zip(part.ids, part.positives, part.positive_scores, result["records"], strict=True):
        neg_rows = record["neg_rows"]
        examples.append(TrainingExample(
            query=dataset.queries[qid],
            pos=[texts[r] for r in pos],
            neg=[texts[r] for r in neg_rows],
            query_id=qid,
            pos_ids=[corpus.ids[r] for r in pos],
            neg_ids=[corpus.ids[r] for r in neg_rows],
        ))
        scores.append({"query_id": qid, "pos_ids": [corpus.ids[r] for r in pos], "pos_scores": pos_scores,
                       "neg_ids": [corpus.ids[r] for r in neg_rows], "neg_scores": record["neg_scores"]})
    files = {
        "scores": _write_jsonl(tmp / "scores.jsonl", scores),
        "stats": _write_json(tmp / "stats.json", result["stats"]),
    }
    write_examples(tmp / "examples.jsonl", examples)
    files["examples"] = tmp / "examples.jsonl"
    for part in ("scores", "stats", "examples"):
        store.put_file(keys[part], files[part], producer="mine", config_hash=config_hash)


def _combine(config: RunConfig, store: ArtifactStore, shards: list[int], config_hash: str, tmp: Path, extra: dict):
    """Concatenate the shards into train.jsonl / retrieval_scores.jsonl, sum stats, draw the histogram."""
    base = f"{config.name}/mine"
    keys = {"train": f"{base}/train.jsonl", "scores": f"{base}/retrieval_scores.jsonl",
            "stats": f"{base}/stats.json", "histogram": f"{base}/scores.png"}
    totals = {"queries": 0, "candidates": 0, "kept": 0, "dropped": Counter(), "not_selected": 0, "queries_short": 0}
    short_ids: list[str] = []
    train_path, scores_path = tmp / "train.jsonl", tmp / "retrieval_scores.jsonl"
    pos_scores, neg_scores = [], []
    with train_path.open("w", encoding="utf-8") as train, scores_path.open("w", encoding="utf-8") as all_scores:
        for s in shards:
            keys_s = _shard_keys(config, s)
            train.write(store.read_text(keys_s["examples"]))
            shard_scores = store.read_text(keys_s["scores"])
            all_scores.write(shard_scores)
            for line in shard_scores.splitlines():
                record = json.loads(line)
                pos_scores.extend(record["pos_scores"])
                neg_scores.extend(record["neg_scores"])
            shard_stats = store.read_json(keys_s["stats"])
            for name in ("queries", "candidates", "kept", "not_selected", "queries_short"):
                totals[name] += shard_stats[name]
            totals["dropped"].update(shard_stats["dropped"])
            short_ids.extend(shard_stats["short_query_ids"])
    stats = {
        **totals,
        "dropped": {rule: totals["dropped"].get(rule, 0) for rule in RULES},
        "short_query_ids": short_ids,
        "query_shards": len(shards),
        **extra,
        "mining": config.mining.model_dump(mode="json"),
    }
    _plot_histogram(tmp / "scores.png", pos_scores, neg_scores, config.mining)
    _write_json(tmp / "stats.json", stats)
    for name, path in (("train", train_path), ("scores", scores_path), ("stats", tmp / "stats.json"),
                       ("histogram", tmp / "scores.png")):
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
