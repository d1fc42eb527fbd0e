"""The demo's data: a shapes dataset with planted biases, generated from a recipe (its model and
trainer are in ``network``).

The recipe (``data/demo.toml``) fixes everything, so the same recipe always gives the
same image bytes. Biases are planted for the audit to find: the ``mark_class`` images
mostly carry a small high-contrast mark at a fixed corner position, outside the shape's
box; the ``background_class`` images mostly sit on one background colour. The test split
shares both, so held-out accuracy alone does not reveal them. A share of the test images
come from an "old" camera (blurred, low contrast, noisy: the ``camera`` attribute) that
training never saw: a slice the model is weaker on.
``centred_class`` (optional) draws that class's shapes at the image centre: a location
prior that is not a shortcut, which the fixed-location detector must not flag.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import tomllib
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

DEFAULT_RECIPE: Path = Path(str(files("visaudit.data"))) / "demo.toml"  # shipped as package data

MANIFEST_COLUMNS = ("path", "label", "x0", "y0", "x1", "y1", "background", "mark", "camera")
SPLITS = ("train", "test")
SHAPES = ("circle", "square", "triangle", "star")
# Bump when the drawing code changes, so cached datasets and weights are rebuilt.
GENERATOR_VERSION = 3
_COMPLETE = ".complete"
_CORNER_MARGIN = 3  # free pixels between the mark region and any shape
_MIN_COLOUR_DISTANCE = 110.0  # shape colour vs background colour, Euclidean in RGB


@dataclass(frozen=True)
class DemoRecipe:
    """Everything that determines the demo data and model; mirrors ``data/demo.toml``."""

    seed: int
    image_size: int
    classes: tuple[str, ...]
    train_per_class: int
    test_per_class: int
    backgrounds: dict[str, tuple[int, int, int]]
    mark_class: str
    mark_probability: float
    mark_size: int
    mark_xy: tuple[int, int]
    background_class: str
    background_colour: str
    background_probability: float
    degraded_probability: float
    centred_class: str
    epochs: int
    batch_size: int
    learning_rate: float
    adversarial_epsilon: float

    def __post_init__(self) -> None:
        unknown = [name for name in self.classes if name not in SHAPES]
        if unknown or len(set(self.classes)) != len(self.classes) or len(self.classes) < 2:
            raise ValueError(f"classes must be two or more distinct names from {SHAPES}, got {list(self.classes)}")
        for field_name in ("mark_class", "background_class"):
            if getattr(self, field_name) not in self.classes:
                raise ValueError(f"{field_name} {getattr(self, field_name)!r} is not one of the classes")
        if self.background_colour not in self.backgrounds or len(self.backgrounds) < 2:
            raise ValueError(f"background_colour {self.background_colour!r} must be one of two or more backgrounds")
        for name, rgb in self.backgrounds.items():
            if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
                raise ValueError(f"background {name!r} must be [R, G, B] in 0..255, got {list(rgb)}")
        if self.centred_class and self.centred_class not in self.classes:
            raise ValueError(f"centred_class {self.centred_class!r} is not one of the classes (or \"\" for none)")
        for field_name in ("mark_probability", "background_probability", "degraded_probability"):
            if not 0.0 <= getattr(self, field_name) <= 1.0:
                raise ValueError(f"{field_name} must lie in [0, 1]")
        if self.image_size < 32:
            raise ValueError(f"image_size must be at least 32, got {self.image_size}")
        x, y = self.mark_xy
        if self.mark_size < 4 or x < 0 or y < 0 or max(x, y) + self.mark_size > self.image_size // 3:
            raise ValueError("the mark must be at least 4 pixels and lie inside the image's top-left third")
        if min(self.train_per_class, self.test_per_class, self.epochs, self.batch_size) < 1 or self.learning_rate <= 0:
            raise ValueError("per-class counts, epochs, batch_size and learning_rate must be positive")
        if not 0 <= self.adversarial_epsilon <= 32:
            raise ValueError(f"adversarial_epsilon is in pixel levels (0..255 scale), 0..32; got {self.adversarial_epsilon}")


def load_recipe(path: Path | None = None) -> DemoRecipe:
    """Read a recipe TOML (default ``data/demo.toml``); unknown or missing keys are errors."""
    path = DEFAULT_RECIPE if path is None else Path(path)
    with path.open("rb") as handle:
        raw: dict[str, Any] = tomllib.load(handle)
    names = {f.name for f in dataclasses.fields(DemoRecipe)}
    if unknown := sorted(set(raw) - names):
        raise ValueError(f"{path}: unknown recipe keys {unknown}")
    if missing := sorted(names - set(raw)):
        raise ValueError(f"{path}: missing recipe keys {missing}")
    raw["classes"] = tuple(raw["classes"])
    raw["mark_xy"] = tuple(raw["mark_xy"])
    raw["backgrounds"] = {name: tuple(rgb) for name, rgb in raw["backgrounds"].items()}
    try:
        return DemoRecipe(**raw)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc


def recipe_fingerprint(recipe: DemoRecipe) -> str:
    """Short sha256 of the recipe's contents (and the generator version): the cache key."""
    payload = json.dumps({"version": GENERATOR_VERSION, **dataclasses.asdict(recipe)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- generation


def generate_dataset(recipe: DemoRecipe, out_dir: Path) -> Path:
    """Write images to out_dir/images/<split>/<class>/<id>.png and manifests
    out_dir/train.csv, out_dir/test.csv with columns path,label,x0,y0,x1,y1,background,mark.

    ``path`` is relative to out_dir with forward slashes; the box is the shape's drawn
    pixels, x0/y0 inclusive and x1/y1 exclusive; ``mark`` is "yes"/"no". If
    out_dir/.complete holds the recipe fingerprint the data is reused. The data is written
    to a temporary sibling folder and renamed, so an interrupted run never leaves a half
    dataset that looks complete. Returns out_dir.
    """
    out_dir = Path(out_dir)
    fingerprint = recipe_fingerprint(recipe)
    if _is_complete(out_dir, fingerprint):
        return out_dir
    _check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        os.chmod(staging, 0o755)
        for split_index, split in enumerate(SPLITS):
            _write_split(recipe, staging, split_index, split)
        (staging / _COMPLETE).write_text(fingerprint + "\n")
        if _is_complete(out_dir, fingerprint):  # a concurrent run finished first
            shutil.rmtree(staging)
            return out_dir
        if out_dir.exists():
            _check_replaceable(out_dir)
            shutil.rmtree(out_dir)
        os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _is_complete(out_dir: Path, fingerprint: str) -> bool:
    marker = out_dir / _COMPLETE
    return marker.is_file() and marker.read_text().strip() == fingerprint


def _check_replaceable(out_dir: Path) -> None:
    """Refuse to delete a folder that holds anything but a previous demo dataset."""
    if out_dir.exists():
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in {"images", "train.csv", "test.csv", _COMPLETE})
        if foreign or not out_dir.is_dir():
            raise FileExistsError(f"{out_dir}: exists and is not a demo dataset ({foreign[:3]}); choose an empty folder")


def _write_split(recipe: DemoRecipe, root: Path, split_index: int, split: str) -> None:
    count = recipe.train_per_class if split == "train" else recipe.test_per_class
    rows: list[list[object]] = []
    for class_index, label in enumerate(recipe.classes):
        folder = root / "images" / split / label
        folder.mkdir(parents=True)
        for i in range(count):
            rng = np.random.default_rng([recipe.seed, split_index, class_index, i])
            pixels, box, background, marked, degraded = render_image(recipe, label, rng, split)
            relative = f"images/{split}/{label}/{label}_{i:04d}.png"
            Image.fromarray(pixels).save(root / relative, format="PNG")
            rows.append([relative, label, *box, background, "yes" if marked else "no", "old" if degraded else "new"])
    with (root / f"{split}.csv").open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(MANIFEST_COLUMNS)
        writer.writerows(rows)


def render_image(
    recipe: DemoRecipe, label: str, rng: np.random.Generator, split: str = "test"
) -> tuple[np.ndarray, tuple[int, int, int, int], str, bool, bool]:
    """Draw one image of class ``label``: (H, W, 3) uint8 pixels, the shape's box
    (x0, y0, x1, y1, end-exclusive), the background name, whether it carries the mark and
    whether it is degraded (the "old" camera, only in the test split)."""
    size = recipe.image_size
    names = sorted(recipe.backgrounds)
    if label == recipe.background_class:
        others = [n for n in names if n != recipe.background_colour]
        biased = rng.random() < recipe.background_probability
        background = recipe.background_colour if biased else others[int(rng.integers(len(others)))]
    else:
        background = names[int(rng.integers(len(names)))]
    marked = label == recipe.mark_class and rng.random() < recipe.mark_probability

    # Shape: centre and circumradius, its circumscribed box kept off the mark corner.
    radius = float(rng.uniform(0.14, 0.30)) * size
    corner_x = recipe.mark_xy[0] + recipe.mark_size + _CORNER_MARGIN
    corner_y = recipe.mark_xy[1] + recipe.mark_size + _CORNER_MARGIN
    while True:
        if label == recipe.centred_class:
            cx, cy = size / 2 + rng.uniform(-0.03, 0.03, size=2) * size
        else:
            cx, cy = rng.uniform(radius + 1, size - radius - 1, size=2)
        if cx - radius >= corner_x or cy - radius >= corner_y:
            break
    mask_image = Image.new("L", (size, size), 0)
    _draw_shape(ImageDraw.Draw(mask_image), label, cx, cy, radius, float(rng.uniform(0, 2 * math.pi)))
    mask = np.asarray(mask_image) > 0
    box = mask_image.getbbox()
    assert box is not None

    # Background: jittered base colour plus a linear gradient; shape in a contrasting colour; noise.
    base = np.asarray(recipe.backgrounds[background], dtype=np.float32) + rng.uniform(-12, 12, size=3)
    angle, strength = rng.uniform(0, 2 * math.pi), rng.uniform(-35, 35)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    ramp = strength * (math.cos(angle) * xs + math.sin(angle) * ys)
    pixels = base[None, None, :] + ramp[:, :, None]
    while True:
        colour = rng.integers(0, 256, size=3).astype(np.float32)
        if np.linalg.norm(colour - base) >= _MIN_COLOUR_DISTANCE:
            break
    pixels[mask] = colour
    degraded = bool(rng.random() < recipe.degraded_probability) and split == "test"
    if degraded:  # the "old" camera: washed-out contrast, blur and sensor noise
        pixels = pixels.mean(axis=(0, 1), keepdims=True) + 0.3 * (pixels - pixels.mean(axis=(0, 1), keepdims=True))
        blurred = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(2))
        pixels = np.asarray(blurred, dtype=np.float32) + rng.normal(0.0, 14.0, size=pixels.shape)
    else:
        pixels += rng.normal(0.0, 6.0, size=pixels.shape)
    out = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    if marked:
        paint_mark(out, recipe)
    return out, (box[0], box[1], box[2], box[3]), background, marked, degraded


def paint_mark(pixels: np.ndarray, recipe: DemoRecipe) -> None:
    """Paint the planted mark in place: a white square with a black centre half its size."""
    x, y = recipe.mark_xy
    s = recipe.mark_size
    pixels[y : y + s, x : x + s] = 255
    pixels[y + s // 4 : y + s - s // 4, x + s // 4 : x + s - s // 4] = 0


def _draw_shape(draw: ImageDraw.ImageDraw, label: str, cx: float, cy: float, radius: float, angle: float) -> None:
    """Fill the shape (inscribed in the circle of ``radius`` around the centre) with 255."""
    if label == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=255)
        return
    if label == "star":
        radii = [radius if k % 2 == 0 else 0.45 * radius for k in range(10)]
    else:
        radii = [radius] * {"square": 4, "triangle": 3}[label]
    step = 2 * math.pi / len(radii)
    points = [(cx + r * math.cos(angle + k * step), cy + r * math.sin(angle + k * step)) for k, r in enumerate(radii)]
    draw.polygon(points, fill=255)
