"""Setup checks: a wrong preprocessing or class order stops with the one-line fix; a model near
chance is said so on the cover; the right setup audits as before; --no-setup-checks audits as given.

The model is a small CNN trained here in a few seconds on 32-px stripe images whose class is
the stripes' period (2, 4 or 8 px): at its native size it is right on most held-out images,
resized to 224 px (the default preprocessing) the periods blur into each other.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import using_prefect_api
from PIL import Image
from pypdf import PdfReader
from scipy.stats import binomtest
from typer.testing import CliRunner

from visaudit.flows.cli import app
from visaudit.tasks.audit.setup_report import near_chance
from visaudit.tasks.data.images import IMAGENET_MEAN, IMAGENET_STD

runner = CliRunner()
ORDER = ["fine", "medium", "coarse"]  # the model's output order; sorted folder names differ
PERIODS = {"fine": 2, "medium": 4, "coarse": 8}
SIZE = 32
MODEL = '''
import torch
from torch import nn


def build(num_classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 5, padding=2), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes),
    )
'''


def stripes(count: int, period: int, rng: np.random.Generator) -> np.ndarray:
    """(count, SIZE, SIZE, 3) uint8: two random colours in bands of period/2 px, either orientation."""
    out = np.empty((count, SIZE, SIZE, 3), np.uint8)
    for i in range(count):
        band = (np.arange(SIZE) + rng.integers(0, period)) // (period // 2) % 2
        colours = rng.integers(0, 256, (2, 3))
        image = np.broadcast_to(colours[band][:, None, :], (SIZE, SIZE, 3))
        out[i] = image.transpose(1, 0, 2) if rng.random() < 0.5 else image
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The trained model (factory file, weights, class file) and a 90-image folder source."""
    root = tmp_path_factory.mktemp("setup")
    rng = np.random.default_rng(0)
    x = torch.from_numpy(np.concatenate([stripes(80, PERIODS[c], rng) for c in ORDER])).permute(0, 3, 1, 2)
    y = torch.arange(3).repeat_interleave(80)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    inputs = (x.float() / 255 - mean) / std
    (root / "model.py").write_text(MODEL)
    namespace: dict = {}
    exec(MODEL, namespace)
    model = namespace["build"](3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model trains faster on one thread than contending for two
    try:
        optimiser = torch.optim.Adam(model.parameters(), 2e-2)
        generator = torch.Generator().manual_seed(0)
        for _ in range(40):
            order = torch.randperm(len(x), generator=generator)
            for start in range(0, len(x), 60):
                batch = order[start:start + 60]
                loss = F.cross_entropy(model(inputs[batch]), y[batch])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
    finally:
        torch.set_num_threads(threads)
    torch.save(model.state_dict(), root / "model.pt")
    (root / "classes.txt").write_text("\n".join(ORDER) + "\n")
    data = root / "data"
    test_rng = np.random.default_rng(1)
    for name in ORDER:
        (data / name).mkdir(parents=True)
        for i, pixels in enumerate(stripes(30, PERIODS[name], test_rng)):
            Image.fromarray(pixels).save(data / name / f"{i:02d}.png")
    return root


def _args(root, out, *extra: str) -> list[str]:
    return ["run", str(root / "data"), "--out", str(out), "--model", f"{root / 'model.py'}:build",
            "--weights", str(root / "model.pt"), "--no-pdf", "--no-sanity-check", "-q", *extra]


def _one_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    return lines[0]


def test_default_preprocessing_on_small_images_stops_naming_the_size(trained, tmp_path) -> None:
    line = _one_line(runner.invoke(app, _args(trained, tmp_path / "out", "--classes", str(trained / "classes.txt"))))
    found = re.search(r"--resize 32 --crop 32 gives (\d+)% on 90 probe images against (\d+)% as given", line)
    assert found, line
    assert int(found[1]) >= 70 and int(found[2]) <= 50, line
    assert "--no-setup-checks" in line and "Traceback" not in line


def test_folder_names_in_another_order_stop_naming_the_order(trained, tmp_path) -> None:
    line = _one_line(runner.invoke(app, _args(trained, tmp_path / "out", "--resize", "32", "--crop", "32")))
    assert "in the order fine, medium, coarse" in line, line  # sorted folders: coarse, fine, medium
    assert "--classes FILE" in line and "--no-setup-checks" in line


def test_near_chance_wilson_matches_scipy() -> None:
    correct = np.array([True] * 30 + [False] * 60)
    result = near_chance(correct, ["a"] * 30 + ["b"] * 30 + ["c"] * 30, 0.95, "accuracy")
    low, high = binomtest(30, 90).proportion_ci(0.95, method="wilson")
    assert result.low == pytest.approx(low) and result.high == pytest.approx(high)
    assert result.chance == pytest.approx(1 / 3) and result.near
    assert not near_chance(np.array([True] * 80 + [False] * 10), ["a"] * 30 + ["b"] * 60, 0.95, "accuracy").near


@pytest.fixture(scope="module")
def prefect_server(prefect_api):
    with using_prefect_api(prefect_api):
        yield


def test_right_setup_audits_and_records_the_checks(trained, tmp_path, prefect_server) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, _args(trained, out, "--resize", "32", "--crop", "32",
                                      "--classes", str(trained / "classes.txt")))
    assert result.exit_code == 0, result.output
    record = json.loads(next((out / "runs").glob("*/run.json")).read_text())
    setup = record["setup"]
    assert record["parameters"]["setup_checks"] is True
    assert setup["probe_images"] == 90 and setup["preprocessing_fix"] is None and not setup["class_order"]["wrong"]
    assert setup["given"]["correct"] / 90 >= 0.7 and setup["alternatives"] >= 3
    assert record["near_chance"]["near"] is False and record["near_chance"]["chance"] == pytest.approx(1 / 3)
    html = next((out / "runs").glob("*/report.html")).read_text()
    assert "Setup checks" in html and "near chance" not in html


def test_no_setup_checks_audits_as_given_and_the_cover_says_near_chance(trained, tmp_path, prefect_server) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, _args(trained, out, "--classes", str(trained / "classes.txt"), "--no-setup-checks",
                                      "--pdf"))
    assert result.exit_code == 0, result.output
    run_dir = next((out / "runs").glob("r*"))
    record = json.loads((run_dir / "run.json").read_text())
    assert record["parameters"]["setup_checks"] is False and record["setup"] is None
    assert record["preprocess"]["crop"] == 224  # audited as given
    chance = record["near_chance"]
    assert chance["near"] and chance["low"] <= chance["chance"]
    text = re.sub(r"\s+", " ", " ".join(page.extract_text() or "" for page in PdfReader(run_dir / "report.pdf").pages))
    cover = text[: text.index("Model")]
    assert "The model is near chance on this data" in cover


def test_series_key_is_canonical_and_can_be_named(tmp_path, monkeypatch) -> None:
    from visaudit.tasks.audit.commit import series_key

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    assert series_key("m", "data") == series_key("m", str(tmp_path / "data")) == series_key("m", "./data/")
    assert series_key("m", "HTTPS://Example.org/a/../val.csv") == series_key("m", "https://example.org/val.csv")
    assert series_key("m", "data") != series_key("other", "data")
    assert series_key("m", "data", "nightly") == series_key("other", "elsewhere", "nightly") != series_key("m", "data")


def test_screen_scores_alternatives_on_a_subset_and_keeps_the_verdict(trained) -> None:
    """Every alternative is scored on the 48-image screen, and only the promising ones on the
    rest of the probe: the right setup costs the given one's 90 images, 48 per alternative and
    the other 42 per promising one, and the wrong one reaches the same verdict as scoring every
    alternative on the whole probe, with fewer forwards."""
    from dataclasses import replace

    from visaudit.tasks.audit.setup_checks import SetupThresholds, run_setup_checks
    from visaudit.tasks.data.images import Preprocess
    from visaudit.tasks.data.sources import build_index
    from visaudit.tasks.model.loading import ModelSpec, load_model

    loaded = load_model(ModelSpec(factory=f"{trained / 'model.py'}:build", weights=str(trained / "model.pt")),
                        "cpu", SIZE)
    index = build_index(str(trained / "data"))
    seen: list[int] = []
    hook = loaded.model.register_forward_hook(lambda module, inputs, output: seen.append(len(inputs[0])))
    try:
        def checked(pre: Preprocess, thresholds: SetupThresholds):
            seen.clear()
            report = run_setup_checks(loaded, index, ORDER, pre, False, 32, thresholds)
            return report, sum(seen)

        screened = SetupThresholds(probe_images=90)
        right, right_cost = checked(Preprocess(resize=SIZE, crop=SIZE), screened)
        whole = replace(screened, screen_images=90, screen_loss_ratio=1.0)  # the search before screening
        wrong, cost = checked(Preprocess(), screened)
        wrong_whole, cost_whole = checked(Preprocess(), whole)
    finally:
        hook.remove()
    for report, spent in ((right, right_cost), (wrong, cost)):
        promoted, rest = divmod(spent - 90 - 48 * report.alternatives, 90 - 48)  # promising ones: their rest only
        assert report.screen_images == 48 and rest == 0 and 0 <= promoted <= 3, spent
    assert right.preprocessing_fix is None
    assert wrong.preprocessing_fix == wrong_whole.preprocessing_fix == f"--resize {SIZE} --crop {SIZE}"
    assert wrong.best.images == 90 and wrong.best.assigned == wrong_whole.best.assigned
    assert wrong_whole.screen_images == 90 and cost < cost_whole
