"""Explanation maps as pictures: a heatmap blended over its image, a fine saliency map on its
own, and the small PNG/JPEG files the report and the feature views are made of.

Every map is upsampled bilinearly to the model input's size and scaled by its own maximum
(fine-grained saliency: by its 99th percentile) before the colour map, so a map's colours
say where it is strongest, not how strong it is in absolute terms.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw

COLORMAP = "jet"
SALIENCY_COLORMAP = "inferno"
OVERLAY_ALPHA = 0.5
BOX_COLOUR = (0, 210, 0)
WSL_BOX_COLOUR = (255, 0, 255)
MAX_FIGURE_PX = 224  # larger model inputs are shrunk: the report shows thumbnails


def overlay_pixels(heat: np.ndarray, pixels: np.ndarray | None, size: int, box: np.ndarray | None,
                   wsl_box: np.ndarray | None = None) -> np.ndarray:
    """Map upsampled (bilinear) to the input size, over its max, colour-mapped, blended 0.5; the
    true box in green, the map's weakly supervised localisation box (input pixels) in magenta."""
    upsampled = np.asarray(Image.fromarray(heat).resize((size, size), Image.Resampling.BILINEAR))
    peak = float(upsampled.max())
    scaled = np.clip(upsampled / peak, 0.0, 1.0) if peak > 0 else np.zeros_like(upsampled)
    colour = colormaps[COLORMAP](scaled)[..., :3] * 255.0
    blended = colour if pixels is None else (1 - OVERLAY_ALPHA) * pixels + OVERLAY_ALPHA * colour
    image = Image.fromarray(blended.round().astype(np.uint8))
    for drawn, colour in ((box, BOX_COLOUR), (wsl_box, WSL_BOX_COLOUR)):
        if drawn is not None and not np.isnan(drawn).any():
            x0, x1 = sorted((float(drawn[0]), float(drawn[2])))
            y0, y1 = sorted((float(drawn[1]), float(drawn[3])))
            ImageDraw.Draw(image).rectangle([x0, y0, x1, y1], outline=colour, width=max(1, size // 112))
    return np.asarray(image)


def saliency_pixels(heat: np.ndarray, size: int) -> np.ndarray:
    """A fine-grained saliency map on its own: upsampled, scaled to its 99th percentile, colour-mapped."""
    upsampled = np.asarray(Image.fromarray(heat).resize((size, size), Image.Resampling.BILINEAR))
    top = float(np.percentile(upsampled, 99))
    scaled = np.clip(upsampled / top, 0.0, 1.0) if top > 0 else np.zeros_like(upsampled)
    return (colormaps[SALIENCY_COLORMAP](scaled)[..., :3] * 255.0).round().astype(np.uint8)


def save_png(pixels: np.ndarray, path: Path) -> None:
    """Save RGB pixels as a small PNG (sharp-edged figures: filter grids), shrunk to MAX_FIGURE_PX."""
    image = Image.fromarray(pixels)
    if max(image.size) > MAX_FIGURE_PX:
        image = image.resize((MAX_FIGURE_PX, MAX_FIGURE_PX), Image.Resampling.BILINEAR)
    image.save(path, format="PNG", compress_level=1)  # fast; level 6 costs 5x the time for 10% less


def save_photo(pixels: np.ndarray, path: Path) -> None:
    """Save RGB pixels (a thumbnail or a map overlay) as a JPEG, shrunk to MAX_FIGURE_PX when the
    model input is larger. JPEG, not PNG: WeasyPrint embeds JPEG data as it is, while it decodes
    and re-compresses every PNG (that took a third of a 2,000-image report's render time)."""
    image = Image.fromarray(pixels)
    if max(image.size) > MAX_FIGURE_PX:
        image = image.resize((MAX_FIGURE_PX, MAX_FIGURE_PX), Image.Resampling.BILINEAR)
    image.save(path, format="JPEG", quality=90)
