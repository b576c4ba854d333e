"""Where output goes: the user's console or the run's log file.

The console gets what a user reads: one line per stage, progress bars (rate and ETA), results,
warnings from peg and one-line errors. Everything else (library logs, Ray, torch, DeepSpeed,
torchrun, every rank's output) goes to a log file, whose path the CLI prints. `capture` sets
this up once per process: it points file descriptors 1 and 2 at the log file (so child
processes, native code and other libraries write there too) and keeps a duplicate of the
original stderr as the console. Child processes inherit `PEG_LOG_FILE`, and `PEG_CONSOLE` names
the console to reopen, so a stage process or a training rank writes its progress bar to the
same terminal. With `verbose`, and in a Kubernetes pod (whose log is the place for everything),
nothing is redirected: the console shows everything.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from pathlib import Path

from rich.console import Console

LOG_FILE_ENV = "PEG_LOG_FILE"
CONSOLE_ENV = "PEG_CONSOLE"
VERBOSE_ENV = "PEG_VERBOSE"

_console: Console | None = None
_log_file: Path | None = None


def console() -> Console:
    """The user's console (stderr unless `capture` redirected this process)."""
    global _console
    if _console is None:
        _console = Console(stderr=True, soft_wrap=True)
    return _console


def log_file() -> Path | None:
    """This command's log file, once `capture` ran."""
    return _log_file


def forget_log_file() -> None:
    """A new command starts (a test runs several in one process): no log file yet."""
    global _log_file
    _log_file = None


def _default_log_file(name: str) -> Path:
    root = Path(os.environ.get("PEG_LOG_DIR", Path.home() / ".cache" / "peg" / "logs"))
    return root / f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{name}-{os.getpid()}.log"


def capture(name: str, verbose: bool = False, show_logs: bool = True) -> Path:
    """Send this process's output and logging to the log file and keep the console for peg.

    A child of a captured process appends to the same file and writes to the same console.
    `show_logs`: peg's INFO and WARNING records are shown on the console (off for ranks > 0).
    """
    global _console, _log_file
    # in a pod everything goes to the pod's log (kubectl logs), as with -v
    verbose = verbose or os.environ.get(VERBOSE_ENV) == "1" or "KUBERNETES_SERVICE_HOST" in os.environ
    path = Path(os.environ.get(LOG_FILE_ENV) or _default_log_file(name))
    path.parent.mkdir(parents=True, exist_ok=True)
    _log_file = path
    if not _has_real_stderr():  # embedded (a test's CliRunner): log to the file, redirect nothing
        _configure_logging(path, verbose, show_logs)
        return path
    os.environ[LOG_FILE_ENV] = str(path)
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
        _console = Console(stderr=True, soft_wrap=True)
    else:
        target = os.environ.get(CONSOLE_ENV)
        if target:  # a child: reopen the console its ancestor kept
            try:
                stream = open(target, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - lives as long as the process
            except OSError:
                stream = open(os.devnull, "w")  # noqa: SIM115 - the ancestor is gone
        else:
            stream = _append_stream(2)
            os.environ[CONSOLE_ENV] = f"/proc/{os.getpid()}/fd/{stream.fileno()}"
        _console = Console(file=stream, soft_wrap=True)
        sys.stdout.flush()
        sys.stderr.flush()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    _configure_logging(path, verbose, show_logs)
    return path


def _append_stream(fd: int):
    """A line-buffered text stream on what `fd` writes to, appending.

    When the console is a file (`peg ... > run.txt`), this process and every child reopening it
    append: nobody truncates it or overwrites another's lines, as separate offsets would.
    """
    try:
        return open(f"/proc/self/fd/{fd}", "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - lives as long as the process
    except OSError:  # a socket, or no /proc: a plain duplicate
        return os.fdopen(os.dup(fd), "w", buffering=1, encoding="utf-8")


def _has_real_stderr() -> bool:
    try:
        return sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):
        return False


class _ConsoleHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        style = "yellow" if record.levelno >= logging.WARNING else None
        prefix = "warning: " if record.levelno >= logging.WARNING else ""
        console().print(prefix + record.getMessage(), style=style, markup=False, highlight=False)


_handlers: list[tuple[logging.Logger, logging.Handler]] = []


def _configure_logging(path: Path, verbose: bool, show_logs: bool) -> None:
    for logger, handler in _handlers:  # a second capture in one process replaces the first
        logger.removeHandler(handler)
        handler.close()
    _handlers.clear()
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setFormatter(logging.Formatter("%(asctime)s %(process)d %(name)s %(levelname)s: %(message)s"))
    root.addHandler(to_file)
    _handlers.append((root, to_file))
    logging.captureWarnings(True)
    peg = logging.getLogger("peg")
    peg.setLevel(logging.DEBUG if verbose else logging.INFO)
    if show_logs:
        handler = _ConsoleHandler()
        peg.addHandler(handler)
        _handlers.append((peg, handler))


_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Interrupt)(?:\[\w+\])?: \S.*$")


def _shared_log() -> Path | None:
    """This process's log file, or the one an ancestor opened (`PEG_LOG_FILE`)."""
    return log_file() or (Path(os.environ[LOG_FILE_ENV]) if os.environ.get(LOG_FILE_ENV) else None)


def log_size() -> int:
    """How many bytes this command's log file holds now (0 without one): a mark for `cause_since`."""
    path = _shared_log()
    try:
        return path.stat().st_size if path else 0
    except OSError:
        return 0


def cause_since(offset: int, limit: int = 1 << 20) -> str | None:
    """The last exception line (`OSError: [Errno 28] No space left on device`) that child
    processes wrote to this command's log file after byte `offset` (at most its last `limit`
    bytes are read): what to show with a child's non-zero exit, whose traceback is in the log."""
    path = _shared_log()
    if path is None:
        return None
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(offset, size - limit))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    found = [line.strip() for line in text.splitlines() if _EXCEPTION_LINE.match(line.strip())]
    return found[-1][:300] if found else None
