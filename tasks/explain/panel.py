"""``visaudit explain``: one image, one panel PNG, like the seeds' Colab walkthrough.

For each target class a row: the image, Grad-CAM over it, Guided Backpropagation,
Guided Grad-CAM and counterfactual Grad-CAM; beside them the model's top-5 probabilities
(softmax, or sigmoid for a multi-label model). Every map comes from ONE hooked forward of
the image and one plain plus one guided backward per target round (see
:func:`visaudit.tasks.explain.cam.explain`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from visaudit.tasks.data.batches import normalise, to_batch
from visaudit.tasks.data.images import decode
from visaudit.tasks.explain.cam import explain
from visaudit.tasks.explain.catalogue import INPUT_LAYER, method_title
from visaudit.tasks.explain.overlay import overlay_pixels
from visaudit.tasks.model.head import Head
from visaudit.tasks.model.hooks import hooked_forward
from visaudit.tasks.model.loading import LoadedModel, default_preprocess

PANEL_METHODS = ("gradcam", "guided_backprop", "guided_gradcam", "counterfactual")
TOP_K = 5


@dataclass(frozen=True)
class PanelResult:
    """What the panel shows, also returned to the caller: the top-5 and the explained classes."""

    path: Path
    top: list[tuple[str, float]]
    targets: list[str]


def gradient_image(gradient: np.ndarray) -> np.ndarray:
    """(3, H, W) input gradient -> (H, W, 3) uint8 the way the Grad-CAM paper shows it:
    centred on grey, scaled by the largest absolute value."""
    scale = float(np.abs(gradient).max())
    scaled = gradient / scale * 0.5 + 0.5 if scale > 0 else np.full_like(gradient, 0.5)
    return (np.clip(scaled.transpose(1, 2, 0), 0, 1) * 255).round().astype(np.uint8)


def explain_image(
    uri: str,
    loaded: LoadedModel,
    classes: list[str],
    out: Path,
    targets: list[str] | None = None,
    resize: int | None = None,
    crop: int | None = None,
    multi_label: bool = False,
) -> PanelResult:
    """Explain one image for the predicted class (or each named target) and save the panel.

    The top-5 are the model's probabilities through its head: softmax, or the sigmoid of
    each class when ``multi_label``.
    """
    if len(classes) != loaded.num_classes:
        raise ValueError(f"the model has {loaded.num_classes} outputs but {len(classes)} class names were given")
    unknown = [t for t in targets or [] if t not in classes]
    if unknown:
        raise ValueError(f"--target {unknown}: not among the model's classes ({', '.join(classes[:8])}, ...)")
    if not loaded.layers:
        raise ValueError(f"{loaded.layer_reason}: the panel's Grad-CAM and guided maps need a layer; "
                         "audit the model with visaudit run --methods occlusion")
    pre = default_preprocess(loaded, resize, crop)
    decoded = decode(uri, pre)
    inputs = normalise(to_batch([decoded], loaded.device), pre)
    layer = loaded.layers[-1]
    forward = hooked_forward(loaded.model, inputs, [layer], guided=True)
    probs = Head(multi_label).probabilities(forward.scores.detach())[0]
    top_score, top_index = probs.topk(min(TOP_K, probs.numel()))
    top = [(classes[int(i)], float(s)) for s, i in zip(top_score, top_index)]
    wanted = [classes.index(t) for t in targets] if targets else [int(top_index[0])]
    sample = torch.zeros(len(wanted), dtype=torch.long, device=loaded.device)
    maps = explain(forward, sample, torch.tensor(wanted, device=loaded.device), PANEL_METHODS)
    maps = {key: value.detach().float().cpu().numpy() for key, value in maps.items()}

    size = decoded.pixels.shape[0]
    columns = ["image", *(method_title(method) for method in PANEL_METHODS)]
    figure = Figure(figsize=(2.2 * (len(columns) + 1), 2.4 * len(wanted)), dpi=100)
    axes = figure.subplots(len(wanted), len(columns) + 1, squeeze=False)
    for row, class_index in enumerate(wanted):
        pictures = [
            decoded.pixels,
            overlay_pixels(maps[("gradcam", layer)][row], decoded.pixels, size, None),
            gradient_image(maps[("guided_backprop", INPUT_LAYER)][row]),
            gradient_image(maps[("guided_gradcam", INPUT_LAYER)][row]),
            overlay_pixels(maps[("counterfactual", layer)][row], decoded.pixels, size, None),
        ]
        for column, (title, picture) in enumerate(zip(columns, pictures)):
            axis = axes[row][column]
            axis.imshow(picture)
            axis.set_axis_off()
            axis.set_title(title if column == 0 else f"{title}\n{classes[class_index]}", fontsize=8)
        text = axes[row][-1]
        text.set_axis_off()
        if row == 0:
            lines = "\n".join(f"{name[:22]}  {score:.3f}" for name, score in top)
            text.text(0.0, 0.95, f"top-{len(top)}\n{lines}", va="top", family="monospace", fontsize=8)
    figure.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, format="png")
    return PanelResult(out, top, [classes[i] for i in wanted])
