"""Feature views: what the first conv layer filters for, and which channels an image lights up.

Two views from the seeds' activation-and-filter visualisation:

* first-layer filters: each (3, k, k) kernel of the first convolution on RGB, min-max
  scaled on its own and shown as a tiny colour patch (oriented edges, colour blobs);
* live activations: for an image, the ``k`` channels of a layer with the largest mean
  activation, each channel's (h, w) map shown over the image.

Figures are written at audit time (they need the model) under the run's ``features/``
folder with an index ``features.json``; the report only reads them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from visaudit.tasks.data.files import write_atomically
from visaudit.tasks.explain.feature_index import INDEX_NAME
from visaudit.tasks.model.hooks import forward_hooks
from visaudit.tasks.model.layout import Layout, infer_layout, to_map, token_grid

FILTER_PATCH_PX = 24  # each kernel is drawn this many pixels a side (nearest-neighbour)


def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d] | None:
    """The first ``nn.Conv2d`` that reads the 3 input channels, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            return name, module
    return None


def filter_grid(weight: torch.Tensor, columns: int = 16, pad: int = 2) -> np.ndarray:
    """(C_out, 3, k, k) kernels -> (H, W, 3) uint8 grid, each kernel min-max scaled on its own."""
    w = weight.detach().float().cpu()
    low = w.amin(dim=(1, 2, 3), keepdim=True)
    high = w.amax(dim=(1, 2, 3), keepdim=True)
    scaled = ((w - low) / (high - low).clamp(min=1e-12)).permute(0, 2, 3, 1).numpy()  # (C, k, k, 3)
    count = scaled.shape[0]
    columns = min(columns, count)
    rows = -(-count // columns)
    cell = FILTER_PATCH_PX + pad
    grid = np.full((rows * cell + pad, columns * cell + pad, 3), 255, dtype=np.uint8)
    for i in range(count):  # at most a few hundred tiny patches, once per run
        patch = Image.fromarray((scaled[i] * 255).round().astype(np.uint8)).resize(
            (FILTER_PATCH_PX, FILTER_PATCH_PX), Image.Resampling.NEAREST
        )
        r, c = divmod(i, columns)
        grid[pad + r * cell : pad + r * cell + FILTER_PATCH_PX, pad + c * cell : pad + c * cell + FILTER_PATCH_PX] = patch
    return grid


@torch.no_grad()
def layer_activations(model: nn.Module, inputs: torch.Tensor, layer: str) -> torch.Tensor:
    """The output of ``layer`` for a batch as an (N, C, h, w) map (transformer tokens and
    channels-last outputs read by :mod:`visaudit.tasks.model.layout`); the hook is removed
    whatever happens."""
    captured: list[torch.Tensor] = []
    module = dict(model.named_modules())[layer]
    grid = token_grid(model, (int(inputs.shape[-2]), int(inputs.shape[-1])))

    def keep(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        layout = infer_layout(output.shape, grid) or Layout("nchw", (0, 0))
        captured.append(to_map(output.detach(), layout).clone())

    with forward_hooks([(module, keep)]):
        model(inputs)
    return captured[0]


def top_channels(activations: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, the ``k`` channels with the largest mean activation: (N, k) indices and means."""
    means = activations.mean(dim=(2, 3))
    values, indices = means.topk(min(k, means.shape[1]), dim=1)
    return indices, values


def write_feature_views(
    model: nn.Module,
    inputs: torch.Tensor,
    pixels: list[np.ndarray],
    image_ids: list[str],
    layer: str,
    folder: Path,
    k: int = 5,
) -> dict:
    """Write the filter grid and one strip of top channels per image under ``folder``;
    returns (and saves as ``features.json``) the index the report reads."""
    from visaudit.tasks.explain.overlay import overlay_pixels, save_photo, save_png

    folder.mkdir(parents=True, exist_ok=True)
    index: dict = {"layer": layer, "filters": None, "images": []}
    conv = first_conv(model)
    if conv is not None:
        name, module = conv
        save_png(filter_grid(module.weight), folder / "filters.png")
        index["filters"] = {"layer": name, "path": "filters.png", "count": int(module.out_channels)}
    activations = layer_activations(model, inputs, layer).float()
    indices, values = top_channels(activations, k)
    for n, image_id in enumerate(image_ids):
        size = pixels[n].shape[0]
        entries = []
        for rank, (channel, mean) in enumerate(zip(indices[n].tolist(), values[n].tolist())):
            path = f"{n:02d}-{rank}.jpg"  # photos as JPEG, which the PDF embeds as they are (save_photo)
            heat = activations[n, channel].clamp(min=0).cpu().numpy()
            save_photo(overlay_pixels(heat, pixels[n], size, None), folder / path)
            entries.append({"channel": int(channel), "mean": float(mean), "path": path})
        save_photo(pixels[n], folder / f"{n:02d}-image.jpg")
        index["images"].append({"image_id": image_id, "image": f"{n:02d}-image.jpg", "channels": entries})
    write_atomically(folder / INDEX_NAME, lambda tmp: tmp.write_text(json.dumps(index, indent=2)))
    return index
