"""``visaudit explain``: one image, one panel PNG with every map and the top-5."""

from __future__ import annotations

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from visaudit.flows.cli import app
from visaudit.tasks.explain.panel import gradient_image

runner = CliRunner()


def _image(path) -> str:
    pixels = np.full((64, 64, 3), 40, dtype=np.uint8)
    pixels[16:40, 20:44] = (220, 40, 40)
    Image.fromarray(pixels).save(path)
    return str(path)


def test_explain_writes_a_panel_for_the_predicted_class(tmp_path, tiny_model_file) -> None:
    model, weights = tiny_model_file
    classes = tmp_path / "classes.txt"
    classes.write_text("red\ngreen\nblue\n")
    out = tmp_path / "panel.png"
    result = runner.invoke(app, ["explain", _image(tmp_path / "a.png"), "--model", f"{model}:build",
                                 "--weights", str(weights), "--classes", str(classes), "--crop", "48",
                                 "--resize", "48", "--out", str(out)])
    assert result.exit_code == 0, result.output
    scores = [float(line.split()[0]) for line in result.output.splitlines() if line[:1].isdigit()]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 1e-3
    panel = Image.open(out)
    assert panel.width > 4 * panel.height, "one row: image, four maps and the top-5"
    assert np.asarray(panel.convert("L")).std() > 10, "the panel has content"


def test_explain_named_targets_make_one_row_each(tmp_path, tiny_model_file) -> None:
    model, weights = tiny_model_file
    classes = tmp_path / "classes.txt"
    classes.write_text("red\ngreen\nblue\n")
    one, two = tmp_path / "one.png", tmp_path / "two.png"
    base = ["explain", _image(tmp_path / "a.png"), "--model", f"{model}:build", "--weights", str(weights),
            "--classes", str(classes), "--crop", "48", "--resize", "48"]
    assert runner.invoke(app, [*base, "--out", str(one)]).exit_code == 0
    result = runner.invoke(app, [*base, "--target", "green", "--target", "blue", "--out", str(two)])
    assert result.exit_code == 0, result.output
    assert Image.open(two).height > 1.8 * Image.open(one).height


def test_explain_bad_input_is_one_line(tmp_path, tiny_model_file) -> None:
    model, weights = tiny_model_file
    classes = tmp_path / "classes.txt"
    classes.write_text("red\ngreen\nblue\n")
    base = ["explain", _image(tmp_path / "a.png"), "--model", f"{model}:build", "--weights", str(weights),
            "--classes", str(classes), "--crop", "48", "--resize", "48", "--out", str(tmp_path / "p.png")]
    result = runner.invoke(app, [*base, "--target", "purple"])
    assert result.exit_code == 2 and "purple" in result.output and "Traceback" not in result.output
    base[1] = str(tmp_path / "missing.png")
    result = runner.invoke(app, base)
    assert result.exit_code == 2 and "missing.png" in result.output


def test_gradient_image_is_centred_on_grey() -> None:
    gradient = np.zeros((3, 4, 4), dtype=np.float32)
    gradient[0, 0, 0], gradient[1, 1, 1] = 2.0, -2.0
    pixels = gradient_image(gradient)
    assert pixels.shape == (4, 4, 3)
    assert pixels[0, 0, 0] == 255 and pixels[1, 1, 1] == 0 and pixels[2, 2, 2] == 128
