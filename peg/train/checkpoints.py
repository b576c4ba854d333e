"""Training checkpoints in the artifact store, so a training pod with a fresh disk resumes exactly.

Layout under a store key prefix K: `K/<tag>/<file>` (every rank's DeepSpeed and RNG files),
`K/<tag>/_files.json` (every file of the tag with its sha256) and `K/latest` (the tag). The
file list and then `latest` are written last, by rank 0, after every node has uploaded its files:
a tag with a file list is complete. Each node uploads the files its own ranks wrote (pods share
no disk); on restore each node downloads the whole tag.

A stored checkpoint that does not verify (a changed byte, a missing file) is never a dead end:
restore drops it and takes the newest one that verifies, or reports that there is none (a clean
start).
`K/best/` holds the best dev model so far and its record (`upload_best` / `restore_best`), so
evaluation during training keeps its best across a pod that lost its disk; it is not a checkpoint tag.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from peg.store import ArtifactStore, IntegrityError
from peg.train.devset import BEST_RECORD, BestRecord

LATEST = "latest"
FILES = "_files.json"
BEST = "best"  # K/best/: the best dev model so far and its record (upload_best), not a checkpoint tag

logger = logging.getLogger(__name__)


def upload_checkpoint(store: ArtifactStore, key: str, ckpt_dir: Path, tag: str, keep: int) -> None:
    """Called by every rank right after a checkpoint is saved locally (a collective call)."""
    import torch.distributed as dist

    if os.environ.get("LOCAL_RANK", "0") == "0":  # one uploader per node
        for path in sorted(p for p in (ckpt_dir / tag).rglob("*") if p.is_file()):
            store.put_file(f"{key}/{tag}/{path.relative_to(ckpt_dir / tag).as_posix()}", path, producer="train")
    dist.barrier()
    if dist.get_rank() == 0:
        files = {k[len(f"{key}/{tag}/") :]: store.require_manifest(k).sha256
                 for k in store.list(f"{key}/{tag}") if not k.endswith(f"/{FILES}")}
        store.put_json(f"{key}/{tag}/{FILES}", files, producer="train")
        store.put_bytes(f"{key}/{LATEST}", tag.encode(), producer="train")
        for old in stored_tags(store, key)[:-keep]:
            store.delete(f"{key}/{old}")
    dist.barrier()


def stored_tags(store: ArtifactStore, key: str) -> list[str]:
    tags = {k[len(key) + 1 :].split("/", 1)[0] for k in store.list(key)}
    return sorted(tags - {LATEST, BEST})


def restore_checkpoint(store: ArtifactStore, key: str, ckpt_dir: Path, trust_local: bool = False) -> bool:
    """Make `ckpt_dir` hold the newest stored checkpoint that verifies; False if there is none.

    Candidates, newest first, are the tags with a file list and (written by peg versions before
    the list) tags no newer than `latest`. A candidate with a file that is missing or does not
    verify is deleted from the store and from `ckpt_dir`, and the next older one is tried; the
    store's `latest` is set to the tag restored (removed when none verifies). With `trust_local`
    (a single-node run: no other node could lack it), a newer local checkpoint that did not reach
    the store before the process died is resumed from instead.
    """
    local = ckpt_dir / LATEST
    local_tag = local.read_text().strip() if local.is_file() else None
    candidates = _complete_tags(store, key)
    if trust_local and local_tag and (ckpt_dir / local_tag).is_dir() and (not candidates or local_tag > candidates[0]):
        return True
    for tag in candidates:
        try:
            _download_tag(store, key, tag, ckpt_dir)
        except IntegrityError as e:
            logger.warning("checkpoint %s/%s does not verify (%s): dropped, trying the one before", key, tag, e)
            store.delete(f"{key}/{tag}")
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
            continue
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        tmp = ckpt_dir / f".{LATEST}.tmp"
        tmp.write_text(tag)
        os.replace(tmp, local)
        if _stored_latest(store, key) != tag:
            store.put_bytes(f"{key}/{LATEST}", tag.encode(), producer="train")
        return True
    if candidates:
        logger.warning("no stored checkpoint under %s verifies: training starts from the beginning", key)
    store.delete(f"{key}/{LATEST}")
    local.unlink(missing_ok=True)
    return False


def _stored_latest(store: ArtifactStore, key: str) -> str | None:
    """The tag `K/latest` names; None if it is absent or does not verify."""
    try:
        return store.get_bytes(f"{key}/{LATEST}").decode().strip() if store.exists(f"{key}/{LATEST}") else None
    except (IntegrityError, UnicodeDecodeError):
        return None


def _complete_tags(store: ArtifactStore, key: str) -> list[str]:
    """Tags that were complete when stored, newest first (see `restore_checkpoint`)."""
    latest = _stored_latest(store, key)
    return sorted((t for t in stored_tags(store, key)
                   if store.exists(f"{key}/{t}/{FILES}") or (latest is not None and t <= latest)), reverse=True)


def _download_tag(store: ArtifactStore, key: str, tag: str, ckpt_dir: Path) -> None:
    """Copy the tag's files to `ckpt_dir/<tag>/`, verified (a same-size local copy is kept);
    IntegrityError if a file of its list is missing or differs."""
    prefix = f"{key}/{tag}/"
    stored = {k[len(prefix) :]: k for k in store.list(f"{key}/{tag}") if not k.endswith(f"/{FILES}")}
    if store.exists(prefix + FILES):
        listed = store.read_json(prefix + FILES)
        missing = sorted(set(listed) - set(stored))
        if missing:
            raise IntegrityError(prefix + missing[0], f"{store.describe()}: {prefix}{missing[0]} is missing")
        changed = sorted(n for n in listed if store.require_manifest(stored[n]).sha256 != listed[n])
        if changed:
            raise IntegrityError(prefix + changed[0], f"{store.describe()}: {prefix}{changed[0]} is not the file the checkpoint stored")
    for name, item in stored.items():
        target = ckpt_dir / tag / name
        if not (target.is_file() and target.stat().st_size == store.require_manifest(item).size):
            target.parent.mkdir(parents=True, exist_ok=True)
            store.get_file(item, target)
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
