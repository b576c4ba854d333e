"""Global training batches streamed from training-pair files, each batch from ONE dataset (file).

A file is cut into line-aligned byte blocks (`block_bytes`, 16 MiB by default) and indexed once:
each block's usable examples (enough hard negatives) are counted, the blocks split among the
ranks (`PairFile.index(..., shard, shards, gather)`). Nothing else of a file stays in memory:
batches are read back block by block, so memory per rank is a couple of blocks whatever the
file's size.

Every rank builds the same deterministic plan from (seed, epoch) and the datasets' positions in
the plan (data.train_files order), never from their paths: the same files read from another
directory (a pipeline's work directory, a pod's) give the same batches. Per dataset the blocks are
shuffled and so are the examples inside each block, giving the dataset's example stream for the
epoch; it is cut into global batches of `queries_per_step` (a short tail is dropped), and the
batches of all datasets are interleaved as `data.sampling` says (`BatchPlan`). A rank parses only its slice of a
batch (where a block has no skipped lines). A batch position (epoch, index) is all a checkpoint
needs to continue the data stream exactly: any position is read back directly.

`prepare_step` turns a rank's slice into model inputs (tokenised, grouped by length into
GradCache chunks of so many texts or tokens, each padded to its own longest text or packed); `Prefetcher` runs it ahead of the
training step in a background thread.
"""

from __future__ import annotations

import bisect
import json
import logging
import queue
import random
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from peg.data.errors import DataError
from peg.data.pairs import parse_example
from peg.errors import PegError
from peg.losses import Chunks, passage_ids_from_texts

logger = logging.getLogger(__name__)

DEFAULT_BLOCK_BYTES = 16 << 20

Sampling = Literal["proportional", "round_robin", "weighted"]


class BatchError(PegError, ValueError):
    """A batch shape that cannot be used with this world size or data."""


@dataclass(frozen=True)
class Query:
    """One training query with its passages [pos, neg_1..neg_n] and optional teacher scores."""

    query: str
    passages: tuple[str, ...]
    teacher_scores: tuple[float, ...] | None


@dataclass(frozen=True)
class RankBatch:
    """The part of a global batch one rank encodes."""

    dataset: str
    queries: list[str]
    passages: list[str]  # per query: pos, neg_1..neg_n
    teacher_scores: list[list[float]] | None  # per query: [1 + n]


def to_query(obj: dict, path: Path, lineno: int, hard_negatives: int, need_scores: bool) -> Query | None:
    """A validated training query, or None when the example has fewer than `hard_negatives` negatives."""
    ex = parse_example(obj, path, lineno)
    if len(ex.neg) < hard_negatives:
        return None
    scores = None
    if need_scores:
        missing = [k for k in ("pos_scores", "neg_scores") if getattr(ex, k) is None]
        if missing and not (hard_negatives == 0 and missing == ["neg_scores"]):
            raise DataError(path, lineno, f"loss.kind=listwise needs teacher scores: missing {' and '.join(missing)}")
        scores = (ex.pos_scores[0], *(ex.neg_scores or [])[:hard_negatives])
    return Query(ex.query, (ex.pos[0], *ex.neg[:hard_negatives]), scores)


def _parse_line(raw: bytes, path: Path, lineno: int) -> dict:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataError(path, lineno, f"malformed JSON: {e.msg} (column {e.colno})") from None
    except UnicodeDecodeError:
        raise DataError(path, lineno, "not UTF-8 text") from None
    if not isinstance(obj, dict):
        raise DataError(path, lineno, f"expected a JSON object, got {type(obj).__name__}")
    return obj


@dataclass(frozen=True)
class Block:
    """A line-aligned byte range of a file: `lines` non-blank lines, the first `examples` usable ones kept."""

    start: int
    end: int
    first_line: int  # 1-based line number of the block's first line
    lines: int
    examples: int


def _read_lines(path: Path, block: Block) -> list[tuple[int, bytes]]:
    """(line number, raw line) of the block's non-blank lines."""
    with path.open("rb") as f:
        f.seek(block.start)
        data = f.read(block.end - block.start)
    return [(block.first_line + i, raw) for i, raw in enumerate(data.split(b"\n")) if raw.strip()]


def _bounds(path: Path, block_bytes: int) -> list[tuple[int, int, int]]:
    """(start, end, first line number) of line-aligned blocks of about `block_bytes`."""
    size = path.stat().st_size
    starts = [0]
    with path.open("rb") as f:
        for offset in range(block_bytes, size, block_bytes):
            if offset <= starts[-1]:
                continue
            f.seek(offset - 1)
            f.readline()  # to the end of the line that holds byte offset - 1
            if f.tell() < size:
                starts.append(f.tell())
    ends = starts[1:] + [size]
    first_lines, line = [], 1
    with path.open("rb") as f:
        for start, end in zip(starts, ends):
            first_lines.append(line)
            f.seek(start)
            line += f.read(end - start).count(b"\n")
    return list(zip(starts, ends, first_lines))


def _scan(
    path: Path, start: int, end: int, first_line: int, hard_negatives: int, need_scores: bool, held_out: frozenset[str]
) -> dict:
    """Validate one block: its non-blank lines, usable examples, and the skipped (line, negatives);
    examples whose query is `held_out` (the dev set's) are neither usable nor skipped."""
    block = Block(start, end, first_line, 0, 0)
    usable, skipped, lines = 0, [], _read_lines(path, block)
    for lineno, raw in lines:
        obj = _parse_line(raw, path, lineno)
        if obj.get("query") in held_out:
            continue
        if to_query(obj, path, lineno, hard_negatives, need_scores) is None:
            skipped.append((lineno, len(obj.get("neg") or [])))
        else:
            usable += 1
    return {"lines": len(lines), "examples": usable, "skipped": len(skipped), "first_skip": skipped[0] if skipped else None}


class PairFile:
    """A training-pair JSONL file as indexed blocks; examples are read back from disk when asked for."""

    def __init__(
        self, path: Path, blocks: list[Block], hard_negatives: int, need_scores: bool, held_out: frozenset[str] = frozenset()
    ):
        self.path = path
        self.blocks = blocks
        self.hard_negatives = hard_negatives
        self.need_scores = need_scores
        self.held_out = held_out

    @classmethod
    def index(
        cls,
        path: str | Path,
        hard_negatives: int,
        need_scores: bool,
        *,
        limit: int | None = None,
        block_bytes: int = DEFAULT_BLOCK_BYTES,
        shard: int = 0,
        shards: int = 1,
        gather: Callable[[object], list[object]] | None = None,
        held_out: frozenset[str] = frozenset(),
    ) -> PairFile:
        """Index and validate `path`; this process scans blocks `shard::shards`, `gather` shares the results.

        Examples whose query text is in `held_out` (the dev set's queries) are left out.

        Examples with fewer negatives (mining keeps no padding: a query may have too few) are
        skipped with a warning naming how many and the first line; if none is left it is an
        error. `limit` keeps only the first `limit` usable examples.
        """
        path = Path(path)
        if not path.is_file():
            raise DataError(path, None, "file not found")
        bounds = _bounds(path, block_bytes)
        mine: dict[int, dict] = {}
        error: tuple | None = None  # (line, message): plain values travel through all_gather_object
        for b in range(shard, len(bounds), shards):
            try:
                mine[b] = _scan(path, *bounds[b], hard_negatives, need_scores, held_out)
            except DataError as e:
                error = (e.line or 0, e.message)
                break
        parts = gather((mine, error)) if gather else [(mine, error)]
        errors = [e for _, e in parts if e is not None]
        if errors:
            line, message = min(errors)
            raise DataError(path, line or None, message)
        scans = {b: s for part, _ in parts for b, s in part.items()}
        blocks, total = [], 0
        for b, (start, end, first_line) in enumerate(bounds):
            keep = scans[b]["examples"] if limit is None else max(0, min(scans[b]["examples"], limit - total))
            total += keep
            blocks.append(Block(start, end, first_line, scans[b]["lines"], keep))
        skipped = sum(s["skipped"] for s in scans.values())
        first_skip = min((s["first_skip"] for s in scans.values() if s["first_skip"]), default=None)
        if first_skip and not total:
            line, count = first_skip
            raise DataError(
                path, line, f"{count} negatives, but batch.hard_negatives asks for {hard_negatives} (no example has enough)"
            )
        if not total:
            raise DataError(path, None, "no training examples")
        if first_skip:
            logger.warning(
                "%s: skipped %d of %d examples with fewer than %d negatives (first: line %d, %d negatives)",
                path, skipped, skipped + sum(s["examples"] for s in scans.values()), hard_negatives, *first_skip,
            )
        return cls(path, blocks, hard_negatives, need_scores, held_out)

    @property
    def examples(self) -> int:
        return sum(b.examples for b in self.blocks)

    def usable_lines(self, block: Block) -> list[tuple[int, bytes]]:
        """(line number, raw line) of the block's usable examples; parsed only where some are skipped."""
        lines = _read_lines(self.path, block)
        if block.lines == block.examples:
            return lines
        usable = [(n, raw) for n, raw in lines if self.query(n, raw) is not None]
        return usable[: block.examples]

    def query(self, lineno: int, raw: bytes) -> Query | None:
        """The line's training query; None when it is held out or has too few negatives."""
        obj = _parse_line(raw, self.path, lineno)
        if obj.get("query") in self.held_out:
            return None
        return to_query(obj, self.path, lineno, self.hard_negatives, self.need_scores)


class _EpochStream:
    """One dataset's example stream for one epoch: shuffled blocks, shuffled examples inside each.

    The last two blocks read are kept as raw lines; an example is parsed when it is taken.
    """

    def __init__(self, data: PairFile, position: int, seed: int, epoch: int | str):
        self.data = data
        self.position = position  # the dataset's place in the plan: seeds its shuffles
        self.seed, self.epoch = seed, epoch
        self.order = [i for i in range(len(data.blocks)) if data.blocks[i].examples]
        random.Random(f"{seed}:{epoch}:{position}").shuffle(self.order)
        self.ends = []  # stream position after each block of `order`
        total = 0
        for i in self.order:
            total += data.blocks[i].examples
            self.ends.append(total)
        self.cache: OrderedDict[int, list[tuple[int, bytes]]] = OrderedDict()

    def take(self, start: int, stop: int) -> list[Query]:
        """The examples at stream positions [start, stop)."""
        out: list[Query] = []
        for pos in range(start, stop):
            k = bisect.bisect_right(self.ends, pos)
            lineno, raw = self._block(k)[pos - (self.ends[k] - self.data.blocks[self.order[k]].examples)]
            out.append(self.data.query(lineno, raw))
        return out

    def _block(self, k: int) -> list[tuple[int, bytes]]:
        """Block k of the epoch's order, its usable lines shuffled."""
        if k not in self.cache:
            lines = self.data.usable_lines(self.data.blocks[self.order[k]])
            random.Random(f"{self.seed}:{self.epoch}:{self.position}:{self.order[k]}").shuffle(lines)
            self.cache[k] = lines
            while len(self.cache) > 2:
                self.cache.popitem(last=False)
        return self.cache[k]


class BatchPlan:
    """Deterministic global batches over several datasets; `rank_batch` reads one rank's slice.

    Every global batch comes from one dataset (its in-batch negatives stay in-domain). An epoch
    has as many batches as the datasets hold together (sum of examples // queries_per_step);
    `sampling` chooses which dataset each one comes from:
    - proportional: every batch of every dataset once, in a shuffled order (a dataset's share is
      its size);
    - round_robin: the datasets in turn (a, b, c, a, b, c, ...), a finished dataset dropping out;
    - weighted: each batch's dataset drawn with probability weight / sum(weights); a dataset
      drawn more often than it has batches starts its stream over, reshuffled (a new cycle).
    The order is a function of (seed, epoch) only, so any position is read back directly.
    """

    def __init__(
        self,
        datasets: dict[str, PairFile],
        queries_per_step: int,
        world_size: int,
        seed: int,
        sampling: Sampling = "proportional",
        weights: list[float] | None = None,
    ):
        if (sampling == "weighted") != (weights is not None) or (weights is not None and len(weights) != len(datasets)):
            raise BatchError(f"sampling {sampling!r} needs one weight per dataset exactly when weighted; got {weights}")
        self.sampling, self.weights = sampling, weights
        if queries_per_step % world_size:
            raise BatchError(
                f"batch.queries_per_step ({queries_per_step}) does not divide across {world_size} ranks"
            )
        self.datasets = datasets
        self.queries_per_step = queries_per_step
        self.world_size = world_size
        self.seed = seed
        too_small = [name for name, data in datasets.items() if data.examples < queries_per_step]
        if too_small:
            raise BatchError(
                f"batch.queries_per_step ({queries_per_step}) exceeds the examples in {', '.join(too_small)}"
            )
        self._position = {name: i for i, name in enumerate(datasets)}
        self._streams: dict[str, _EpochStream] = {}

    @property
    def steps_per_epoch(self) -> int:
        return sum(self.batches_of(name) for name in self.datasets)

    def batches_of(self, name: str) -> int:
        """Global batches in one pass over dataset `name`."""
        return self.datasets[name].examples // self.queries_per_step

    def epoch_batches(self, epoch: int) -> list[tuple[str, int]]:
        """(dataset, the dataset's batch number) for every global batch of `epoch`, in training order."""
        if self.sampling == "round_robin":
            rounds = max(self.batches_of(name) for name in self.datasets)
            labels = [name for r in range(rounds) for name in self.datasets if r < self.batches_of(name)]
        elif self.sampling == "weighted":
            labels = random.Random(f"{self.seed}:{epoch}:weighted").choices(
                list(self.datasets), weights=self.weights, k=self.steps_per_epoch
            )
        else:
            labels = [name for name in self.datasets for _ in range(self.batches_of(name))]
            random.Random(f"{self.seed}:{epoch}").shuffle(labels)
        seen: dict[str, int] = {}
        batches = []
        for name in labels:
            batches.append((name, seen.get(name, 0)))
            seen[name] = seen.get(name, 0) + 1
        return batches

    def rank_batch(self, epoch: int, dataset: str, number: int, rank: int) -> RankBatch:
        """Rank `rank`'s queries of global batch `number` of `dataset` in `epoch` (`number` past the
        dataset's batches: the same position in its next cycle, reshuffled)."""
        cycle, number = divmod(number, self.batches_of(dataset))
        key = epoch if cycle == 0 else f"{epoch}+{cycle}"  # cycle 0: the plain epoch's shuffle
        stream = self._streams.get(dataset)
        if stream is None or stream.epoch != key:
            stream = self._streams[dataset] = _EpochStream(self.datasets[dataset], self._position[dataset], self.seed, key)
        per_rank = self.queries_per_step // self.world_size
        start = number * self.queries_per_step + rank * per_rank
        mine = stream.take(start, start + per_rank)
        scores = None if mine[0].teacher_scores is None else [list(q.teacher_scores) for q in mine]
        return RankBatch(dataset, [q.query for q in mine], [p for q in mine for p in q.passages], scores)

    def positions(self, epoch: int, index: int) -> Iterator[tuple[int, int, str, int]]:
        """(epoch, index, dataset, batch number) from position (epoch, index) on, endlessly."""
        while True:
            batches = self.epoch_batches(epoch)
            for i in range(index, len(batches)):
                yield epoch, i, *batches[i]
            epoch, index = epoch + 1, 0


@dataclass
class StepInputs:
    """One rank's batch ready for the model: tokenised inputs, loss extras and its size in tokens."""

    queries: Chunks | dict[str, torch.Tensor]
    passages: Chunks | dict[str, torch.Tensor]
    extra: dict[str, torch.Tensor]
    passage_count: int
    tokens: int  # real (unpadded) tokens of queries and passages
    lengths_sq: int  # sum of squared real lengths (the attention term of the FLOP count)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> StepInputs:
        """The same step with `fn` applied to every tensor (moving to a device, pinning memory)."""

        def inputs(x: Chunks | dict) -> Chunks | dict:
            if isinstance(x, Chunks):
                return Chunks([{k: fn(v) for k, v in part.items()} for part in x.parts], x.rows)
            return {k: fn(v) for k, v in x.items()}

        extra = {k: fn(v) for k, v in self.extra.items()}
        return StepInputs(inputs(self.queries), inputs(self.passages), extra, self.passage_count, self.tokens, self.lengths_sq)

    def to(self, device: torch.device) -> StepInputs:
        return self.map(lambda t: t.to(device, non_blocking=device.type == "cuda"))


def group_by_length(
    features: dict[str, list[list[int]]],
    chunk_size: int | None,
    collate: Callable[[dict], dict[str, torch.Tensor]],
    chunk_tokens: int | None = None,
    packed: bool = False,
) -> Chunks:
    """Rows sorted longest first and cut into chunks, each collated on its own (padded to its own
    longest row, or packed). A chunk holds `chunk_size` rows, or with `chunk_tokens` as many rows
    as keep its tokens within the budget: rows x its longest row when padded, the sum of its
    rows' lengths when `packed`; a row longer than the budget gets a chunk of its own."""
    lengths = [len(ids) for ids in features["input_ids"]]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    if chunk_tokens is None:
        groups = [order[start : start + chunk_size] for start in range(0, len(order), chunk_size)]
    else:
        used = 0
        for i in order:
            cost = lengths[i] if packed else lengths[groups[-1][0]] if groups else 0
            if not groups or used + cost > chunk_tokens:
                groups.append([i])
                used = lengths[i]
            else:
                groups[-1].append(i)
                used += cost
    parts = [collate({k: [v[i] for i in rows] for k, v in features.items()}) for rows in groups]
    return Chunks(parts, torch.tensor(order, dtype=torch.long))


def prepare_step(
    encoder, batch: RankBatch, chunk_size: int | None, pin_memory: bool = False, chunk_tokens: int | None = None
) -> StepInputs:
    """Tokenise a rank's batch: with `chunk_size` (texts) or `chunk_tokens` (a token budget), texts
    grouped by length into chunks; each chunk, or else the whole batch, padded or packed as the
    encoder `packs`."""
    inputs, tokens, lengths_sq = [], 0, 0
    for texts, kind in ((batch.queries, "query"), (batch.passages, "passage")):
        features = encoder.tokenize(texts, kind, padding=False)
        lengths = [len(ids) for ids in features["input_ids"]]
        tokens += sum(lengths)
        lengths_sq += sum(n * n for n in lengths)
        if chunk_size or chunk_tokens:
            inputs.append(group_by_length(dict(features), chunk_size, encoder.collate, chunk_tokens, encoder.packs))
        else:
            inputs.append(encoder.collate(dict(features)))
    extra = {"passage_ids": passage_ids_from_texts(batch.passages)}
    if batch.teacher_scores is not None:
        extra["teacher_scores"] = torch.tensor(batch.teacher_scores, dtype=torch.float32)
    step = StepInputs(inputs[0], inputs[1], extra, len(batch.passages), tokens, lengths_sq)
    return step.map(torch.Tensor.pin_memory) if pin_memory else step


class Prefetcher:
    """Runs `produce(item)` for the items of `source` in a background thread, `depth` ahead.

    Iterate to receive (item, produced) in order; an exception in the thread is raised here.
    `close()` stops the thread.
    """

    def __init__(self, source: Iterator, produce: Callable, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(source, produce), daemon=True, name="peg-prefetch")
        self._thread.start()

    def _run(self, source: Iterator, produce: Callable) -> None:
        try:
            for item in source:
                result = (item, produce(item), None)
                while not self._stop.is_set():
                    try:
                        self._queue.put(result, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._queue.put((None, None, e))

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        item, produced, error = self._queue.get()
        if error is not None:
            raise error
        return item, produced

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
