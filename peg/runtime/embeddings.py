"""The embedding cache: corpus and query encoding on Ray Data, stored by model + data hash.

Texts are sorted by length (longest first, within each stored shard) so every batch pads to
similar lengths, then streamed through a pool of encoder actors (`map_batches` with a callable
class). Fewer texts than `encode.in_process_below` are encoded in the calling process instead, in
the same batches: an actor pool costs seconds to start (a worker process, imports, the model) and
pays off only with work to spread. Embeddings are stored in shards of `encode.shard_size` rows, each an `.npz` holding
`ids` and `embeddings`, under

    encode/<kind>-<cache key>/shard-NNNNN.npz
    encode/<kind>-<cache key>/index.json      (written last: the set is complete)

The keys carry no run name: every run in the same store shares the cache. The cache key hashes
the model's identity (the sha256 of its config, tokenizer and weight files), the pooling /
normalisation / prefix / max-length settings for this kind of text and the (id, text) sequence.
A second call with the same inputs reads the shards and runs no model; an interrupted call
re-encodes only the shards that are missing.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from peg.config import ModelConfig, RunConfig
from peg.data import DataError, Passage, iter_corpus
from peg.model import Encoder, clip_text, resolve_model_path
from peg.progress import progress_bar
from peg.runtime.session import ray_session
from peg.store import ArtifactStore
from peg.store.files import file_sha256
from peg.store.keys import EMBEDDING_CACHE

Kind = Literal["query", "passage"]

# Files that define a model's behaviour; anything else in its folder (README, ONNX exports) is not hashed.
_MODEL_FILE_SUFFIXES = {".json", ".txt", ".model", ".safetensors", ".bin", ".py"}


@dataclass
class EmbeddingSet:
    """Embeddings `matrix[i]` (float32) of the text with id `ids[i]`; `key` is its store folder."""

    ids: list[str]
    matrix: np.ndarray
    key: str

    def rows(self) -> dict[str, int]:
        """id -> row index."""
        return {pid: i for i, pid in enumerate(self.ids)}


_file_digests: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    stat = path.stat()
    cache_key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if cache_key not in _file_digests:
        _file_digests[cache_key] = file_sha256(path)[1]
    return _file_digests[cache_key]


def model_identity(model: ModelConfig) -> str:
    """sha256 over the model folder's config, tokenizer and weight files (or the hub id if not local)."""
    path = Path(resolve_model_path(model.name_or_path))
    h = hashlib.sha256()
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in _MODEL_FILE_SUFFIXES)
        for f in files:
            h.update(f"{f.relative_to(path).as_posix()}\0{_file_sha256(f)}\n".encode())
    else:
        h.update(f"hub:{model.name_or_path}".encode())
    return h.hexdigest()


def encoding_settings(model: ModelConfig, kind: Kind) -> dict:
    """The model settings that change a `kind` text's embedding."""
    return {
        "kind": kind,
        "pooling": model.pooling,
        "normalize": model.normalize,
        "prefix": model.query_prefix if kind == "query" else model.passage_prefix,
        "max_length": model.query_max_length if kind == "query" else model.passage_max_length,
    }


def data_digest(ids: Sequence[str], texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for pid, text in zip(ids, texts, strict=True):
        h.update(pid.encode())
        h.update(b"\0")
        h.update(text.encode())
        h.update(b"\0")
    return h.hexdigest()


def cache_key(model: ModelConfig, kind: Kind, ids: Sequence[str], texts: Sequence[str]) -> str:
    payload = json.dumps(
        {"model": model_identity(model), "settings": encoding_settings(model, kind), "data": data_digest(ids, texts)},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def model_folder_files(folder: Path) -> dict[str, bytes]:
    """Every file of a local model folder, by its path relative to the folder."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class _EncoderActor:
    """Ray Data callable class: one model per actor, batches of {row, text} -> {row, embedding}.

    `model_files` (a Ray object of `model_folder_files`): the driver's local model folder, shipped
    because the actor may run on another node (a worker pod), where that path does not exist; the
    actor writes it under its own temporary folder and loads it from there."""

    def __init__(self, model: dict, kind: Kind, threads: int, model_files=None):
        import torch

        torch.set_num_threads(threads)
        self.kind = kind
        if model_files is not None and not Path(model["name_or_path"]).is_dir():
            import ray

            folder = Path(tempfile.mkdtemp(prefix="peg-model-"))
            files = model_files if isinstance(model_files, dict) else ray.get(model_files)
            for relative, content in files.items():
                (folder / relative).parent.mkdir(parents=True, exist_ok=True)
                (folder / relative).write_bytes(content)
            model = {**model, "name_or_path": str(folder)}
        self.encoder = Encoder(ModelConfig(**model))
        if torch.cuda.is_available():
            self.encoder.to("cuda")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [str(t) for t in batch["text"]]
        embeddings = self.encoder.encode(texts, self.kind, batch_size=max(1, len(texts)))
        return {"row": batch["row"], "embedding": embeddings}


def _shard_key(folder: str, shard: int) -> str:
    return f"{folder}/shard-{shard:05d}.npz"


def _made_here(store: ArtifactStore, key: str, digest: str) -> bool:
    """True if the shard exists and its manifest says it was encoded for cache key `digest` (the
    model, settings and texts): a shard put there by anything else is never read, but redone."""
    manifest = store.manifest(key)
    return manifest is not None and store.exists(key) and manifest.config_hash == digest


def _read_shard(store: ArtifactStore, key: str, tmp: Path) -> tuple[list[str], np.ndarray]:
    with np.load(store.materialise(key, tmp), allow_pickle=False) as data:
        return [str(i) for i in data["ids"]], np.asarray(data["embeddings"], dtype=np.float32)


def encode_texts(
    config: RunConfig,
    store: ArtifactStore,
    ids: Sequence[str],
    texts: Sequence[str],
    kind: Kind,
    show_progress: bool = False,
    in_process: bool = False,
) -> EmbeddingSet:
    """Embed `texts` (ids aligned) with `config.model` on Ray actors (in this process with
    `in_process`, or below `encode.in_process_below` texts), or read them from the cache.
    Each text is first cut to what the model reads (`clip_text`), so a huge text costs no more
    than one of that length and its cache key does not depend on what the model never sees."""
    max_length = config.model.query_max_length if kind == "query" else config.model.passage_max_length
    ids, texts = list(ids), [clip_text(t, max_length) for t in texts]
    if len(ids) != len(texts):
        raise ValueError(f"{len(ids)} ids for {len(texts)} texts")
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate {kind} ids")
    digest = cache_key(config.model, kind, ids, texts)
    folder = f"{EMBEDDING_CACHE}/{kind}-{digest}"
    index_key = f"{folder}/index.json"
    shard_size = config.encode.shard_size
    num_shards = math.ceil(len(ids) / shard_size)
    with tempfile.TemporaryDirectory(prefix="peg-encode-") as tmpdir:
        tmp = Path(tmpdir)
        missing = [s for s in range(num_shards) if not _made_here(store, _shard_key(folder, s), digest)]
        if missing:
            _encode_shards(config, store, folder, digest, ids, texts, kind, missing, tmp, show_progress, in_process)
        matrix: np.ndarray | None = None
        for shard in range(num_shards):
            shard_ids, emb = _read_shard(store, _shard_key(folder, shard), tmp)
            start = shard * shard_size
            if shard_ids != ids[start : start + shard_size]:
                raise DataError(_shard_key(folder, shard), None, "stored embedding ids do not match the input ids")
            if matrix is None:
                matrix = np.empty((len(ids), emb.shape[1]), dtype=np.float32)
            matrix[start : start + len(shard_ids)] = emb
        if not store.exists(index_key):
            index = {
                "kind": kind,
                "count": len(ids),
                "dim": 0 if matrix is None else int(matrix.shape[1]),
                "shards": [_shard_key(folder, s) for s in range(num_shards)],
                "model": config.model.name_or_path,
                "model_sha256": model_identity(config.model),
                "settings": encoding_settings(config.model, kind),
                "data_sha256": data_digest(ids, texts),
            }
            store.put_json(index_key, index, producer="encode", config_hash=digest)
    if matrix is None:
        matrix = np.empty((0, 0), dtype=np.float32)
    return EmbeddingSet(ids, matrix, folder)


def _embedded_here(config: RunConfig, items: list[dict], kind: Kind) -> Iterator[tuple[list[int], np.ndarray]]:
    """(rows, embeddings) per batch of `items` (already sorted by length), encoded in this process."""
    import torch

    encoder = Encoder(config.model)
    if torch.cuda.is_available():
        encoder.to("cuda")
    size = config.encode.batch_size
    for start in range(0, len(items), size):
        batch = items[start : start + size]
        yield [item["row"] for item in batch], encoder.encode([item["text"] for item in batch], kind, batch_size=len(batch))


def _embedded_on_ray(config: RunConfig, items: list[dict], kind: Kind) -> Iterator[tuple[list[int], np.ndarray]]:
    """(rows, embeddings) per batch of `items`, encoded by a pool of Ray actors."""
    import ray

    batch_size = config.encode.batch_size
    with ray_session():
        ray.data.DataContext.get_current().enable_progress_bars = False
        gpus = config.encode.actor_gpus
        actors = config.encode.num_actors
        if gpus == 0 and ray.cluster_resources().get("GPU", 0) >= 1:
            gpus, actors = 1.0, min(actors, int(ray.cluster_resources()["GPU"]))
        dataset = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // batch_size, 2000)))
        local = Path(config.model.name_or_path)
        several_nodes = sum(1 for node in ray.nodes() if node.get("Alive")) > 1
        embedded = dataset.map_batches(
            _EncoderActor,
            fn_constructor_kwargs={
                "model": config.model.model_dump(),
                "kind": kind,
                "threads": max(1, round(config.encode.actor_cpus)),
                # a trained model in this node's work folder: actors on other nodes get its files
                "model_files": ray.put(model_folder_files(local)) if several_nodes and local.is_dir() else None,
            },
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=config.encode.actor_cpus,
            num_gpus=gpus or None,
        )
        for batch in embedded.iter_batches(batch_size=None, batch_format="numpy"):
            yield batch["row"].tolist(), batch["embedding"]


def _encode_shards(
    config: RunConfig,
    store: ArtifactStore,
    folder: str,
    digest: str,
    ids: list[str],
    texts: list[str],
    kind: Kind,
    shards: list[int],
    tmp: Path,
    show_progress: bool,
    in_process: bool,
) -> None:
    """Encode the rows of `shards` in one pass (Ray actors, or this process with `in_process` or
    for few rows); put each shard as soon as it is complete."""
    size = config.encode.shard_size
    items: list[dict] = []
    remaining: dict[int, int] = {}
    for shard in shards:
        rows = range(shard * size, min(len(ids), (shard + 1) * size))
        remaining[shard] = len(rows)
        items.extend({"row": r, "text": texts[r]} for r in sorted(rows, key=lambda r: -len(texts[r])))
    buffers: dict[int, np.ndarray] = {}
    here = in_process or len(items) < config.encode.in_process_below
    batches = (_embedded_here if here else _embedded_on_ray)(config, items, kind)
    plural = "queries" if kind == "query" else "passages"
    with progress_bar(len(items), f"encode {plural}", enabled=show_progress, unit=plural) as advance:
        for rows, embeddings in batches:
            for row, emb in zip(rows, embeddings, strict=True):
                shard = row // size
                start = shard * size
                if shard not in buffers:
                    buffers[shard] = np.empty((min(len(ids), start + size) - start, len(emb)), np.float32)
                buffers[shard][row - start] = emb
                remaining[shard] -= 1
                if remaining[shard] == 0:
                    shard_ids = ids[start : start + size]
                    _put_shard(store, folder, digest, shard, shard_ids, buffers.pop(shard), tmp)
            advance(len(rows))
    if any(remaining.values()):
        raise RuntimeError(f"encoding returned too few rows for shards {[s for s, n in remaining.items() if n]}")


def _put_shard(store: ArtifactStore, folder: str, digest: str, shard: int, ids: list[str], emb: np.ndarray, tmp: Path) -> None:
    path = tmp / f"shard-{shard:05d}.npz"
    with path.open("wb") as f:
        np.savez(f, ids=np.asarray(ids, dtype=str), embeddings=emb)
    store.put_file(_shard_key(folder, shard), path, producer="encode", config_hash=digest)
    path.unlink()


def encode_corpus(
    config: RunConfig, store: ArtifactStore, corpus: str | Path | Iterable[Passage], show_progress: bool = False,
    in_process: bool = False,
) -> EmbeddingSet:
    """Embed a corpus (a BEIR folder or passages) as `Passage.full_text`; an empty corpus is an error."""
    passages = list(iter_corpus(corpus) if isinstance(corpus, (str, Path)) else corpus)
    if not passages:
        where = Path(corpus) / "corpus.jsonl" if isinstance(corpus, (str, Path)) else "<corpus>"
        raise DataError(where, None, "the corpus has no passages")
    return encode_texts(config, store, [p.id for p in passages], [p.full_text for p in passages], "passage", show_progress,
                        in_process)


def encode_queries(
    config: RunConfig, store: ArtifactStore, queries: dict[str, str], show_progress: bool = False,
    in_process: bool = False,
) -> EmbeddingSet:
    """Embed queries ({id: text}) in their dict order."""
    if not queries:
        raise ValueError("no queries to encode")
    return encode_texts(config, store, list(queries), list(queries.values()), "query", show_progress, in_process)
