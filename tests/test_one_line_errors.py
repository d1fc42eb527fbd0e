"""Crashes where a one-line error belongs: one readable image among many (every detector on a
degenerate sample), ``--out`` naming a file, ``--methods ""``, and a model that raises mid-run
(Prefect's failure log must not print its traceback before the one-line error)."""

from __future__ import annotations

import pytest
from conftest import make_shapes
from typer.testing import CliRunner

from visaudit.flows.cli import app
from visaudit.tasks.data.storage import read_table

runner = CliRunner()

RAISING_MODEL = '''
import torch
from torch import nn


class LateFailure(nn.Module):
    """Fine on the loader's probe (one image), raises on a shard's batch."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))

    def forward(self, x):
        if x.shape[0] > 1:
            raise RuntimeError("CUDA error: device-side assert triggered")
        return self.head(self.features(x))


def build(num_classes=3):
    return LateFailure(num_classes)
'''


def _args(tmp_path, source, model: str, weights: str | None = None) -> list[str]:
    return ["run", str(source), "--out", str(tmp_path / "out"), "--model", model, *(
        ["--weights", weights] if weights else []), "--crop", "48", "--resize", "48", "--no-pdf", "-q"]


def test_one_readable_image_among_many_completes_and_commits(tmp_path, tiny_model_file) -> None:
    data = tmp_path / "data"
    make_shapes(data, {"red": 1})
    (data / "manifest.csv").unlink()
    for name in ("green", "blue"):
        (data / name).mkdir()
        for i in range(4):
            (data / name / f"{i}.png").write_bytes(b"not an image")
    model, weights = tiny_model_file
    result = runner.invoke(app, _args(tmp_path, data, f"{model}:build", str(weights)))
    assert result.exit_code == 0, result.output
    assert "audited 1 of 9 images (8 unreadable)" in result.output
    predictions = read_table(tmp_path / "out", "predictions")
    assert len(predictions) == 9 and predictions["error"].notna().sum() == 8, "committed, every row there"
    assert not list((tmp_path / "out" / "tables").glob("*/_tmp-*")), "nothing left staged"
    findings = read_table(tmp_path / "out", "findings")
    assert not findings["kind"].isin(["slice_gap", "confident_error", "shortcut_property"]).any(), \
        "one image is not judged by per-class or per-slice rates"


def test_out_pointing_at_a_file_is_one_line(tmp_path, tiny_model_file) -> None:
    make_shapes(tmp_path / "data", {"red": 2})
    (tmp_path / "out").write_text("a file")
    model, weights = tiny_model_file
    result = runner.invoke(app, _args(tmp_path, tmp_path / "data", f"{model}:build", str(weights)))
    assert result.exit_code == 2, result.output
    assert result.output.strip() == f"error: {tmp_path / 'out'}: --out must be a folder, and this is a file; name a " \
                                    "folder (it is created if missing)"


def test_empty_methods_is_one_line(tmp_path, tiny_model_file) -> None:
    model, weights = tiny_model_file
    result = runner.invoke(app, [*_args(tmp_path, tmp_path, f"{model}:build", str(weights)), "--methods", ""])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == "error: --methods: no method given; name at least one, e.g. --methods gradcam"


@pytest.mark.parametrize(("extra", "stage"), [
    (["--no-setup-checks"], "the audit failed"),  # raised in a shard, inside the Prefect flow
    ([], "the run could not be prepared"),  # raised by the setup checks, while planning
])
def test_a_model_that_raises_mid_run_prints_one_line_and_no_traceback(tmp_path, extra, stage) -> None:
    data = tmp_path / "data"
    make_shapes(data, {"red": 2, "green": 2, "blue": 2})
    module = tmp_path / "late.py"
    module.write_text(RAISING_MODEL)
    result = runner.invoke(app, [*_args(tmp_path, data, f"{module}:build"), *extra])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith(f"error: {stage}: RuntimeError: CUDA error: device-side assert triggered")
    assert "Traceback" not in result.output and not any("Task run failed" in line for line in lines), result.output
