"""Detectors on planted biases built apart from the demo recipe (issue 23's validation).

Generator (not the demo's shapes): sklearn's handwritten digits, faint, at random places on
scikit-image textures. Case ``group`` (Waterbirds, Sagawa et al. 2020): two classes on two
backgrounds, 95% correlated in training, a balanced test split with a ``place`` column;
its control is the same generator with the backgrounds independent of the class. The bias
is proven real on the trained model before the detectors are judged: each test digit is
drawn on both backgrounds, so the per-group accuracies are an intervention (same digit,
background swapped). One threshold set (the defaults) for every case.

    PYTHONPATH=benchmarks .venv/bin/python benchmarks/general.py [--cache DIR]

prints the README's table. Models are cached under ``--cache`` (default
``~/.cache/visaudit/general``); each takes about a minute to train on 2 cores.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import planted
from PIL import Image

from visaudit.tasks.demo.network import train_model
from visaudit.tasks.demo.recipe import load_recipe

SIZE = 32
CLASSES = ("three", "eight")  # digits 3 and 8: alike enough that the background is the easier cue
DIGITS = {"three": 3, "eight": 8}
PLACES = ("grass", "brick")
BIAS_KINDS = (*planted.BIAS_KINDS, "group_gap")


def _textures() -> dict[str, np.ndarray]:
    """The two backgrounds: scikit-image's grass (tinted green) and brick (tinted red), 128 px."""
    from skimage import data, transform

    tints = {"grass": np.array([0.45, 0.75, 0.35]), "brick": np.array([0.8, 0.45, 0.35])}
    out = {}
    for name, tint in tints.items():
        grey = transform.resize(getattr(data, name)().astype(np.float64) / 255.0, (128, 128), anti_aliasing=True)
        out[name] = grey[..., None] * tint[None, None, :]
    return out


def _draw(digit: np.ndarray, texture: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A faint white digit (8x8 -> 10-13 px) at a random place on a random crop of the texture."""
    top, left = rng.integers(0, texture.shape[0] - SIZE, 2)
    tile = texture[top : top + SIZE, left : left + SIZE].copy()
    side = int(rng.integers(10, 14))
    glyph = np.asarray(Image.fromarray((digit / 16.0 * 255).astype(np.uint8)).resize((side, side), Image.BILINEAR))
    y, x = rng.integers(0, SIZE - side, 2)
    alpha = 0.3 * glyph[..., None] / 255.0
    tile[y : y + side, x : x + side] = tile[y : y + side, x : x + side] * (1 - alpha) + alpha
    return (np.clip(tile, 0, 1) * 255).astype(np.uint8)


def generate_group(folder: Path, correlation: float, train_per_class: int = 400, test_per_group: int = 60,
                   seed: int = 0) -> Path:
    """Write train.csv / test.csv under ``folder``: class c's training images sit on its own
    place with probability ``correlation`` (0.5 = independent, the control); the test split
    draws every test digit on both places (a balanced ``place`` column)."""
    from sklearn.datasets import load_digits

    if (folder / "test.csv").exists():
        return folder
    rng = np.random.default_rng(seed)
    digits = load_digits()
    textures = _textures()
    rows = {"train": [], "test": []}
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(CLASSES):
        pool = digits.images[digits.target == DIGITS[name]]
        order = rng.permutation(len(pool))
        train_pool, test_pool = pool[order[: int(0.7 * len(pool))]], pool[order[int(0.7 * len(pool)):]]
        for n in range(train_per_class):
            own = rng.random() < correlation
            place = PLACES[k] if own else PLACES[1 - k]
            path = f"images/train_{name}_{n:04d}.png"
            Image.fromarray(_draw(train_pool[rng.integers(len(train_pool))], textures[place], rng)).save(folder / path)
            rows["train"].append({"path": path, "label": name, "place": place})
        for n in range(test_per_group):
            digit = test_pool[n % len(test_pool)]
            for place in PLACES:
                path = f"images/test_{name}_{place}_{n:04d}.png"
                Image.fromarray(_draw(digit, textures[place], rng)).save(folder / path)
                rows["test"].append({"path": path, "label": name, "place": place})
    for split, frame in rows.items():
        pd.DataFrame(frame).to_csv(folder / f"{split}.csv", index=False)
    return folder


@dataclass(frozen=True)
class TrainSettings:
    """What the demo trainer (``train_model``) and ``planted.audit_case`` read of a recipe:
    the demo's learning rate, batch size and seed, these cases' classes and size, plain training."""

    classes: tuple[str, ...] = CLASSES
    image_size: int = SIZE
    epochs: int = 12
    adversarial_epsilon: float = 0.0
    learning_rate: float = load_recipe().learning_rate
    batch_size: int = load_recipe().batch_size
    seed: int = load_recipe().seed


def group_accuracy(predictions: pd.DataFrame) -> pd.Series:
    """Accuracy per (class, place) from an audit's predictions."""
    attrs = predictions["attributes"].map(dict)
    frame = pd.DataFrame({"label": predictions["labels"].str[0], "place": attrs.map(lambda a: a.get("place")),
                          "correct": predictions["correct"].astype(bool)})
    return frame.groupby(["label", "place"])["correct"].mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "visaudit" / "general")
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="visaudit-general-"))
    started = time.perf_counter()
    settings = TrainSettings()
    table = []
    for case, correlation in (("group", 0.95), ("group control", 0.5)):
        folder = generate_group(args.cache / f"group-{correlation}", correlation)
        weights = folder / "model.pt"
        if not weights.exists():
            train_model(folder, settings, weights, log=lambda line: None)
        predictions, findings = planted.audit_case(folder / "test.csv", weights, settings, out / case.replace(" ", "-"))
        accuracy = group_accuracy(predictions)
        table.append((case, "accuracy per (class, place), the intervention",
                      ", ".join(f"{c}@{p} {v:.2f}" for (c, p), v in accuracy.items()), ""))
        flags = findings[findings["kind"].isin(BIAS_KINDS) & findings["severity"].isin(("medium", "high"))]
        shown = "; ".join(f"{k} {c} {s} {v:.3f} ({sev})" for k, c, s, v, sev in
                          zip(flags["kind"], flags["class_name"], flags["slice"], flags["value"], flags["severity"]))
        table.append((case, "bias flags (medium/high)", str(len(flags)), shown or "-"))
        labels = findings[findings["kind"] == "likely_label_error"]
        table.append((case, "likely_label_error rows", str(len(labels)),
                      "; ".join(f"{c} {s} ({sev})" for c, s, sev in zip(labels["class_name"], labels["slice"],
                                                                       labels["severity"])) or "-"))
        blind = folder / "test_no_place.csv"  # the same images with the place column removed: no metadata
        pd.read_csv(folder / "test.csv").drop(columns="place").to_csv(blind, index=False)
        _, findings = planted.audit_case(blind, weights, settings, out / f"{case.replace(' ', '-')}-no-place")
        slices = findings[findings["kind"] == "error_slice"]
        table.append((f"{case}, no place column", "error_slice rows (medium/high)",
                      str(int(slices["severity"].isin(("medium", "high")).sum())),
                      "; ".join(f"{c} {s} {v:.3f} ({sev})" for c, s, v, sev in zip(
                          slices["class_name"], slices["slice"], slices["value"], slices["severity"])) or "-"))
    planted.print_table(table, time.perf_counter() - started, out)


if __name__ == "__main__":
    main()
