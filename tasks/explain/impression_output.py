"""What an impression run leaves behind: the Grad-CAM of each impression for its own class and
where that evidence sits (:func:`impression_cam`), one PNG per impression (:func:`save_pngs`),
and the rows of ``tables/impressions`` (:func:`impression_table`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from visaudit.tasks.data.images import IMAGENET_MEAN, IMAGENET_STD
from visaudit.tasks.explain.cam import grad_cam
from visaudit.tasks.explain.colour_impressions import ColourImpression
from visaudit.tasks.explain.impressions import ImpressionResult, check_classes, class_name, normalisation
from visaudit.tasks.model.hooks import eval_mode, hooked_forward


@dataclass
class ImpressionCam:
    """Grad-CAM of each impression for its own class, and where its evidence sits.

    Positions are fractions of the width/height (0 = left/top, 1 = right/bottom); offsets
    are distances from the centre (0.5, 0.5) as a fraction of the size (at most ~0.71, a
    corner). NaN where the map is empty (no positive evidence at the layer).
    """

    layer: str
    maps: torch.Tensor  # (K, h, w) Grad-CAM at the layer's resolution
    peak_x: torch.Tensor  # (K,) centre of the map's largest cell
    peak_y: torch.Tensor
    centroid_x: torch.Tensor  # (K,) centroid of the map's part above mass_threshold x its maximum
    centroid_y: torch.Tensor
    centroid_offset: torch.Tensor  # (K,) |centroid - centre|
    peak_offset: torch.Tensor  # (K,) |peak - centre|
    spread: torch.Tensor  # (K,) RMS distance of that part from the centroid (small = one spot)
    off_centre: torch.Tensor  # (K,) bool, centroid_offset > the threshold given


def impression_cam(
    model: nn.Module,
    images: torch.Tensor,
    classes: Sequence[int],
    layer: str,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    off_centre_threshold: float = 0.25,
    mass_threshold: float = 0.5,
) -> ImpressionCam:
    """Grad-CAM (``visaudit.tasks.explain.cam``) of each impression for its class at ``layer``, and its position.

    ``images`` are the uint8 impressions (K, 3, S, S) (normalised here with ``mean``/``std``),
    or a float batch already normalised as model input. One hooked forward, one
    ``autograd.grad``; the model is left as it was (eval mode during the call, flags restored)::

        L_k = ReLU( sum_c alpha_c A^c ),  alpha_c = mean_ij d y_{c_k} / d A^c_ij
        M_k = ReLU( L_k - t max L_k )                            (t = mass_threshold)
        centroid_k = sum_ij M_k(i, j) p_ij / sum_ij M_k(i, j)    (p_ij the cell centre, in 0..1)
        spread_k = sqrt( sum_ij M_k(i, j) |p_ij - centroid_k|^2 / sum_ij M_k(i, j) )

    The centroid is taken over the map's part above ``t`` times its maximum (half by default),
    so a faint floor spread over the whole impression does not pull it to the centre.
    ``off_centre`` is ``centroid_offset > off_centre_threshold``.
    """
    classes = check_classes(classes)
    if images.dim() != 4 or images.shape[0] != len(classes):
        raise ValueError(f"images must be (K, 3, H, W) with K = len(classes) = {len(classes)}, "
                         f"got shape {tuple(images.shape)}")
    if not 0 <= off_centre_threshold:
        raise ValueError(f"off_centre_threshold must be >= 0, got {off_centre_threshold!r}")
    if not 0 <= mass_threshold < 1:
        raise ValueError(f"mass_threshold must be in [0, 1), got {mass_threshold!r}")
    first = next(model.parameters(), None)
    device = first.device if first is not None else images.device
    images = images.to(device)
    if images.dtype == torch.uint8:
        inputs = (images.float() / 255 - normalisation(mean, "mean", device)) / normalisation(std, "std", device)
    else:
        inputs = images.float()
    sample = torch.arange(len(classes), device=device)
    target = torch.tensor(classes, device=device)
    with eval_mode(model):
        forward = hooked_forward(model, inputs, [layer])
        if max(classes) >= forward.scores.shape[1]:
            raise ValueError(f"class index {max(classes)} out of range: the model has "
                             f"{forward.scores.shape[1]} classes")
        maps = grad_cam(forward, sample, target)[layer].detach()
    k, h, w = maps.shape
    flat_peak = maps.reshape(k, -1).argmax(dim=1)
    peak_x = ((flat_peak % w).to(maps.dtype) + 0.5) / w
    peak_y = ((flat_peak // w).to(maps.dtype) + 0.5) / h
    ys = (torch.arange(h, device=device, dtype=maps.dtype) + 0.5) / h
    xs = (torch.arange(w, device=device, dtype=maps.dtype) + 0.5) / w
    peak = maps.reshape(k, -1).amax(dim=1)
    mass = F.relu(maps - mass_threshold * peak[:, None, None])
    total = mass.sum(dim=(1, 2))
    safe = torch.where(total > 0, total, torch.ones_like(total))
    cy = (mass.sum(dim=2) * ys).sum(dim=1) / safe
    cx = (mass.sum(dim=1) * xs).sum(dim=1) / safe
    d2 = (ys[None, :, None] - cy[:, None, None]).pow(2) + (xs[None, None, :] - cx[:, None, None]).pow(2)
    spread = ((mass * d2).sum(dim=(1, 2)) / safe).sqrt()
    nan = torch.full_like(total, float("nan"))
    empty = peak <= 0
    cx, cy, spread = (torch.where(empty, nan, v) for v in (cx, cy, spread))
    centroid_offset = torch.hypot(cx - 0.5, cy - 0.5)
    peak_offset = torch.where(empty, nan, torch.hypot(peak_x - 0.5, peak_y - 0.5))
    return ImpressionCam(
        layer=layer,
        maps=maps,
        peak_x=torch.where(empty, nan, peak_x),
        peak_y=torch.where(empty, nan, peak_y),
        centroid_x=cx,
        centroid_y=cy,
        centroid_offset=centroid_offset,
        peak_offset=peak_offset,
        spread=spread,
        off_centre=centroid_offset > off_centre_threshold,
    )


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "class"


def save_pngs(result: ImpressionResult, class_names: Sequence[str] | None, out_dir: str | Path) -> list[Path]:
    """Write one PNG per impression, ``impression_<k>_<class index>_<class name>.png``, in order."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pixels = result.images.permute(0, 2, 3, 1).contiguous().numpy()
    paths = []
    for k, c in enumerate(result.classes):
        path = out / f"impression_{k:03d}_{c:04d}_{_slug(class_name(class_names, c))}.png"
        tmp = path.with_name(path.name + ".tmp")
        Image.fromarray(pixels[k]).save(tmp, format="PNG")
        tmp.replace(path)
        paths.append(path)
    return paths


def impression_table(result: ImpressionResult, cam: ImpressionCam | None, class_names: Sequence[str] | None,
                     image_paths: Sequence[str], colours: ColourImpression | None = None) -> pd.DataFrame:
    """The rows of ``tables/impressions``: scores of each impression, its PNG (relative path),
    its Grad-CAM for its class with where the evidence sits, and its colour impression (null
    columns without one). Without ``cam`` (a model with no layer to explain: TorchScript) the
    Grad-CAM columns are empty: layer "", a 0x0 heatmap, NaN positions, never off-centre."""
    rows = pd.DataFrame(result.records(class_names))
    if colours is not None:
        if colours.classes != result.classes:
            raise ValueError(f"colour impressions are of classes {colours.classes}, the impressions of {result.classes}")
        rgb = colours.colours.numpy().astype(np.int32)
        rows = rows.assign(colour_r=rgb[:, 0], colour_g=rgb[:, 1], colour_b=rgb[:, 2],
                           colour_probability=colours.probability.float().numpy())
    else:
        rows = rows.assign(colour_r=None, colour_g=None, colour_b=None, colour_probability=np.nan)
    names = ("peak_x", "peak_y", "centroid_x", "centroid_y", "centroid_offset", "spread")
    k = len(rows)
    if cam is None:
        return rows.assign(image_path=list(image_paths), layer="", height=0, width=0,
                           heatmap=[np.zeros(0, np.float32)] * k, off_centre=np.zeros(k, bool),
                           **{name: np.full(k, np.nan, np.float32) for name in names})
    _, h, w = cam.maps.shape
    heat = cam.maps.float().cpu().reshape(k, h * w).numpy()
    located = {name: getattr(cam, name).float().cpu().numpy() for name in names}
    return rows.assign(
        image_path=list(image_paths),
        layer=cam.layer,
        height=h,
        width=w,
        heatmap=list(heat),
        off_centre=cam.off_centre.cpu().numpy(),
        **located,
    )
