"""The root of peg's error types, at the bottom of the import graph (it imports nothing).

Every error peg reports to a user derives from `PegError`: its `str()` is one line that names
the file, line, key, store key or model at fault. The CLI maps any `PegError` to exit code 2 and
prints that line; library code raises, never prints, and never says which command to rerun.
"""

from __future__ import annotations


class PegError(Exception):
    """An error the user can act on; `str()` is one line naming what is at fault.

    `bad_input`: the cause is the user's input (config, data, model name), fully named in the
    message; other errors also point at the command's log file.
    """

    bad_input = False
