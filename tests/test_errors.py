"""One error base: every project error derives from PegError and the CLI maps it in one place."""

from __future__ import annotations

import typer
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
