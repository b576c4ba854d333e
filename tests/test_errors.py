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
