"""``--help`` at 80 columns names every option in full (a new user once saw "--impression-iter…")."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from visaudit.flows.cli import app
from visaudit.flows.options import request_parameters


def test_run_help_at_80_columns_cuts_no_option_name() -> None:
    result = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "80", "TERM": "dumb"}, terminal_width=80)
    assert result.exit_code == 0, result.output
    assert "…" not in result.output
    shown = set(re.findall(r"--[a-z][a-z0-9-]*", result.output))
    flags = {f"--{p.name.replace('_', '-')}" for p in request_parameters() if p.name != "source"}
    assert flags <= shown, sorted(flags - shown)
    assert max(len(line) for line in result.output.splitlines()) <= 80
