"""peg.console: the user's console gets peg's lines and warnings; everything else a process, its
native code or its children write lands in the log file; -v shows it all."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import logging, os, subprocess, sys, warnings
from peg.console import capture, console
log = capture("probe", verbose=len(sys.argv) > 1)
console().print("peg line")
logging.getLogger("peg.probe").warning("peg warning")
logging.getLogger("ray").info("Started a local Ray instance.")
print("library print"); sys.stdout.flush()
os.write(2, b"native stderr\\n")
warnings.warn("torch deprecation", DeprecationWarning, stacklevel=1)
subprocess.run([sys.executable, "-c", "import sys; print('child stdout'); sys.stderr.write('child stderr\\\\n')"])
subprocess.run([sys.executable, "-c", "from peg.console import capture, console; capture('child'); console().print('child console')"])
console().print("parent after child")
open(os.environ["PROBE_OUT"], "w").write(str(log))
"""
NOISE = ("library print", "native stderr", "child stdout", "child stderr", "Started a local Ray", "torch deprecation")


def probe_env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PEG_LOG_DIR": str(tmp_path),
           "PROBE_OUT": str(tmp_path / "where")}
    for name in ("PEG_LOG_FILE", "PEG_CONSOLE", "PEG_VERBOSE", "KUBERNETES_SERVICE_HOST"):
        env.pop(name, None)
    return env


def run_probe(tmp_path: Path, *args: str) -> tuple[str, str]:
    env = probe_env(tmp_path)
    proc = subprocess.run([sys.executable, "-W", "always", "-c", SCRIPT, *args], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    log = Path((tmp_path / "where").read_text().strip()).read_text()
    return proc.stdout + proc.stderr, log


@pytest.mark.slow
def test_console_shows_peg_and_the_log_file_gets_the_rest(tmp_path):
    console, log = run_probe(tmp_path)
    assert console.splitlines() == ["peg line", "warning: peg warning", "child console", "parent after child"]
    for noise in NOISE:
        assert noise in log, noise
    assert "peg warning" in log  # peg's own records are in the log too


@pytest.mark.slow
def test_verbose_shows_everything(tmp_path):
    console, log = run_probe(tmp_path, "-v")
    for line in ("peg line", "warning: peg warning", *NOISE[:4]):
        assert line in console, line
    assert "peg warning" in log


@pytest.mark.slow
def test_a_console_redirected_to_a_file_keeps_every_line(tmp_path):
    """`peg ... > out.txt` and `>> out.txt`: the children reopen the console file, and nobody
    truncates it or writes over another process's lines."""
    for mode, before in (("w", ""), ("a", "earlier output\n")):
        out = tmp_path / f"console-{mode}.txt"
        out.write_text(before)
        with out.open(mode) as f:
            proc = subprocess.run([sys.executable, "-c", SCRIPT], env=probe_env(tmp_path), stdout=f, stderr=f, timeout=120)
        assert proc.returncode == 0, out.read_text()
        assert out.read_text() == before + "peg line\nwarning: peg warning\nchild console\nparent after child\n"


def _console_lines(monkeypatch, tick_s: int, every_s: int):
    """A console that is not a terminal, captured; each reading of the clock `tick_s` after the last."""
    import io

    from rich.console import Console

    from peg import progress

    clock = iter(range(0, 100_000, tick_s))
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    monkeypatch.setenv("PEG_PROGRESS_EVERY", str(every_s))
    out = io.StringIO()
    monkeypatch.setattr(progress, "console", lambda: Console(file=out, force_terminal=False, width=200))
    return out


def test_progress_on_a_console_that_is_not_a_terminal_comes_as_lines_with_rate_and_eta(monkeypatch):
    """A pod's log or a redirected console gets the bar's figures as plain lines (rich would print
    the bar only once the loop ended); a terminal keeps the redrawn bar."""
    import io

    from rich.console import Console

    from peg import progress

    out = _console_lines(monkeypatch, tick_s=10, every_s=25)
    with progress.progress_bar(400, "encode passages", unit="passages") as advance:
        for _ in range(4):
            advance(100, status="shard 1")
    lines = out.getvalue().splitlines()
    # started at 0; the updates read 10, 20, 30 (a line: 25 s passed), 40; the end reads 50
    assert lines[0] == "encode passages 300/400 75% 10.0 passages/s elapsed 0:00:30 ETA 0:00:10 shard 1"
    assert lines[-1].startswith("encode passages 400/400 100% ") and lines[-1].endswith("ETA 0:00:00 shard 1")
    assert len(lines) == 2

    terminal = io.StringIO()
    monkeypatch.setattr(progress, "console", lambda: Console(file=terminal, force_terminal=True, width=200))
    with progress.progress_bar(4, "train", unit="step") as advance:
        advance(4)
    assert "━" in terminal.getvalue() and "4/4" in terminal.getvalue()


def test_a_slow_loop_shows_its_rate_per_minute(monkeypatch):
    """An LLM shard every 2 minutes reads `0.5 shards/min`, not `0.0 shards/s`; the closing line is not
    printed twice."""
    from peg import progress

    out = _console_lines(monkeypatch, tick_s=120, every_s=60)
    with progress.progress_bar(4, "synth", unit="shards") as advance:
        for _ in range(4):
            advance(1)
    lines = out.getvalue().splitlines()
    assert lines[0] == "synth 1/4 25% 0.5 shards/min elapsed 0:02:00 ETA 0:06:00", lines[0]
    # every update printed a line, the last one 4/4: the end adds no second 4/4 line
    assert [line.split()[1] for line in lines] == ["1/4", "2/4", "3/4", "4/4"], lines
