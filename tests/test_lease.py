"""The run lease (`peg/store/lease.py`), on a local and an S3 store: one holder, the other refused
naming it; a dead or expired holder's lease taken over by exactly one taker; `break-lease`; a
store that is down when the lease is released."""

from __future__ import annotations

import json
import multiprocessing
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from peg.store import LocalStore
from peg.store.lease import Lease, LeaseHeld, read_lease


def test_one_lease_holder_the_other_refused_naming_it(store):
    first = Lease(store, "run", ttl=30, command="peg pipeline run a.yaml")
    first.acquire()
    try:
        with pytest.raises(LeaseHeld, match=r"'peg pipeline run a.yaml' \(pid \d+ on .*expires in"):
            Lease(store, "run", ttl=30).acquire(wait=0)
        assert read_lease(store, "run").owner == first.owner
        assert first.renew() and not first.lost.is_set()
    finally:
        first.release()
    assert read_lease(store, "run") is None
    second = Lease(store, "run", ttl=30)
    second.acquire()
    second.release()


def test_a_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(store):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = {"owner": "dead", "host": socket.gethostname(), "pid": int(finished.stdout), "command": "peg pipeline run x",
            "acquired": "then", "expires": time.time() + 600}
    store.create_object("run/_lease.json", json.dumps(dead).encode())
    lease = Lease(store, "run", ttl=30)
    lease.acquire(wait=0)
    assert read_lease(store, "run").owner == lease.owner
    lease.release()


def test_a_lease_whose_pid_is_now_another_process_is_taken_over_at_once(store):
    """A restarted pod has the same host name and PIDs from 1 again: the killed holder's pid can be
    a live process of this host, even this one. The record's start time tells them apart; a live
    holder of the same pid and start time still holds it."""
    import psutil

    this = psutil.Process()
    earlier = {"owner": "dead", "host": socket.gethostname(), "pid": this.pid, "command": "peg pipeline stage train",
               "acquired": "then", "expires": time.time() + 600, "started": this.create_time() - 60}
    store.create_object("run/_lease.json", json.dumps(earlier).encode())
    lease = Lease(store, "run", ttl=30)
    lease.acquire(wait=0)
    assert read_lease(store, "run").owner == lease.owner and read_lease(store, "run").started == this.create_time()
    with pytest.raises(LeaseHeld):  # the same pid and start time: the holder is alive
        Lease(store, "run", ttl=30).acquire(wait=0)
    lease.release()


def _plant_expired_lease(store, run: str) -> None:
    dead = {"owner": "dead", "host": "gone", "pid": 1, "command": "peg pipeline run x", "acquired": "then",
            "expires": time.time() - 1}
    store.create_object(f"{run}/_lease.json", json.dumps(dead).encode())


def _try_lease(lease: Lease, start, outcome) -> None:
    """Wait at the `start` barrier, then try the lease once; report "won" or "refused"."""
    start.wait()
    try:
        lease.acquire(wait=0)
        outcome("won")
    except LeaseHeld:
        outcome("refused")


def _start_and_join(workers: list) -> None:
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)


@pytest.mark.slow
def test_an_expired_lease_is_taken_over_by_exactly_one(store, monkeypatch):
    # 8 takers released at once, over 20 rounds, each file read returning 2 ms late: a takeover that
    # leaves the name free while it compares (rename aside, compare, put back) lets a second taker
    # create the lease in that window (the rename-aside store failed 3 runs of 3).
    read_bytes = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda path: (read_bytes(path), time.sleep(0.002))[0])
    rounds = 20
    for round_ in range(rounds):
        run = f"run{round_}"
        _plant_expired_lease(store, run)
        takers = [Lease(store, run, ttl=30) for _ in range(8)]
        start = threading.Barrier(len(takers))
        results: list[str] = []
        _start_and_join([threading.Thread(target=_try_lease, args=(lease, start, results.append)) for lease in takers])
        assert sorted(results) == ["refused"] * 7 + ["won"], f"round {round_}"
        winner = next(lease for lease in takers if lease._token is not None)
        assert read_lease(store, run).owner == winner.owner
        if round_ < rounds - 1:
            winner.release()
            assert read_lease(store, run) is None
    # the loser of a later race: a holder whose lease was taken learns it at its next renewal
    current, token = store.read_object(f"{run}/_lease.json")
    store.replace_object(f"{run}/_lease.json", current.replace(winner.owner.encode(), b"someone-else"), token)
    assert not winner.renew() and winner.lost.is_set()
    winner.release()
    assert read_lease(store, run).owner == "someone-else"  # a lost lease is not removed


def _take_lease_in_a_process(root: str, run: str, start, outcomes) -> None:
    _try_lease(Lease(LocalStore(root), run, ttl=30), start, outcomes.put)
    start.wait()  # stay alive until every taker has tried: a gone holder's lease is free to take


@pytest.mark.slow
def test_an_expired_local_lease_is_taken_over_by_exactly_one_process(tmp_path):
    context = multiprocessing.get_context("fork")
    store = LocalStore(tmp_path / "store")
    for round_ in range(30):
        run = f"run{round_}"
        _plant_expired_lease(store, run)
        start, outcomes = context.Barrier(6), context.Queue()
        _start_and_join([context.Process(target=_take_lease_in_a_process, args=(str(store.root), run, start, outcomes))
                         for _ in range(6)])
        assert sorted(outcomes.get(timeout=5) for _ in range(6)) == ["refused"] * 5 + ["won"], f"round {round_}"


def test_a_lease_expiring_later_than_any_run_sets_is_taken_over(store):
    far = {"owner": "hostile", "host": "elsewhere", "pid": 7, "command": "peg pipeline run x", "acquired": "then",
           "expires": time.time() + 10 * 365 * 86400}
    store.create_object("run/_lease.json", json.dumps(far).encode())
    lease = Lease(store, "run", ttl=30)
    lease.acquire(wait=0)
    assert read_lease(store, "run").owner == lease.owner
    lease.release()


def test_break_lease_removes_only_the_named_holders_lease(store, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from peg.cli import app

    held = {"owner": "lost", "host": "node-7", "pid": 4242, "command": "peg pipeline run x", "acquired": "then",
            "expires": time.time() + 3600}
    store.create_object("run/_lease.json", json.dumps(held).encode())
    with pytest.raises(LeaseHeld):
        Lease(store, "run", ttl=30).acquire(wait=0)
    store_yaml = {"uri": str(store.root)} if isinstance(store, LocalStore) else store.config.model_dump(mode="json")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"name": "run", "model": {"name_or_path": "m"}, "store": store_yaml}))
    wrong = CliRunner().invoke(app, ["pipeline", "break-lease", str(config), "--host", "node-7", "--pid", "1"])
    assert wrong.exit_code == 2 and "held by pid 4242 on node-7, not pid 1 on node-7" in " ".join(wrong.output.split())
    assert read_lease(store, "run").owner == "lost"
    broke = CliRunner().invoke(app, ["pipeline", "break-lease", str(config), "--host", "node-7", "--pid", "4242"])
    assert broke.exit_code == 0 and "'peg pipeline run x' (pid 4242 on node-7)" in broke.output, broke.output
    assert read_lease(store, "run") is None
    with Lease(store, "run", ttl=30):
        pass


def test_a_store_down_at_the_end_does_not_hide_the_runs_own_error(tmp_path):
    """Releasing the lease while the store is unreachable logs it (the lease expires by itself)
    instead of raising over the error that is ending the run."""
    from peg.store import StoreError

    store = LocalStore(tmp_path / "store")
    lease = Lease(store, "run", ttl=30)
    lease.acquire()

    def down(*args):
        raise StoreError("S3 store http://127.0.0.1:9 bucket 'b': connection refused")

    store.remove_object = down
    with pytest.raises(ValueError, match="the stage's own error"):
        try:
            raise ValueError("the stage's own error")
        finally:
            lease.release()
