"""Process lifetimes: children that die with their parent, and what a PID 1 owes its children.

`die_with_parent()`: on Linux, asks the kernel (prctl PR_SET_PDEATHSIG) to SIGKILL this process
when its parent exits, however the parent ends. torchrun starts its workers in new sessions, so a
process-group kill does not reach them: each worker calls this at start, and torchrun itself is
started as `python -m peg.process torch.distributed.run ...` (this module as a wrapper). The
parent it watches is the one named by `PEG_PARENT_PID` (set by `child_env()` in the spawner and by
the wrapper for its own children), else the parent found at the call. A parent that is PID 1 is
a parent like any other: a container's command is PID 1, and its children must live.

`serve_as_init()`: a container's command is PID 1 of its PID namespace (in a Kubernetes pod too,
without shareProcessNamespace), and the kernel gives PID 1 no default signal actions (SIGTERM from
the kubelet would be ignored) and all orphans to reap. Every `peg` entrypoint calls it first: as
PID 1 it forks, the child runs the command, and PID 1 forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT,
SIGUSR1 and SIGUSR2 to it, reaps every process that exits, and exits with the child's status
(128 + N when signal N ended it), like `tini`. Anywhere else it does nothing.
Elsewhere than Linux (macOS) both do nothing.

`available_cpus()`: the CPUs this process may use, as a container's CPU limit sets them (cgroup v2
`cpu.max`, v1 `cpu.cfs_quota_us`), not the host's core count that `os.cpu_count()` reports.
"""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import sys
from collections.abc import Mapping

_PR_SET_PDEATHSIG = 1
PARENT_PID_ENV = "PEG_PARENT_PID"
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def _cgroup_cpu_limit(root: str) -> float | None:
    """The CPU quota of this process's cgroup under `root` (v2, then v1), or None when unlimited."""
    try:
        quota, period = open(f"{root}/cpu.max").read().split()  # v2: "max 100000" or "150000 100000"
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(open(f"{root}/cpu/cpu.cfs_quota_us").read())
        period = int(open(f"{root}/cpu/cpu.cfs_period_us").read())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cpus(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """Whole CPUs this process may use: its CPU affinity, capped by its cgroup's CPU quota
    (a container's CPU limit; a fraction rounds down, never below 1)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = _cgroup_cpu_limit(cgroup_root)
    return max(1, min(cpus, int(limit))) if limit is not None else cpus


def child_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` plus this process's PID as the parent a `die_with_parent()` child watches."""
    return {**env, PARENT_PID_ENV: str(os.getpid())}


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Have the kernel send `sig` to this process when its parent exits (Linux only).

    The parent is `$PEG_PARENT_PID` when set, else the parent at the call. When it is no longer
    this process's parent once the signal is armed (it exited first), `sig` comes at once.
    """
    if not sys.platform.startswith("linux"):
        return
    parent = int(os.environ.get(PARENT_PID_ENV) or os.getppid())
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the parent was gone before the signal was armed
        os.kill(os.getpid(), sig)


def serve_as_init() -> None:
    """As PID 1: fork; return in the child; in PID 1 forward signals, reap, exit with the child's status."""
    if os.getpid() != 1 or not sys.platform.startswith("linux"):
        return
    watched = {*FORWARDED_SIGNALS, signal.SIGCHLD}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, watched)  # none is lost between fork and wait
    child = os.fork()
    if child == 0:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        return
    while True:
        received = signal.sigwaitinfo(watched)
        if received.si_signo != signal.SIGCHLD:
            try:
                os.kill(child, received.si_signo)
            except ProcessLookupError:  # exited; its SIGCHLD is pending
                pass
            continue
        while True:  # reap everything that has exited: the child and any orphan handed to PID 1
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid == child:
                code = os.waitstatus_to_exitcode(status)
                os._exit(128 - code if code < 0 else code)


def main() -> None:
    """`python -m peg.process MODULE ARGS...`: run MODULE as __main__, dying with the parent."""
    if len(sys.argv) < 2:
        sys.exit("usage: python -m peg.process MODULE [ARGS...]")
    die_with_parent()
    os.environ[PARENT_PID_ENV] = str(os.getpid())  # MODULE's children (torchrun's workers) watch this process
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
