"""Every README snippet runs as written, and every `visaudit ...` command line in it parses.

The ```python snippets run, in order, in a folder where ``visaudit-out`` (the default ``--out``,
the README's convention) holds two tiny real runs of the same model and data and their
comparison. A snippet that needs what a test machine cannot have (a git remote and a work
pool, a Slack workspace) is preceded in the README by ``<!-- not run by tests: REASON -->``.
The command lines (```bash blocks) are parsed by the command line itself, without running:
every option must exist and every value must have its option's type.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer
from conftest import make_shapes
from typer.testing import CliRunner

from visaudit.flows.cli import app

README = Path(__file__).resolve().parent.parent / "README.md"
NOT_RUN = re.compile(r"<!-- not run by tests: (.+?) -->\s*$")
runner = CliRunner()


def blocks(language: str) -> list[tuple[int, str, str | None]]:
    """(line, code, reason it is not run) of every fenced block in ``language``."""
    lines = README.read_text().splitlines()
    out, start = [], None
    for number, line in enumerate(lines):
        if start is None and line.strip() == f"```{language}":
            start = number + 1
        elif start is not None and line.strip() == "```":
            before = next((lines[i] for i in range(start - 2, -1, -1) if lines[i].strip()), "")
            reason = NOT_RUN.search(before)
            out.append((start, "\n".join(lines[start:number]), reason[1] if reason else None))
            start = None
    return out


def command_lines() -> list[tuple[int, list[str]]]:
    """Every ``visaudit`` invocation in the README's bash blocks, as argument lists."""
    found = []
    for line_number, code, _ in blocks("bash"):
        for offset, line in enumerate(code.splitlines()):
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if words and Path(words[0]).name == "visaudit":
                    found.append((line_number + offset + 1, words[1:]))
    return found


@pytest.fixture(scope="module")
def readme_folder(tmp_path_factory, prefect_api):
    """A folder whose ``visaudit-out`` holds two tiny runs of one model on one source and their comparison."""
    import conftest
    import torch

    root = tmp_path_factory.mktemp("readme")
    manifest = make_shapes(root / "data", {"red": 4, "green": 4, "blue": 4})
    (root / "tiny_model.py").write_text(conftest.TINY_MODEL)
    namespace: dict = {}
    exec(conftest.TINY_MODEL, namespace)
    torch.save(namespace["build"](3).state_dict(), root / "tiny.pt")
    out = root / "visaudit-out"
    with conftest.using_prefect_api(prefect_api):
        for _ in range(2):
            result = runner.invoke(app, ["run", str(manifest), "--out", str(out), "--model",
                                         f"{root / 'tiny_model.py'}:build", "--weights", str(root / "tiny.pt"),
                                         "--resize", "48", "--crop", "48", "--no-pdf", "--no-sanity-check",
                                         "--no-setup-checks", "-q"])
            assert result.exit_code == 0, result.output
        runs = sorted(p.name for p in (out / "runs").iterdir() if (p / "run.json").exists())
        result = runner.invoke(app, ["compare", *runs, "--out", str(out), "--no-pdf"])
        assert result.exit_code == 0, result.output
        yield root


def test_every_python_snippet_runs_as_written(readme_folder, monkeypatch) -> None:
    snippets = blocks("python")
    assert len(snippets) >= 5
    monkeypatch.chdir(readme_folder)
    for line, code, reason in snippets:
        if reason:
            continue
        try:
            exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "readme"})
        except Exception as exc:  # the snippet's own line in the failure
            pytest.fail(f"README.md line {line}: {type(exc).__name__}: {exc}")
    assert sum(reason is None for _, _, reason in snippets) >= len(snippets) - 2


@pytest.mark.parametrize(("line", "args"), command_lines(), ids=lambda v: str(v) if isinstance(v, int) else None)
def test_every_command_line_parses(line, args) -> None:
    command = typer.main.get_command(app)
    name, rest = args[0], args[1:]
    assert name in command.commands, f"README.md line {line}: no command {name!r}"
    sub = command.commands[name]
    try:
        sub.make_context(name, list(rest), resilient_parsing=False)
    except Exception as exc:
        pytest.fail(f"README.md line {line}: visaudit {' '.join(args)}: {exc}")
