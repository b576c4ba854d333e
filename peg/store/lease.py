"""A run's lease: one writer per run, for a local store, S3, and processes on different nodes.

The lease is a small control object `<run>/_lease.json` in the store: `{owner, host, pid, command,
acquired, expires, started}` (expires: unix time; started: the holder process's start time). A holder renews it every third of `ttl` from a
background thread. Another process:
- creates it if absent (create-if-absent: S3 `If-None-Match: *`; locally a hard link that fails
  if the name exists), so of two starters exactly one wins;
- finds it live: waits up to `wait` seconds, then raises `LeaseHeld` naming the holder;
- finds it expired (its holder hung past `ttl`, or its holder ran on this host and its pid is
  gone or is now another process, one of another start time: a killed run is taken over at once,
  also by its own pod restarted, whose PIDs start from 1 again): takes it over with a compare-and-swap on what it
  read (S3 `If-Match: <ETag>`; locally read, compare and replace under an flock), so of two
  takers exactly one wins.
Whoever takes the lease first aborts the run's incomplete multipart uploads that started before
(`ArtifactStore.abort_interrupted_uploads`: a holder killed mid-upload left them), and logs them.
Remaining races (README, "Integrity"): expiry uses the holders' wall clocks, so clocks skewed by
more than `ttl` break it; a holder stalled past `ttl` (SIGSTOP, a VM pause) loses the lease and
learns it only at its next renewal (`lost` is then set and the pipeline stops before its next
stage, but a stage already running finishes its current work); locally, a shared filesystem
without working flock gives no exclusion.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, UTC

from peg.config import MAX_LEASE_SECONDS
from peg.store.base import ArtifactStore, StoreError

LEASE_NAME = "_lease.json"
POLL_SECONDS = 1.0
_log = logging.getLogger(__name__)
CLOCK_SLACK_SECONDS = 3_600.0  # how far ahead another host's clock may run before its expiry is nonsense


class LeaseHeld(StoreError):
    """Another live process holds the run's lease; the message names it."""


@dataclass(frozen=True)
class LeaseRecord:
    owner: str
    host: str
    pid: int
    command: str
    acquired: str
    expires: float
    started: float | None = None  # the holder process's start time (`psutil`); None in older records

    def describe(self) -> str:
        left = self.expires - time.time()
        return (f"{self.command!r} (pid {self.pid} on {self.host}, since {self.acquired}, lease "
                + (f"expires in {left:.0f} s)" if left > 0 else f"expired {-left:.0f} s ago)"))


def _is_dead(record: LeaseRecord) -> bool:
    """True if the lease expired, expires later than any run would set (more than
    `MAX_LEASE_SECONDS` plus `CLOCK_SLACK_SECONDS` ahead: not written by a peg run), or its holder
    ran on this host and that process is gone."""
    if record.expires < time.time() or record.expires > time.time() + MAX_LEASE_SECONDS + CLOCK_SLACK_SECONDS:
        return True
    if record.host != socket.gethostname():
        return False
    try:
        os.kill(record.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    # The pid is taken, but by the holder? A restarted container (same pod name, PIDs from 1 again)
    # or a reused pid gives a live process of another start time: the holder is gone.
    return record.started is not None and _process_started(record.pid) != record.started


def _process_started(pid: int) -> float | None:
    """The start time of process `pid` (seconds since the epoch, as psutil reports it), or None."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def parse_lease(data: bytes) -> LeaseRecord | None:
    """The record, or None if it is unreadable (a damaged lease counts as expired)."""
    try:
        return LeaseRecord(**json.loads(data))
    except (ValueError, TypeError):
        return None


class Lease:
    """`with Lease(store, run, ttl):` holds the run's lease, renewing it until the block exits."""

    def __init__(self, store: ArtifactStore, run: str, ttl: float, command: str = ""):
        self.store = store
        self.key = f"{run}/{LEASE_NAME}"
        self.ttl = ttl
        self.owner = uuid.uuid4().hex
        self.started = _process_started(os.getpid())
        self.command = command or " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))
        self.acquired = datetime.now(UTC).isoformat(timespec="seconds")
        self.lost = threading.Event()
        self._token: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _payload(self) -> bytes:
        record = LeaseRecord(self.owner, socket.gethostname(), os.getpid(), self.command, self.acquired,
                             time.time() + self.ttl, self.started)
        return json.dumps(asdict(record), indent=2).encode() + b"\n"

    def _held_by_us(self) -> bool:
        """After an ambiguous answer (a retried request), read back whose lease it is."""
        current = self.store.read_object(self.key)
        if current is not None and (record := parse_lease(current[0])) is not None and record.owner == self.owner:
            self._token = current[1]
            return True
        return False

    def acquire(self, wait: float = 0.0) -> None:
        """Take the lease, waiting up to `wait` seconds for a live holder; else raise LeaseHeld."""
        deadline = time.monotonic() + wait
        while True:
            token = self.store.create_object(self.key, self._payload())
            if token is not None or self._held_by_us():
                self._token = token or self._token
                break
            current = self.store.read_object(self.key)
            if current is None:
                continue  # released in between: try to create it again
            data, token = current
            holder = parse_lease(data)
            if holder is None or _is_dead(holder):  # dead, expired or damaged: take it over
                new = self.store.replace_object(self.key, self._payload(), token)
                if new is not None or self._held_by_us():
                    self._token = new or self._token
                    break
                continue
            if time.monotonic() >= deadline:
                raise LeaseHeld(f"{self.store.describe()}: run {self.key.rsplit('/', 1)[0]!r} is in use by "
                                f"{holder.describe()}; wait for it to finish, or stop it")
            time.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())) or POLL_SECONDS)
        self._abort_interrupted_uploads(datetime.now(UTC))
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, name="peg-lease", daemon=True)
        self._thread.start()

    def _abort_interrupted_uploads(self, taken: datetime) -> None:
        """Abort the multipart uploads under the run's prefix that started before the lease was
        taken: a holder killed mid-upload left them (the run is ours now, and nothing of ours
        uploads yet); said in the log. A store that refuses the listing is left as it is."""
        run = self.key.rsplit("/", 1)[0]
        try:
            aborted = self.store.abort_interrupted_uploads(run, taken)
        except StoreError as e:
            _log.warning("run %r: could not look for interrupted uploads to abort (%s)", run, e)
            return
        if aborted:
            _log.warning("run %r: aborted %d interrupted multipart upload(s) an earlier process left: %s", run,
                         len(aborted), ", ".join(aborted))

    def renew(self) -> bool:
        """Extend the lease; False (and `lost` set) if it is no longer ours."""
        if self._token is None:
            return False
        new = self.store.replace_object(self.key, self._payload(), self._token)
        if new is None and not self._held_by_us():
            self.lost.set()
            return False
        self._token = new or self._token
        return True

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                if not self.renew():
                    return
            except StoreError:  # a store hiccup: try again at the next period, before the lease runs out
                continue

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._token is not None and not self.lost.is_set():
            try:
                self.store.remove_object(self.key, self._token)
            except StoreError as e:  # the store is down: the lease expires by itself; the run's own error stands
                _log.warning("could not remove the run's lease (%s); it expires in %.0f s",
                                                    e, self.ttl)
        self._token = None

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def break_lease(store: ArtifactStore, run: str, host: str, pid: int) -> LeaseRecord:
    """Remove `run`'s lease if it is held by process `pid` on `host` (as `pipeline status` shows
    it); the removal is a compare-and-swap on the record read, so a lease renewed or taken by
    anyone else in between is left alone. StoreError naming the holder otherwise. Only for a
    holder that is gone: a live holder notices at its next renewal and stops before its next stage."""
    key = f"{run}/{LEASE_NAME}"
    current = store.read_object(key)
    if current is None:
        raise StoreError(f"{store.describe()}: run {run!r} has no lease to break")
    record = parse_lease(current[0])
    if record is not None and (record.host, record.pid) != (host, pid):
        raise StoreError(f"{store.describe()}: the lease of run {run!r} is held by pid {record.pid} on {record.host}, "
                         f"not pid {pid} on {host}: nothing broken")
    if not store.remove_object(key, current[1]):
        raise StoreError(f"{store.describe()}: the lease of run {run!r} changed while breaking it: nothing broken")
    return record or LeaseRecord("?", host, pid, "(damaged record)", "?", 0.0)


def read_lease(store: ArtifactStore, run: str) -> LeaseRecord | None:
    """The current lease record of `run`, if any (for `pipeline status`)."""
    current = store.read_object(f"{run}/{LEASE_NAME}")
    return parse_lease(current[0]) if current else None
