"""Checkpoints in the store: restore makes a fresh disk hold exactly the latest complete one, and
falls back to the one before when the latest does not verify (on a local and an S3 store)."""

from __future__ import annotations

import pytest
from tiny import flip_stored_byte

from peg.config import StoreConfig
from peg.store import open_store
from peg.train.checkpoints import restore_checkpoint, stored_tags


def test_restore_latest_checkpoint_onto_a_fresh_disk(tmp_path):
    store = open_store(StoreConfig(uri=str(tmp_path / "store")))
    key = "run/train/checkpoints"
    ckpt = tmp_path / "fresh" / "checkpoints"
    assert restore_checkpoint(store, key, ckpt) is False and not ckpt.exists()  # nothing stored: no resume
    for tag, payload in (("step00000002", b"old"), ("step00000004", b"new")):
        for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng-rank1.pt"):
            store.put_bytes(f"{key}/{tag}/{name}", payload + name.encode(), producer="train")
    store.put_bytes(f"{key}/step00000006/rng-rank0.pt", b"incomplete: latest never named it", producer="train")
    store.put_bytes(f"{key}/latest", b"step00000004", producer="train")
    assert stored_tags(store, key) == ["step00000002", "step00000004", "step00000006"]

    assert restore_checkpoint(store, key, ckpt) is True
    assert (ckpt / "latest").read_text() == "step00000004"
    assert sorted(p.name for p in (ckpt / "step00000004").iterdir()) == [
        "mp_rank_00_model_states.pt", "rng-rank1.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    assert (ckpt / "step00000004" / "rng-rank1.pt").read_bytes() == b"newrng-rank1.pt"
    assert not (ckpt / "step00000002").exists() and not (ckpt / "step00000006").exists()
    (ckpt / "step00000004" / "rng-rank1.pt").write_bytes(b"truncated")  # a half-written local copy is replaced
    assert restore_checkpoint(store, key, ckpt) is True
    assert (ckpt / "step00000004" / "rng-rank1.pt").read_bytes() == b"newrng-rank1.pt"


def test_a_newer_local_checkpoint_wins_only_on_a_single_node(tmp_path):
    store = open_store(StoreConfig(uri=str(tmp_path / "store")))
    key = "run/train/checkpoints"
    store.put_bytes(f"{key}/step00000002/rng-rank0.pt", b"stored", producer="train")
    store.put_bytes(f"{key}/latest", b"step00000002", producer="train")
    ckpt = tmp_path / "disk" / "checkpoints"
    (ckpt / "step00000004").mkdir(parents=True)
    (ckpt / "step00000004" / "rng-rank0.pt").write_bytes(b"local, killed before its upload")
    (ckpt / "latest").write_text("step00000004")
    assert restore_checkpoint(store, key, ckpt, trust_local=True) is True
    assert (ckpt / "latest").read_text() == "step00000004"  # one node: its own newer checkpoint
    assert restore_checkpoint(store, key, ckpt, trust_local=False) is True
    assert (ckpt / "latest").read_text() == "step00000002"  # several nodes: only what all can get


def _store_checkpoint(store, key: str, tag: str, payload: bytes, listed: bool = True) -> None:
    """A stored checkpoint as `upload_checkpoint` leaves it (with its file list when `listed`)."""
    names = ("mp_rank_00_model_states.pt", "rng-rank0.pt")
    for name in names:
        store.put_bytes(f"{key}/{tag}/{name}", payload + name.encode(), producer="train")
    if listed:
        store.put_json(f"{key}/{tag}/_files.json", {n: store.require_manifest(f"{key}/{tag}/{n}").sha256 for n in names},
                       producer="train")
    store.put_bytes(f"{key}/latest", tag.encode(), producer="train")


@pytest.mark.parametrize("damage", ["flipped byte", "dropped file"])
def test_a_stored_checkpoint_that_does_not_verify_falls_back_to_the_one_before(store, tmp_path, damage):
    key = "run/train/checkpoints"
    _store_checkpoint(store, key, "step00000002", b"old")
    _store_checkpoint(store, key, "step00000004", b"new")
    if damage == "flipped byte":
        flip_stored_byte(store, f"{key}/step00000004/rng-rank0.pt")
    else:  # what a run of an earlier peg left: the bad file dropped, `latest` still naming its tag
        store.delete(f"{key}/step00000004/rng-rank0.pt")
    ckpt = tmp_path / "fresh" / "checkpoints"
    for attempt in range(2):  # the fallback holds on every later rerun too: never a dead end
        assert restore_checkpoint(store, key, ckpt) is True, attempt
        assert (ckpt / "latest").read_text() == "step00000002"
        assert (ckpt / "step00000002" / "rng-rank0.pt").read_bytes() == b"oldrng-rank0.pt"
        assert not (ckpt / "step00000004").exists()
        assert stored_tags(store, key) == ["step00000002"] and store.read_text(f"{key}/latest") == "step00000002"

    flip_stored_byte(store, f"{key}/step00000002/mp_rank_00_model_states.pt")  # nothing verifies: a clean start
    fresh = tmp_path / "other" / "checkpoints"
    assert restore_checkpoint(store, key, fresh) is False
    assert restore_checkpoint(store, key, ckpt) is False and not (ckpt / "latest").exists()
    assert store.list(key) == []
