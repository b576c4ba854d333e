"""Training checkpoints in the artifact store, so a training pod with a fresh disk resumes exactly.

Layout under a store key prefix K: `K/<tag>/<file>` (every rank's DeepSpeed and RNG files) and
`K/latest` (the tag). `latest` is written last, by rank 0, after every node has uploaded its
files: a tag named by `K/latest` is always complete. Each node uploads the files its own ranks
wrote (pods share no disk); on restore each node downloads the whole tag.
`K/best/` holds the best dev model so far and its record (`upload_best` / `restore_best`), so
evaluation during training keeps its best across a pod that lost its disk.
"""

from __future__ import annotations

import os
from pathlib import Path

from peg.store import ArtifactStore
from peg.train.devset import BEST_RECORD, BestRecord

LATEST = "latest"
BEST = "best"  # K/best/: the best dev model so far and its record (upload_best), not a checkpoint tag


def upload_checkpoint(store: ArtifactStore, key: str, ckpt_dir: Path, tag: str, keep: int) -> None:
    """Called by every rank right after a checkpoint is saved locally (a collective call)."""
    import torch.distributed as dist

    if os.environ.get("LOCAL_RANK", "0") == "0":  # one uploader per node
        for path in sorted(p for p in (ckpt_dir / tag).rglob("*") if p.is_file()):
            store.put_file(f"{key}/{tag}/{path.relative_to(ckpt_dir / tag).as_posix()}", path, producer="train")
    dist.barrier()
    if dist.get_rank() == 0:
        store.put_bytes(f"{key}/{LATEST}", tag.encode(), producer="train")
        for old in stored_tags(store, key)[:-keep]:
            store.delete(f"{key}/{old}")
    dist.barrier()


def stored_tags(store: ArtifactStore, key: str) -> list[str]:
    tags = {k[len(key) + 1 :].split("/", 1)[0] for k in store.list(key)}
    return sorted(tags - {LATEST, BEST})


def restore_checkpoint(store: ArtifactStore, key: str, ckpt_dir: Path, trust_local: bool = False) -> bool:
    """Make `ckpt_dir` hold the newest complete checkpoint; False if there is none.

    The store's latest is restored onto this disk. With `trust_local` (a single-node run: no
    other node could lack it), a newer complete local checkpoint that did not reach the store
    before the process died is resumed from instead.
    """
    local = ckpt_dir / LATEST
    local_tag = local.read_text().strip() if local.is_file() else None
    stored_tag = store.get_bytes(f"{key}/{LATEST}").decode().strip() if store.exists(f"{key}/{LATEST}") else None
    if trust_local and local_tag and (ckpt_dir / local_tag).is_dir() and (stored_tag is None or local_tag > stored_tag):
        return True
    if stored_tag is None:
        return False
    for item in store.list(f"{key}/{stored_tag}"):
        target = ckpt_dir / item[len(key) + 1 :]
        if not (target.is_file() and target.stat().st_size == store.require_manifest(item).size):
            target.parent.mkdir(parents=True, exist_ok=True)
            store.get_file(item, target)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_dir / f".{LATEST}.tmp"
    tmp.write_text(stored_tag)
    os.replace(tmp, local)
    return True


def upload_best(store: ArtifactStore, key: str, output_dir: Path, record: BestRecord) -> None:
    """Rank 0, after keeping a new best dev model (`peg.train.selection`): put its folder under
    `K/best/<folder>/`, then the record `K/best/best.json` (so a stored record always names a
    complete stored folder), then delete the previous best folder."""
    prefix = f"{key}/{BEST}"
    folder = output_dir / record.model
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        store.put_file(f"{prefix}/{record.model}/{path.relative_to(folder).as_posix()}", path, producer="train")
    store.put_file(f"{prefix}/{BEST_RECORD}", output_dir / BEST_RECORD, producer="train")
    for old in {k[len(prefix) + 1 :].split("/", 1)[0] for k in store.list(prefix)} - {record.model, BEST_RECORD}:
        store.delete(f"{prefix}/{old}")


def restore_best(store: ArtifactStore, key: str, output_dir: Path) -> None:
    """Bring the stored best model and record (`upload_best`) onto this disk (a rescheduled pod with
    a fresh disk), unless the local record is at least as good."""
    prefix = f"{key}/{BEST}"
    if not store.exists(f"{prefix}/{BEST_RECORD}"):
        return
    stored = BestRecord(**store.read_json(f"{prefix}/{BEST_RECORD}"))
    local = BestRecord.read(output_dir)
    if local is not None and local.value >= stored.value:
        return
    for item in store.list(f"{prefix}/{stored.model}"):
        store.get_file(item, output_dir / item[len(prefix) + 1 :])
    store.get_file(f"{prefix}/{BEST_RECORD}", output_dir / BEST_RECORD)  # last: it names a complete folder
