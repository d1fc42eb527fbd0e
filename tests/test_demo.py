"""The planted-bias demo: deterministic data with the biases where the recipe says, a model that trains."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from visaudit.tasks.demo import network
from visaudit.tasks.demo import recipe as demo


@pytest.fixture(scope="module")
def recipe() -> demo.DemoRecipe:
    full = demo.load_recipe()
    return dataclasses.replace(full, image_size=48, train_per_class=8, test_per_class=4, epochs=1, batch_size=8)


@pytest.fixture(scope="module")
def dataset(recipe, tmp_path_factory):
    return demo.generate_dataset(recipe, tmp_path_factory.mktemp("demo") / "data")


def test_recipe_file_is_valid_and_plants_both_biases() -> None:
    recipe = demo.load_recipe()
    assert len(recipe.classes) >= 4
    assert recipe.mark_class != recipe.background_class
    assert recipe.mark_probability >= 0.8 and recipe.background_probability >= 0.7


def test_generation_is_deterministic(recipe, dataset, tmp_path) -> None:
    again = demo.generate_dataset(recipe, tmp_path / "again")
    first = pd.read_csv(dataset / "train.csv")
    assert first.equals(pd.read_csv(again / "train.csv"))
    for relative in first["path"].head(6):
        assert (dataset / relative).read_bytes() == (again / relative).read_bytes()


def test_manifest_boxes_and_marks(recipe, dataset) -> None:
    frame = pd.concat([pd.read_csv(dataset / f"{split}.csv") for split in demo.SPLITS])
    assert list(frame.columns) == list(demo.MANIFEST_COLUMNS)
    assert set(frame["label"]) == set(recipe.classes)
    size = recipe.image_size
    assert ((frame["x0"] >= 0) & (frame["y0"] >= 0) & (frame["x1"] <= size) & (frame["y1"] <= size)).all()
    assert ((frame["x1"] > frame["x0"]) & (frame["y1"] > frame["y0"])).all()
    marked = frame[frame["mark"] == "yes"]
    assert set(marked["label"]) == {recipe.mark_class}, "only the mark class carries the mark"
    x, y = recipe.mark_xy
    corner = x + recipe.mark_size
    assert ((frame["x0"] >= corner) | (frame["y0"] >= y + recipe.mark_size)).all(), "shapes never cover the mark"
    for relative in marked["path"].head(3):
        pixels = np.asarray(Image.open(dataset / relative))
        patch = pixels[y : y + recipe.mark_size, x : x + recipe.mark_size]
        assert patch.max() == 255 and patch.min() == 0, "white square with a black centre"


def test_background_bias_is_planted() -> None:
    recipe = demo.load_recipe()
    rng = np.random.default_rng(0)
    backgrounds = [demo.render_image(recipe, recipe.background_class, rng)[2] for _ in range(200)]
    share = backgrounds.count(recipe.background_colour) / len(backgrounds)
    assert abs(share - recipe.background_probability) < 0.1
    others = [demo.render_image(recipe, recipe.mark_class, rng)[2] for _ in range(200)]
    assert others.count(recipe.background_colour) / 200 < 0.4


def test_model_shapes_and_cam_layer() -> None:
    model = network.build_model(4).eval()
    features = {}
    model.features.stage3.register_forward_hook(lambda _m, _i, out: features.setdefault("stage3", out))
    with torch.no_grad():
        logits = model(torch.zeros(2, 3, 96, 96))
    assert logits.shape == (2, 4)
    assert features["stage3"].shape == (2, 128, 12, 12)


def test_training_writes_loadable_weights_and_is_cached(recipe, dataset, tmp_path) -> None:
    weights = tmp_path / "model.pt"
    lines: list[str] = []
    metrics = network.train_model(dataset, recipe, weights, log=lines.append)
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["epochs"] == 1
    model = network.build_model(len(recipe.classes))
    model.load_state_dict(torch.load(weights, weights_only=True))
    again = network.train_model(dataset, recipe, weights, log=lines.append)
    assert again == metrics and any("reusing" in line for line in lines)


def test_bad_recipe_is_rejected(tmp_path) -> None:
    text = demo.DEFAULT_RECIPE.read_text().replace('mark_class = "triangle"', 'mark_class = "hexagon"')
    (tmp_path / "bad.toml").write_text(text)
    with pytest.raises(ValueError, match="mark_class"):
        demo.load_recipe(tmp_path / "bad.toml")


def test_fgsm_adversarial_stays_within_epsilon_and_raises_the_loss() -> None:
    torch.manual_seed(0)
    model = network.build_model(4).eval()
    pixels = torch.rand(6, 3, 48, 48)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    loss_fn = torch.nn.CrossEntropyLoss()
    epsilon = 4 / 255
    moved = network.fgsm_adversarial(model, pixels, labels, epsilon, loss_fn)
    assert (moved - pixels).abs().max() <= epsilon + 1e-6 and moved.min() >= 0 and moved.max() <= 1
    with torch.no_grad():
        assert loss_fn(model(network.normalise(moved)), labels) > loss_fn(model(network.normalise(pixels)), labels)
    assert all(p.grad is None for p in model.parameters()), "the attack must not touch the parameters' gradients"


def test_adversarial_epsilon_is_checked(tmp_path) -> None:
    text = demo.DEFAULT_RECIPE.read_text().replace("adversarial_epsilon = 4", "adversarial_epsilon = 64")
    (tmp_path / "bad.toml").write_text(text)
    with pytest.raises(ValueError, match="adversarial_epsilon"):
        demo.load_recipe(tmp_path / "bad.toml")
