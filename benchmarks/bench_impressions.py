"""Benchmark: class impressions of K classes as ONE batch, against K one-by-one runs and the limit.

Same model, image size, settings and device for all contenders (seconds per iteration):
  batched     ``visaudit.tasks.explain.impressions.class_impressions`` on K classes at once, n iterations;
              the whole call divided by n (so it includes the final evaluation forward,
              the draws and the uint8 conversion; the start is scored by the first step)
  marginal    (call with 2n iterations - call with n) / n: the cost of one more iteration
  one-by-one  K calls with one class each, n iterations, summed, divided by n
  limit       one plain forward + backward of a batch of K w.r.t. the input (parameters
              frozen, no transforms, no optimiser): what one batched iteration cannot beat

Models: resnet18 (torchvision, random weights, no download) at 224 px, and the tests' small
CNN (random weights) at 32 px with its 4 classes. Both parameterisations are timed.

Colour impressions (``visaudit.tasks.explain.colour_impressions.colour_impressions``, seconds per call, same K classes):
  colour      the default call: a grid of 6^3 plain colours, then 20 refining Adam steps
  grid only   colour_steps = 0
  grid limit  plain forwards of the 216 flat images in chunks of 64, without gradients

Usage: python benchmarks/bench_impressions.py [--k 8] [--iterations 10] [--reps 3] [--threads 2]
                                              [--device cpu] [--models resnet18,small]
Warm-up twice, contenders alternate within each repetition, medians and ratios reported.
Target: batched/limit <= 1.2.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Callable

import torch
import torchvision
from torch import nn

from benchmarks.timing import time_all
from visaudit.tasks.data.images import IMAGENET_MEAN, IMAGENET_STD
from visaudit.tasks.explain.colour_impressions import colour_impressions
from visaudit.tasks.explain.impression_settings import ImpressionSettings
from visaudit.tasks.explain.impressions import class_impressions
from visaudit.tasks.model.hooks import frozen_parameters


def small_cnn() -> nn.Module:
    """The architecture of the tests' shapes model (tests/test_impressions.py), random weights."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4),
    )


def contenders(model: nn.Module, classes: list[int], settings: ImpressionSettings,
               device: torch.device) -> dict[str, Callable[[], object]]:
    k, size = len(classes), settings.image_size
    twice = replace(settings, iterations=2 * settings.iterations)
    x = torch.rand(k, 3, size, size, device=device)
    rows = torch.arange(k, device=device)
    target = torch.tensor(classes, device=device)

    def batched() -> object:
        return class_impressions(model, classes, settings, IMAGENET_MEAN, IMAGENET_STD, device)

    def batched_twice() -> object:
        return class_impressions(model, classes, twice, IMAGENET_MEAN, IMAGENET_STD, device)

    def one_by_one() -> object:
        return [class_impressions(model, [c], settings, IMAGENET_MEAN, IMAGENET_STD, device) for c in classes]

    def limit() -> object:
        with frozen_parameters(model):
            inputs = x.clone().requires_grad_(True)
            model(inputs)[rows, target].sum().backward()
        return inputs.grad

    return {"batched": batched, "batched-2n": batched_twice, "one-by-one": one_by_one, "limit": limit}


def colour_contenders(model: nn.Module, classes: list[int], settings: ImpressionSettings,
                      device: torch.device) -> dict[str, Callable[[], object]]:
    grid_only = replace(settings, colour_steps=0)
    levels = (torch.arange(settings.colour_levels, device=device, dtype=torch.float32) + 0.5) / settings.colour_levels
    flat = torch.cartesian_prod(levels, levels, levels).view(-1, 3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    size = settings.image_size

    def limit() -> object:
        with torch.no_grad():
            return [model(((part - mean) / std).expand(-1, 3, size, size)) for part in flat.split(64)]

    return {
        "colour": lambda: colour_impressions(model, classes, settings, IMAGENET_MEAN, IMAGENET_STD, device),
        "grid only": lambda: colour_impressions(model, classes, grid_only, IMAGENET_MEAN, IMAGENET_STD, device),
        "grid limit": limit,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,small")
    parser.add_argument("--k", type=int, default=8, help="classes for resnet18 (the small CNN has 4)")
    parser.add_argument("--iterations", type=int, default=10, help="n for resnet18 (x5 for the small CNN)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parameterisations", default="fourier,pixel")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device={device} threads={torch.get_num_threads()} reps={args.reps} torch={torch.__version__}")
    print("| model | size | K | param | n | batched (s/it) | marginal (s/it) | one-by-one (s/it) | limit fwd+bwd (s) "
          "| batched/limit | marginal/limit | one-by-one/batched |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    colour_rows = []
    for name in args.models.split(","):
        if name == "small":
            model, size, classes, n = small_cnn(), 32, [0, 1, 2, 3], 5 * args.iterations
            jitter = 2.0
        else:
            model = torchvision.models.get_model(name, weights=None)
            size, classes, n, jitter = 224, list(range(0, 100 * args.k, 100))[: args.k], args.iterations, 8.0
        model = model.eval().to(device)
        for kind in args.parameterisations.split(","):
            settings = ImpressionSettings(iterations=n, image_size=size, jitter=jitter, parameterisation=kind)
            t = time_all(contenders(model, classes, settings, device), args.reps, device)
            batched = t["batched"] / n
            marginal = (t["batched-2n"] - t["batched"]) / n
            single = t["one-by-one"] / n
            print(
                f"| {name} | {size} | {len(classes)} | {kind} | {n} | {batched:.4f} | {marginal:.4f} | {single:.4f} "
                f"| {t['limit']:.4f} | {batched / t['limit']:.2f}x | {marginal / t['limit']:.2f}x "
                f"| {single / batched:.2f}x |",
                flush=True,
            )
        colour = time_all(colour_contenders(model, classes, ImpressionSettings(image_size=size, jitter=jitter), device),
                          args.reps, device)
        colour_rows.append(f"| {name} | {size} | {len(classes)} | {colour['colour']:.3f} | {colour['grid only']:.3f} "
                           f"| {colour['grid limit']:.3f} | {colour['grid only'] / colour['grid limit']:.2f}x |")
    print("\n| model | size | K | colour (s) | grid only (s) | grid limit (s) | grid only/limit |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(colour_rows))


if __name__ == "__main__":
    main()
