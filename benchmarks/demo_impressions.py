"""Is the planted bias visible in the demo's class impressions? Measured, for the plain and the
adversarially trained demo CNN.

Trains (or reuses, cached by recipe) the demo CNN twice on the demo recipe: as the recipe says
(FGSM adversarial training, ``adversarial_epsilon``) and plainly (epsilon 0); synthesises the
class impressions of both with the audit's defaults; and measures in every impression:

  marks       copies of the planted mark's pattern (a white square with a black centre, at
              the recipe's mark size): local maxima of the normalised cross-correlation of
              the impression's grey levels with that pattern that reach ``--ncc`` (0.8),
              at least a mark apart
  best_ncc    the highest normalised cross-correlation anywhere
  black_white share of pixels that are black (every channel < 60) within 2 pixels of a white one
              (every channel > 200): the mark's colours side by side, at any scale
  background  share of pixels within 60 (RGB distance, 0..255) of the planted background colour

and the colour impression of every class (``visaudit.tasks.explain.colour_impressions.colour_impressions``: the plain
colour that raises the class most), its probability, and the recipe's background colour
nearest to it.

A visible planted bias: the mark class's impression holds copies of the mark and the others
do not; the background class's impression is more of the planted colour than the others, or
its colour impression is the planted colour and wins the class on its own.

    PYTHONPATH=. .venv/bin/python benchmarks/demo_impressions.py [--cache DIR] [--iterations 200]
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from visaudit.tasks.demo import network
from visaudit.tasks.demo import recipe as demo
from visaudit.tasks.explain.colour_impressions import colour_impressions
from visaudit.tasks.explain.impression_settings import settings_for_input
from visaudit.tasks.explain.impressions import class_impressions


def mark_pattern(recipe: demo.DemoRecipe) -> torch.Tensor:
    """The mark as painted by the generator, grey levels in [0, 1]: (size, size)."""
    canvas = np.zeros((recipe.mark_size * 3, recipe.mark_size * 3, 3), dtype=np.uint8)
    shifted = dataclasses.replace(recipe, mark_xy=(0, 0))
    demo.paint_mark(canvas, shifted)
    return torch.from_numpy(canvas[: recipe.mark_size, : recipe.mark_size, 0].astype(np.float32) / 255)


def normalised_cross_correlation(grey: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """NCC of every pattern-sized window of ``grey`` (H, W) with ``pattern``: (H - s + 1, W - s + 1)."""
    s = pattern.shape[-1]
    p = (pattern - pattern.mean()) / pattern.std(unbiased=False)
    g = grey[None, None]
    mean = F.avg_pool2d(g, s, 1)
    var = (F.avg_pool2d(g * g, s, 1) - mean * mean).clamp_min(1e-6)
    return (F.conv2d(g, p[None, None]) / (s * s) / var.sqrt())[0, 0]


def measure(images: torch.Tensor, recipe: demo.DemoRecipe, threshold: float) -> list[dict]:
    pattern = mark_pattern(recipe)
    colour = torch.tensor(recipe.backgrounds[recipe.background_colour], dtype=torch.float32).view(3, 1, 1)
    rows = []
    for image in images:
        ncc = normalised_cross_correlation(image.float().mean(0) / 255, pattern)
        peaks = (ncc == F.max_pool2d(ncc[None, None], recipe.mark_size, 1, recipe.mark_size // 2)[0, 0,
                 : ncc.shape[0], : ncc.shape[1]]) & (ncc >= threshold)
        white = (image.amin(0) > 200).float()[None, None]
        near_white = F.max_pool2d(white, 5, 1, 2)[0, 0] > 0
        black_white = float(((image.amax(0) < 60) & near_white).float().mean())
        rows.append(dict(marks=int(peaks.sum()), best_ncc=float(ncc.max()), black_white=black_white,
                         background=float(((image.float() - colour).norm(dim=0) < 60).float().mean())))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "visaudit" / "demo-impressions")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--ncc", type=float, default=0.8)
    args = parser.parse_args()
    recipe = demo.load_recipe()
    print(f"| training | held-out accuracy | class | probability | marks (NCC >= {args.ncc}) | best NCC "
          f"| black next to white | {recipe.background_colour} share | colour impression (RGB) "
          f"| its probability | nearest background | plain {recipe.background_colour} image |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, trained in (("adversarial", recipe), ("plain", dataclasses.replace(recipe, adversarial_epsilon=0.0))):
        folder = args.cache / demo.recipe_fingerprint(trained)
        data_dir = demo.generate_dataset(trained, folder / "data")
        metrics = network.train_model(data_dir, trained, folder / "model.pt", log=lambda line: None)
        model = network.build_model(len(trained.classes))
        model.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
        model.eval()
        classes = list(range(len(trained.classes)))
        settings = settings_for_input(trained.image_size, iterations=args.iterations)
        result = class_impressions(model, classes, settings)
        colours = colour_impressions(model, classes, settings)
        planted = torch.tensor(trained.backgrounds[trained.background_colour], dtype=torch.float32) / 255
        with torch.no_grad():
            flat = network.normalise(planted.view(1, 3, 1, 1).expand(1, 3, trained.image_size, trained.image_size))
            planted_p = torch.softmax(model(flat), dim=1)[0]
        label = f"{name} (epsilon {trained.adversarial_epsilon:g}/255)" if trained.adversarial_epsilon else name
        for c, row in zip(classes, measure(result.images, trained, args.ncc)):
            rgb = colours.colours[c].numpy().astype(float)
            nearest = min(trained.backgrounds, key=lambda n: np.linalg.norm(np.array(trained.backgrounds[n]) - rgb))
            print(f"| {label} | {metrics['test_accuracy']:.3f} | {trained.classes[c]} | {float(result.probability[c]):.3f} "
                  f"| {row['marks']} | {row['best_ncc']:.2f} | {row['black_white']:.4f} | {row['background']:.2f} "
                  f"| {', '.join(str(int(v)) for v in rgb)} | {float(colours.probability[c]):.3f} | {nearest} "
                  f"| {float(planted_p[c]):.3f} |")


if __name__ == "__main__":
    main()
