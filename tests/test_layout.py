"""The package's shape: one importable ``visaudit``, layers that import one way, modules a reader can hold."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 450


def test_imports_run_one_way() -> None:
    """data -> model -> explain -> findings -> audit -> report -> flows, as pyproject's contracts say."""
    from importlinter.cli import lint_imports

    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True) == 0


def test_one_package_and_its_data(tmp_path) -> None:
    """The install provides ``visaudit`` and nothing named ``tasks`` or ``flows`` (checked from a
    folder outside the repository, so the checkout is not on the path); templates and the demo
    recipe are package data, found wherever the package is installed."""
    probe = ("import importlib.util, visaudit.flows.cli, visaudit.tasks.audit.plan; "
             "print(importlib.util.find_spec('tasks'), importlib.util.find_spec('flows'))")
    found = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                           env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert found.returncode == 0, found.stderr
    assert found.stdout.split() == ["None", "None"]
    assert (files("visaudit.templates") / "report.html.j2").is_file()
    assert (files("visaudit.templates") / "report.css").is_file()
    assert (files("visaudit.data") / "demo.toml").is_file()


@pytest.mark.parametrize("folder", ["tasks", "flows"])
def test_no_module_is_too_long_to_read(folder: str) -> None:
    long = {str(path.relative_to(ROOT)): n for path in sorted((ROOT / folder).rglob("*.py"))
            if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"
