"""One error base: every project error derives from PegError and the CLI maps it in one place."""

from __future__ import annotations

import ast
import builtins
from pathlib import Path

import pytest
from typer.testing import CliRunner

from peg.cli import app
from peg.errors import PegError

PEG = Path(__file__).resolve().parents[1] / "peg"

# Exceptions that never reach a user, each caught where it is raised, and why.
INTERNAL = {
    "KeyConflict": "peg/config.py: a cross-field check; loading reports it as a ConfigError at its key",
    "DamagedRecord": "peg/pipeline/state.py: a stage record that does not read; the pipeline shows the stage as partial",
    "Rejected": "peg/operator/api.py: the API server refused a request; the operator reports it in the status",
}


def exception_classes() -> dict[str, list[str]]:
    """Every class in peg/ that derives (by its base names) from a builtin exception: name -> the
    names on its path up to that builtin."""
    bases: dict[str, list[str]] = {}
    for path in PEG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef):  # classes of the same name: their bases together
                bases.setdefault(node.name, []).extend(b.id if isinstance(b, ast.Name) else b.attr for b in node.bases
                                                       if isinstance(b, ast.Name | ast.Attribute))

    def chain(name: str) -> list[str] | None:
        if isinstance(getattr(builtins, name, None), type) and issubclass(getattr(builtins, name), BaseException):
            return [name]
        for base in bases.get(name, []):
            if (up := chain(base)) is not None:
                return [name, *up]
        return None

    return {name: found for name in bases if (found := chain(name)) is not None}


def test_every_error_class_derives_from_peg_error_or_is_caught_inside():
    found = exception_classes()
    assert {"ConfigError", "DataError", "StoreError", "ModelError", "ShardsFailed", "TrainError", "StageFailed",
            "ClusterError"} <= found.keys()  # the walk sees them
    outside = {name: path for name, path in found.items() if "PegError" not in path and name != "PegError"}
    assert outside.keys() == INTERNAL.keys(), f"derive these from PegError (peg/errors.py) or list them: {outside}"


def test_cli_maps_any_peg_error_to_one_line_and_exit_2():
    @app.command("raise-peg-error", hidden=True)
    def _raise() -> None:
        raise PegError("some.yaml:3: key 'x': broken")

    try:
        result = CliRunner().invoke(app, ["raise-peg-error"])
    finally:
        app.registered_commands.pop()
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == ["error: some.yaml:3: key 'x': broken"]


def test_cli_maps_an_unexpected_error_to_one_line_and_exit_2_and_shows_it_with_v():
    @app.command("raise-os-error", hidden=True)
    def _raise() -> None:
        raise IsADirectoryError(21, "Is a directory", "/store/run/_lease.json")

    try:
        quiet = CliRunner().invoke(app, ["raise-os-error"])
        verbose = CliRunner().invoke(app, ["-v", "raise-os-error"])
    finally:
        app.registered_commands.pop()
    assert quiet.exit_code == 2
    assert quiet.output.strip().splitlines() == [
        "error: /store/run/_lease.json: Is a directory (rerun with -v for the traceback)"]
    assert isinstance(verbose.exception, IsADirectoryError)  # -v: the exception and its traceback


WORKERS_FAIL = """
import sys
from pathlib import Path

import peg.train.trainer as trainer
from peg.config import RunConfig
from peg.console import capture

capture("train")  # as `peg train` does: this process's and its children's output goes to the log
crash = "import sys; print('Traceback (most recent call last):', file=sys.stderr); " \\
        "sys.exit('OSError: [Errno 28] No space left on device')"
trainer.torchrun_command = lambda *args, **kwargs: [sys.executable, "-c", crash]
config = RunConfig.model_validate({"name": "t", "model": {"name_or_path": "m"}})
try:
    trainer.launch(config, Path(sys.argv[1]), resume=False, pretrain=True)
except trainer.TrainError as e:
    Path(sys.argv[2]).write_text(str(e))
"""


@pytest.mark.slow
def test_failed_training_workers_show_the_cause_their_log_holds(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PEG_LOG_DIR": str(tmp_path / "logs")}
    env.pop("PEG_LOG_FILE", None)
    subprocess.run([sys.executable, "-c", WORKERS_FAIL, str(tmp_path / "out"), str(tmp_path / "message")], env=env,
                   check=True, stdin=subprocess.DEVNULL)
    assert (tmp_path / "message").read_text() == (
        "training workers failed (exit status 1): OSError: [Errno 28] No space left on device")
