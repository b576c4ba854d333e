"""peg.process: children die with their parent, and a peg that is PID 1 (a container's command)
keeps its children alive, forwards SIGTERM to them and reaps orphans. PID 1 is made with
`unshare -fp --mount-proc` (a new PID namespace, as a container has), which needs root."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # real process trees of peg and torchrun wrappers

ROOT = Path(__file__).resolve().parents[1]

needs_pid_namespace = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None or not sys.platform.startswith("linux"),
    reason="PID 1 is made with `unshare -fp --mount-proc`: needs Linux, root and util-linux",
)


def as_pid_1(args: list[str], **kwargs) -> subprocess.Popen:
    """Start `args` as PID 1 of a new PID namespace; this repository's peg first on the path."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(["unshare", "-fp", "--mount-proc", *args], env=env, **kwargs)


def python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


@needs_pid_namespace
def test_a_peg_process_child_of_pid_1_lives():
    """A container's command starts torchrun / a stage through peg.process: it must not kill itself."""
    proc = as_pid_1(python("""
        import os, subprocess, sys
        assert os.getpid() == 1
        child = subprocess.run([sys.executable, "-m", "peg.process", "this"], capture_output=True, text=True)
        print(child.returncode, "Beautiful is better than ugly" in child.stdout)
    """), stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=60)
    assert out.split() == ["0", "True"]  # fc691a9: -9 False (SIGKILL at once: "the parent is PID 1")


def test_a_child_whose_parent_exited_before_arming_dies_at_once():
    """The parent named by PEG_PARENT_PID is not this process's parent any more: SIGKILL at once."""
    not_the_parent = os.getpid()  # the child's parent is the shell below, not this process
    result = subprocess.run(
        ["sh", "-c", f'{sys.executable} -m peg.process this; echo "status $?"'],
        env={**os.environ, "PYTHONPATH": str(ROOT), "PEG_PARENT_PID": str(not_the_parent)},
        capture_output=True, text=True, timeout=60,
    )
    assert result.stdout.strip() == f"status {128 + signal.SIGKILL}"


def test_the_wrapper_names_itself_the_parent_of_its_children(tmp_path):
    """torchrun's workers (children of the wrapped module) watch the wrapper, whatever env it got."""
    (tmp_path / "probe.py").write_text("import os\nprint(os.environ['PEG_PARENT_PID'] == str(os.getpid()))\n")
    result = subprocess.run(
        [sys.executable, "-m", "peg.process", "probe"], capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": f"{ROOT}:{tmp_path}", "PEG_PARENT_PID": str(os.getpid())},
    )
    assert result.stdout.strip() == "True"


def namespace_init(unshare_pid: int) -> int:
    """The host PID of the PID 1 that `unshare -f` (process `unshare_pid`) started."""
    for _ in range(100):
        children = Path(f"/proc/{unshare_pid}/task/{unshare_pid}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.05)
    raise AssertionError("unshare started no PID 1")


@needs_pid_namespace
def test_pid_1_forwards_sigterm_reaps_orphans_and_exits_with_the_child_status(tmp_path):
    ready = tmp_path / "ready"
    proc = as_pid_1(python(f"""
        import os, signal, sys, time
        from peg.process import serve_as_init
        serve_as_init()
        assert os.getpid() != 1  # the command runs in PID 1's child
        if os.fork() == 0:  # an orphan: its parent exits at once, it exits soon after
            if os.fork() == 0:
                time.sleep(0.2)
                os._exit(0)
            os._exit(0)
        os.wait()
        time.sleep(1)
        zombies = [p for p in os.listdir("/proc") if p.isdigit()
                   and open(f"/proc/{{p}}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"]
        print("zombies", len(zombies), flush=True)
        signal.signal(signal.SIGTERM, lambda *_: (print("SIGTERM", flush=True), sys.exit(7)))
        open({str(ready)!r}, "w").close()
        time.sleep(60)
    """), stdout=subprocess.PIPE, text=True)
    init = namespace_init(proc.pid)
    for _ in range(200):
        if ready.exists():
            break
        time.sleep(0.05)
    os.kill(init, signal.SIGTERM)  # what the kubelet sends the container's PID 1
    out, _ = proc.communicate(timeout=30)
    assert out.split() == ["zombies", "0", "SIGTERM"]
    assert proc.returncode == 7


@needs_pid_namespace
def test_a_signal_that_ends_the_child_is_pid_1s_exit_status_128_plus_n():
    proc = as_pid_1(python("""
        import os, signal
        from peg.process import serve_as_init
        serve_as_init()
        os.kill(os.getpid(), signal.SIGKILL)
    """))
    assert proc.wait(timeout=30) == 128 + signal.SIGKILL


@needs_pid_namespace
def test_the_peg_cli_as_pid_1_keeps_its_exit_status(tmp_path):
    """`peg ...` as a container's command: PID 1 serves as init, the command's status comes out."""
    proc = as_pid_1([sys.executable, "-m", "peg", "config", "show", str(tmp_path / "missing.yaml")],
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    assert "missing.yaml" in out


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "max 100000\n"}, None),  # cgroup v2, no limit
        ({"cpu.max": "150000 100000\n"}, 1),  # 1.5 CPUs: whole CPUs, rounded down
        ({"cpu.max": "50000 100000\n"}, 1),  # half a CPU: never below 1
        ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2),  # cgroup v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),  # v1, no limit
        ({}, None),  # no cgroup files (macOS, a sandbox)
    ],
)
def test_available_cpus_is_the_containers_cpu_limit(tmp_path, files, expected):
    from peg.process import available_cpus

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    affinity = len(os.sched_getaffinity(0))
    assert available_cpus(str(tmp_path)) == (affinity if expected is None else min(affinity, expected))
