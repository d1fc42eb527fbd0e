"""``--help`` at 80 columns names every option in full (a new user once saw "--impression-iter…")."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from visaudit.flows.cli import app
from visaudit.flows.options import request_parameters


def _run_help() -> str:
    result = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "80", "TERM": "dumb"}, terminal_width=80)
    assert result.exit_code == 0, result.output
    return result.stdout  # the help alone: a Prefect server left by another test may log to stderr meanwhile


def test_run_help_at_80_columns_cuts_no_option_name() -> None:
    shown_help = _run_help()
    assert "…" not in shown_help
    shown = set(re.findall(r"--[a-z][a-z0-9-]*", shown_help))
    flags = {f"--{p.name.replace('_', '-')}" for p in request_parameters() if p.name != "source"}
    assert flags <= shown, sorted(flags - shown)
    too_long = [line for line in shown_help.splitlines() if len(line) > 80]
    assert not too_long, too_long


def test_help_keeps_square_brackets_as_written() -> None:
    # Typer reads help as Rich markup: unescaped, "[timm]" vanished from "pip install 'visaudit[timm]'"
    flat = " ".join(re.sub(r"[│\s]+", " ", _run_help()).split())
    assert "'visaudit[timm]'" in flat
    assert "'visaudit[hf]'" in flat
    assert "[0, 1]" in flat
