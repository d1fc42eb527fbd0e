"""What the adversarial experiment leaves: the ``adversarial`` table's rows and, for each attacked
image the attack fooled, PNGs of the clean and of the adversarial image at the smallest budget
that fooled it (the report's strip; written at audit time, since they need the model)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from visaudit.tasks.data.files import write_atomically
from visaudit.tasks.data.schema import table_schema
from visaudit.tasks.explain.adversarial import AdversarialMaps, AttackSettings

ADVERSARIAL_DIR = "adversarial"  # figures under runs/<run_id>/


def strip_rows(result: AdversarialMaps) -> torch.Tensor:
    """Indices of the rows shown as strips: per image, its smallest successful budget."""
    rows = torch.nonzero(result.success).squeeze(1)
    if not rows.numel():
        return rows
    rows = rows[torch.argsort(result.epsilon[rows], stable=True)]
    rows = rows[torch.argsort(result.image[rows], stable=True)]  # by image, then budget
    first = torch.ones_like(rows, dtype=torch.bool)
    first[1:] = result.image[rows][1:] != result.image[rows][:-1]
    return rows[first]


def _png(pixels: torch.Tensor, path: Path) -> None:
    """(3, H, W) [0, 1] -> an RGB PNG (lossless: the perturbation survives to 1/255)."""
    array = (pixels.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    write_atomically(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def save_strip_pngs(result: AdversarialMaps, clean: torch.Tensor, image_ids: list[str],
                    folder: Path) -> dict[int, tuple[str, str]]:
    """PNGs of the strip rows' clean and adversarial images under ``folder``; row -> (clean,
    adversarial) paths relative to the run folder."""
    paths: dict[int, tuple[str, str]] = {}
    for row in strip_rows(result).tolist():
        image = int(result.image[row])
        name = hashlib.sha1(image_ids[image].encode()).hexdigest()[:16]
        clean_path, adversarial_path = f"{ADVERSARIAL_DIR}/{name}.png", f"{ADVERSARIAL_DIR}/{name}-adv.png"
        _png(clean[image], folder / f"{name}.png")
        _png(result.pixels[row], folder / f"{name}-adv.png")
        paths[row] = (clean_path, adversarial_path)
    return paths


def adversarial_table(result: AdversarialMaps, image_ids: list[str], classes: list[str], clean_confidence: np.ndarray,
                      settings: AttackSettings, layer: str, paths: dict[int, tuple[str, str]]) -> pd.DataFrame:
    """The ``adversarial`` table's rows, one per (image, budget), in the table's columns.

    ``clean_confidence`` (N,) is each image's clean top-1 probability."""
    image = result.image.cpu().numpy()
    m, h, w = result.clean_map.shape
    success = result.success.cpu().numpy()

    def lists(maps: torch.Tensor) -> list[np.ndarray]:
        return list(maps.reshape(m, h * w).float().cpu().numpy())

    def hits(values: torch.Tensor) -> list[bool | None]:
        return [None if np.isnan(v) else bool(v) for v in values.cpu().numpy()]

    epsilon = result.epsilon.cpu().numpy()
    frame = pd.DataFrame({
        "image_id": [image_ids[i] for i in image],
        "target": [classes[int(k)] for k in result.original.tolist()],
        "target_index": result.original.cpu().numpy().astype(np.int32),
        "clean_confidence": np.asarray(clean_confidence, dtype=np.float32)[image],
        "epsilon": epsilon.astype(np.float32),
        "steps": settings.steps,
        "step_size": (settings.step_ratio * epsilon / settings.steps).astype(np.float32),
        "seed": settings.seed,
        "linf": result.linf.cpu().numpy().astype(np.float32),
        "success": success,
        "adversarial_class": [classes[int(k)] for k in result.adversarial.tolist()],
        "adversarial_index": result.adversarial.cpu().numpy().astype(np.int32),
        "adversarial_confidence": result.adversarial_confidence.cpu().numpy(),
        "original_probability": result.original_probability.cpu().numpy(),
        "layer": layer,
        "height": h,
        "width": w,
        "clean_heatmap": lists(result.clean_map),
        "heatmap": lists(result.original_map),
        "adversarial_heatmap": [v if s else None for v, s in zip(lists(result.adversarial_map), success)],
        "spearman": result.spearman.cpu().numpy(),
        "pointing_hit_clean": hits(result.hit_clean),
        "pointing_hit": hits(result.hit_original),
        "pointing_hit_adversarial": [h if s else None for h, s in zip(hits(result.hit_adversarial), success)],
        "image_path": [paths[r][0] if r in paths else None for r in range(m)],
        "adversarial_path": [paths[r][1] if r in paths else None for r in range(m)],
    })
    return frame[table_schema("adversarial").names]
