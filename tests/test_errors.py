"""One error base: every project error derives from PegError and the CLI maps it in one place."""

from __future__ import annotations

from typer.testing import CliRunner

from peg.cli import app
from peg.config import ConfigError
from peg.data import DataError
from peg.errors import PegError
from peg.store import StoreError


def test_project_errors_share_one_base():
    for error in (ConfigError, DataError, StoreError):
        assert issubclass(error, PegError)


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
