"""The report's picture files, under ``runs/<run_id>/images/``: thumbnails and map overlays of
the shown images (the :class:`Painter`), and the matplotlib charts (confusion matrix,
reliability diagram, trends).

Charts use matplotlib's object API (an Agg canvas per figure, no global pyplot state) and are
saved as small palette PNGs; photos are JPEGs (see ``explain.overlay.save_photo``).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from PIL import Image

from visaudit.tasks.data.files import write_atomically
from visaudit.tasks.data.images import Decoded, Preprocess, boxes_to_input, decode_many
from visaudit.tasks.explain.catalogue import (
    ATTENTION_LAYER,
    ATTENTION_METHODS,
    GUIDED_METHODS,
    INPUT_LAYER,
    PATCH_METHODS,
    method_names,
)
from visaudit.tasks.explain.overlay import overlay_pixels, saliency_pixels, save_photo
from visaudit.tasks.findings.calibration import Reliability

IMAGES_DIR = "images"
PREFERRED_METHOD = "gradcam"
OCCLUSION_LAYER = "occlusion grid"
BOX_COLUMNS = ["box_x0", "box_y0", "box_x1", "box_y1"]
COLOUR_SWATCH_PX = 32  # side of the colour impression's swatch figure


def digest(text: str) -> str:
    """A file-name-safe digest (image ids and class names are user data)."""
    return hashlib.sha1(text.encode()).hexdigest()[:16]


class Painter:
    """Draws the thumbnails and overlays of the shown images, once each, as small files.

    It knows only the explanation rows of the shown images, so nothing is drawn for the
    rest of the table; files of earlier renders that are no longer shown are pruned.
    """

    def __init__(self, run_dir: Path, pre: Preprocess, explanations: pd.DataFrame, layers: list[str]) -> None:
        self.run_dir = run_dir
        self.pre = pre
        stored_methods = set(explanations["method"])
        self.method = PREFERRED_METHOD if PREFERRED_METHOD in stored_methods or not stored_methods else sorted(stored_methods)[0]
        known = method_names()
        self.methods = [m for m in known if m in stored_methods] + sorted(stored_methods - set(known))
        rows = explanations[explanations["method"] == self.method]
        stored = set(rows["layer"])
        self.layers = [layer for layer in layers if layer in stored]
        self.default_layer = self.layers[-1] if self.layers else (rows["layer"].mode().iloc[0] if len(rows) else "")
        self.maps: dict[tuple[str, str, str, str], Any] = {
            (r.image_id, r.method, r.layer, r.target): r for r in explanations.itertuples(index=False)
        }
        self.targets: dict[str, list[str]] = {}  # every class explained for an image (--targets, --target-class)
        for image_id, target in zip(explanations["image_id"], explanations["target"]):
            if target not in self.targets.setdefault(image_id, []):
                self.targets[image_id].append(target)
        self.decoded: dict[str, Decoded | None] = {}
        self.boxes: dict[str, np.ndarray] = {}
        self.written: set[str] = set()
        (run_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)

    def decode(self, rows: pd.DataFrame) -> None:
        """Re-read the shown images in parallel; one that cannot be read is remembered as None."""
        readable = rows[rows["error"].isna()].drop_duplicates("image_id")
        results = decode_many(readable["uri"].tolist(), self.pre)
        boxes = readable[BOX_COLUMNS].to_numpy(dtype=np.float64)
        for image_id, result, box in zip(readable["image_id"], results, boxes):
            decoded = result if isinstance(result, Decoded) else None
            self.decoded[image_id] = decoded
            if decoded is not None and not np.isnan(box).any():
                self.boxes[image_id] = boxes_to_input(box[None, :], [decoded])[0]

    def find_map(self, image_id: str, target: str, layer: str | None = None, method: str | None = None) -> Any:
        """The stored map row of ``target`` for this image at ``layer`` (else the default layer),
        by ``method`` (default Grad-CAM; guided and patch methods are found at the input), or None."""
        method = method or self.method
        if method in GUIDED_METHODS or method in PATCH_METHODS:
            return self.maps.get((image_id, method, INPUT_LAYER, target))
        if method in ATTENTION_METHODS:
            return self.maps.get((image_id, method, ATTENTION_LAYER, target))
        if method == "occlusion":
            return self.maps.get((image_id, method, OCCLUSION_LAYER, target))
        return self.maps.get((image_id, method, layer or self.default_layer, target)) or self.maps.get(
            (image_id, method, self.default_layer, target)
        )

    def image(self, image_id: str) -> str | None:
        """The model-input thumbnail, or None when the image cannot be re-read."""
        decoded = self.decoded.get(image_id)
        if decoded is None:
            return None
        return self.save(f"{digest(image_id)}.jpg", lambda tmp: save_photo(decoded.pixels, tmp))

    def overlay(self, image_id: str, target: str, layer: str | None = None, method: str | None = None) -> str | None:
        """The map of ``target`` over the image (the bare map when the image cannot be re-read);
        guided maps, fine-grained, are drawn on their own in a dark-to-bright colour map."""
        method = method or self.method
        row = self.find_map(image_id, target, layer, method)
        if row is None:
            return None
        decoded = self.decoded.get(image_id)
        pixels = decoded.pixels if decoded is not None else None
        heat = np.asarray(row.heatmap, dtype=np.float32).reshape(row.height, row.width)
        size = pixels.shape[0] if pixels is not None else self.pre.crop
        box = self.boxes.get(image_id)
        name = f"{digest(image_id)}-{digest(f'{method}/{row.layer}/{target}')[:8]}.jpg"
        if method in GUIDED_METHODS:
            return self.save(name, lambda tmp: save_photo(saliency_pixels(heat, size), tmp))
        wsl = np.array([getattr(row, f"wsl_box_{c}", np.nan) for c in ("x0", "y0", "x1", "y1")], dtype=np.float64)
        return self.save(name, lambda tmp: save_photo(overlay_pixels(heat, pixels, size, box, wsl), tmp))

    def picture_overlay(self, image_path: str, heat: np.ndarray, tag: str = "") -> str | None:
        """A map over a picture of the run folder (a class impression, an adversarial image), or None
        when the picture is gone; ``tag`` names one of several maps drawn over the same picture."""
        path = self.run_dir / image_path
        if not path.is_file():
            return None
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        return self.save(f"impression-{digest(image_path + tag)}.jpg",
                         lambda tmp: save_photo(overlay_pixels(heat, pixels, pixels.shape[0], None), tmp))

    def swatch(self, rgb: np.ndarray) -> str:
        """A square of one plain colour (``rgb``: three uint8 values)."""
        pixels = np.broadcast_to(rgb, (COLOUR_SWATCH_PX, COLOUR_SWATCH_PX, 3)).copy()
        return self.save(f"colour-{rgb[0]:03d}-{rgb[1]:03d}-{rgb[2]:03d}.jpg", lambda tmp: save_photo(pixels, tmp))

    def save(self, name: str, write: Callable[[Path], None]) -> str:
        """Write figure ``name`` once per render; returns its path relative to the run folder."""
        if name not in self.written:
            write_atomically(self.run_dir / IMAGES_DIR / name, write)
            self.written.add(name)
        return f"{IMAGES_DIR}/{name}"

    def prune(self) -> None:
        """Delete figures of earlier renders that this render does not show."""
        for path in (self.run_dir / IMAGES_DIR).glob("*.*"):
            if path.suffix in (".png", ".jpg") and path.name not in self.written:
                path.unlink(missing_ok=True)


# --- charts -------------------------------------------------------------------------------


def save_chart(figure: Figure, path: Path, colours: int = 64) -> None:
    """Lay out ``figure`` and save it as a PNG with a ``colours``-colour palette (small files)."""
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    with Image.open(buffer) as image:
        image.convert("RGB").quantize(colors=colours).save(path, format="PNG", optimize=True)


def draw_confusion(counts: pd.DataFrame, path: Path) -> None:
    """The confusion matrix: counts in cells, colour normalised per true class."""
    values = counts.to_numpy()
    totals = values.sum(axis=1, keepdims=True)
    share = np.divide(values, totals, out=np.zeros(values.shape, dtype=np.float64), where=totals > 0)
    k = len(counts)
    font = 8 if k <= 10 else 6.5 if k <= 18 else 6
    side = min(7.2, 2.4 + 0.24 * k)
    figure = Figure(figsize=(side + 0.4, side), dpi=100)
    axes = figure.add_subplot()
    axes.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    labels = [axis_label(name) for name in counts.index]
    axes.set_xticks(range(k), labels, rotation=60, ha="right", rotation_mode="anchor", fontsize=font)
    axes.set_yticks(range(k), labels, fontsize=font)
    axes.set_xlabel("predicted class", fontsize=font + 1)
    axes.set_ylabel("true class", fontsize=font + 1)
    for (row, col), count in np.ndenumerate(values):
        if count:
            shade = "white" if share[row, col] > 0.55 else "#1f2a36"
            axes.text(col, row, str(count), ha="center", va="center", fontsize=font, color=shade)
    axes.tick_params(length=0)
    for spine in axes.spines.values():
        spine.set_visible(False)
    save_chart(figure, path, colours=128)  # 128 colours keep even a 25-class matrix small


def axis_label(name: str, limit: int = 18) -> str:
    """A class name fit for an axis: shortened, with '$' escaped (no mathtext from user strings)."""
    short = name if len(name) <= limit else name[: limit - 1] + "…"
    return short.replace("$", r"\$")


def draw_reliability(result: Reliability, path: Path) -> None:
    """Bars of accuracy per confidence bin against the diagonal, with the gap to the bins' confidence."""
    figure = Figure(figsize=(4.2, 3.4), dpi=100)
    axes = figure.add_subplot()
    width = result.edges[1] - result.edges[0]
    filled = result.counts > 0
    axes.bar(result.edges[:-1][filled], result.accuracy[filled], width=width, align="edge",
             color="#4a78b5", edgecolor="white", label="accuracy")
    axes.bar(result.edges[:-1][filled], (result.confidence - result.accuracy)[filled], width=width, align="edge",
             bottom=result.accuracy[filled], color="#e69500", alpha=0.45, edgecolor="white", label="gap to confidence")
    axes.plot([0, 1], [0, 1], color="#1f2a36", linewidth=0.8, linestyle="--", label="calibrated")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.set_xlabel("top-1 confidence", fontsize=8)
    axes.set_ylabel("accuracy", fontsize=8)
    axes.tick_params(labelsize=7)
    axes.legend(fontsize=7, loc="upper left", frameon=False)
    save_chart(figure, path)


def draw_trends(table: pd.DataFrame, path: Path) -> None:
    """Accuracy and ECE per run (left), findings per severity (right); ``table``: one row per run."""
    figure = Figure(figsize=(7.2, 2.6), dpi=100)
    left, right = figure.subplots(1, 2)
    x = np.arange(len(table))
    labels = [run_label(rid) for rid in table.index]
    for name, colour in (("accuracy", "#4a78b5"), ("top5_accuracy", "#9bb7da"), ("ece", "#e69500")):
        if name in table:
            left.plot(x, table[name].to_numpy(float), marker="o", markersize=3, color=colour, label=name.replace("_", " "))
    left.set_ylim(0, 1)
    bottom = np.zeros(len(table))
    for level, colour in (("high", "#c62828"), ("medium", "#e69500"), ("low", "#7b8794")):
        counts = table.get(f"findings_{level}", pd.Series(0, index=table.index)).fillna(0).to_numpy(float)
        right.bar(x, counts, bottom=bottom, color=colour, label=level)
        bottom += counts
    for axes, title in ((left, "accuracy and calibration error"), (right, "findings per run")):
        axes.set_xticks(x, labels, rotation=45, ha="right", fontsize=6)
        axes.tick_params(labelsize=7)
        axes.set_title(title, fontsize=8)
        axes.legend(fontsize=6, frameon=False)
    save_chart(figure, path)


def run_label(run_id: str) -> str:
    """'r20261123-070555-3e59a1' -> '11-23 07:05:55' (other run ids as they are, shortened)."""
    if len(run_id) >= 16 and run_id[0] == "r" and run_id[1:9].isdigit() and run_id[10:16].isdigit():
        return f"{run_id[5:7]}-{run_id[7:9]} {run_id[10:12]}:{run_id[12:14]}:{run_id[14:16]}"
    return run_id[:16]
