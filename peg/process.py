"""Child processes that die with their parent: `kill -9` of a launcher leaves no worker behind.

On Linux, `die_with_parent()` asks the kernel (prctl PR_SET_PDEATHSIG) to SIGKILL this process
when its parent exits, however the parent ends. torchrun starts its workers in new sessions, so a
process-group kill does not reach them: each worker calls this at start, and torchrun itself is
started as `python -m peg.process torch.distributed.run ...` (this module as a wrapper).
Elsewhere (macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Have the kernel send `sig` to this process when its parent exits (Linux only)."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if parent == 1 or os.getppid() != parent:  # the parent was gone before the signal was armed
        os.kill(os.getpid(), sig)


def main() -> None:
    """`python -m peg.process MODULE ARGS...`: run MODULE as __main__, dying with the parent."""
    if len(sys.argv) < 2:
        sys.exit("usage: python -m peg.process MODULE [ARGS...]")
    die_with_parent()
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
