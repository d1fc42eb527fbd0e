"""Wrong results that look right: non-finite model outputs, duplicated or BOM-prefixed class
names, labels that match no class name, Parquet null labels, NaN and negative thresholds.
Each is an error per image or a one-line stop, never a plausible-looking audit."""

from __future__ import annotations

import pandas as pd
import pytest
from conftest import make_shapes
from pydantic import ValidationError
from typer.testing import CliRunner

from visaudit.flows.cli import app
from visaudit.tasks.audit.request import AuditRequest
from visaudit.tasks.data.sources import DataSourceError, build_index, class_names_from_index, read_class_file
from visaudit.tasks.data.storage import read_table

runner = CliRunner()

NON_FINITE_MODEL = '''
import torch
from torch import nn


class Scores(nn.Module):
    """Finite scores, except NaN for reddish inputs and +inf for bluish ones (``every``: NaN for all)."""

    def __init__(self, num_classes=3, every=False):
        super().__init__()
        torch.manual_seed(0)
        self.every = every
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))

    def forward(self, x):
        scores = self.head(self.features(x))
        if self.every:
            return scores * float("nan")
        redness = x[:, 0] - x[:, 2]  # normalised red minus blue, per pixel: > 2 on red, < -2 on blue
        scores = torch.where((redness.amax(dim=(1, 2)) > 2)[:, None], torch.full_like(scores, float("nan")), scores)
        return torch.where((redness.amin(dim=(1, 2)) < -2)[:, None], torch.full_like(scores, float("inf")), scores)


def some(num_classes=3):
    return Scores(num_classes)


def every(num_classes=3):
    return Scores(num_classes, every=True)
'''


def _run(tmp_path, source, factory: str, *extra: str):
    module = tmp_path / "scores_model.py"
    module.write_text(NON_FINITE_MODEL)
    return runner.invoke(app, ["run", str(source), "--out", str(tmp_path / "out"), "--model", f"{module}:{factory}",
                               "--crop", "48", "--resize", "48", "--no-pdf", "-q", "--no-sanity-check", *extra])  # setup checks on: they must cope


def test_non_finite_scores_are_an_error_per_image_never_a_prediction(tmp_path) -> None:
    data = tmp_path / "data"
    make_shapes(data, {"red": 3, "green": 3, "blue": 3})
    result = _run(tmp_path, data, "some")
    assert result.exit_code == 0, result.output
    assert "audited 3 of 9 images (6 unreadable)" in result.output
    predictions = read_table(tmp_path / "out", "predictions")
    by_class = predictions.groupby(predictions["labels"].str[0])
    assert by_class["error"].apply(lambda e: e.str.contains("NaN or infinite").sum()).to_dict() == {
        "blue": 3, "green": 0, "red": 3}
    bad = predictions[predictions["error"].notna()]
    assert bad["confidence"].isna().all() and bad["correct"].isna().all() and bad["predicted"].isna().all()
    assert predictions["confidence"].dropna().between(0, 1).all()


def test_a_model_with_no_finite_score_stops_with_one_line(tmp_path) -> None:
    data = tmp_path / "data"
    make_shapes(data, {"red": 2, "green": 2, "blue": 2})
    result = _run(tmp_path, data, "every")
    assert result.exit_code == 2, result.output
    assert "NaN or infinite scores for every readable image" in result.output
    assert "Traceback" not in result.output and "accuracy" not in result.output


def test_duplicated_class_names_are_refused(tmp_path) -> None:
    path = tmp_path / "classes.txt"
    path.write_text("red\ngreen\nred\n")
    with pytest.raises(DataSourceError, match=r"classes\.txt: class name\(s\) listed twice: 'red' \(lines 1, 3\)"):
        read_class_file(path)


def test_a_classes_file_with_a_utf8_bom_is_read_right(tmp_path) -> None:
    path = tmp_path / "classes.txt"
    path.write_bytes("\ufeffblue\ngreen\nred\n".encode())
    assert read_class_file(path) == ["blue", "green", "red"]


def test_numeric_labels_that_match_no_class_name_stop_with_the_fix(tmp_path) -> None:
    data = tmp_path / "data"
    manifest = make_shapes(data, {"red": 2, "green": 2, "blue": 2})
    frame = pd.read_csv(manifest)
    frame["label"] = frame["label"].map({"blue": 0, "green": 1, "red": 2})
    frame.to_csv(manifest, index=False)
    (tmp_path / "classes.txt").write_text("blue\ngreen\nred\n")
    result = _run(tmp_path, manifest, "some", "--classes", str(tmp_path / "classes.txt"))
    assert result.exit_code == 2, result.output
    assert "manifest.csv: no label matches a class name (labels 0, 1, 2; classes blue, green, red)" in result.output
    assert "look like class indices" in result.output and "Traceback" not in result.output


def test_a_parquet_null_label_is_no_label_not_a_class_called_nan(tmp_path) -> None:
    make_shapes(tmp_path, {"red": 2})
    pd.DataFrame({"path": ["red/000.png", "red/001.png"], "label": ["red", None]}).to_parquet(tmp_path / "m.parquet")
    index = build_index(tmp_path / "m.parquet")
    assert index["labels"].tolist() == [["red"], []]
    assert class_names_from_index(index) == ["red"]
    pd.DataFrame({"path": ["red/000.png"], "label": [["red", None]]}).to_parquet(tmp_path / "l.parquet")
    assert build_index(tmp_path / "l.parquet")["labels"].tolist() == [["red"]]


@pytest.mark.parametrize(("name", "value"), [
    ("slice_margin", float("nan")), ("confident_error_share", -0.1), ("confused_pair_share", 1.5),
    ("off_object_share", float("inf")),
])
def test_nan_negative_and_out_of_range_thresholds_are_refused_by_name(name, value) -> None:
    with pytest.raises(ValidationError, match=f"threshold {name}="):
        AuditRequest(source="x", thresholds={name: value})


def test_a_nan_threshold_on_the_command_line_is_one_line(tmp_path) -> None:
    result = runner.invoke(app, ["run", str(tmp_path), "--threshold", "slice_margin=NaN", "--arch", "resnet18"])
    assert result.exit_code == 2 and "--threshold: threshold slice_margin=nan" in result.output, result.output
