"""Benchmark: mil_patches maps for every class against the plain forwards of the same patch batch, in one run.

Same model, images, patches (the defaults: patch 0.25, stride 0.125 of the side, 7 x 7
half-overlapping patches, 56 px every 28 px at 224) and device for both contenders:
  ours   ``visaudit.tasks.explain.mil.mil_maps``: cuts and resizes the N*49 patches chunk by
         chunk and returns the probabilities of ALL classes for each (automatic chunks)
  limit  plain ``torch.inference_mode()`` forwards of the N*49 patches, cut and resized by a
         Python loop with torchvision before the clock starts, in the same chunks as ours

Usage: python benchmarks/bench_mil.py [--models resnet18,resnet50] [--batch 4] [--size 224]
                                      [--reps 5] [--threads 2] [--device cpu]
Warm-up twice, contenders alternate within each repetition, medians and the ratio reported,
with the largest difference between the two contenders' probabilities (checked outside the clock).
Target: ours/limit <= 1.1.
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch
import torchvision
import torchvision.transforms.functional as TF
from torch import nn

from benchmarks.timing import time_all
from visaudit.tasks.explain import mil, perturb


def prebuilt_patches(x: torch.Tensor, geometry: mil.MilGeometry) -> torch.Tensor:
    """Every patch of every image, resized to the input, image-major like ours: (N * gh * gw, C, H, W)."""
    ph, pw = geometry.patch
    crops = [TF.resize(image[:, r : r + ph, c : c + pw], list(geometry.size), antialias=True)
             for image in x for r in geometry.row_starts for c in geometry.col_starts]
    return torch.stack(crops).contiguous()


def contenders(model: nn.Module, x: torch.Tensor, spec: mil.MilSpec) -> tuple[dict[str, Callable[[], object]], int]:
    geometry = spec.geometry(x.shape[-2:])
    patches = prebuilt_patches(x, geometry)
    with torch.inference_mode():
        _, largest = perturb.probe_activation(model, patches[:1])
    chunk = perturb.auto_chunk(x[0].numel() * x.element_size(), largest, x.device)

    def ours() -> object:
        return mil.mil_maps(model, x, spec)

    def limit() -> object:
        with torch.inference_mode():
            return [model(patches[start : start + chunk]) for start in range(0, patches.shape[0], chunk)]

    return {"ours": ours, "limit": limit}, chunk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    spec = mil.MilSpec()
    geometry = spec.geometry(args.size)
    torch.manual_seed(0)
    print(f"device={device} batch={args.batch} size={args.size} patches={geometry.grid} patch={geometry.patch} "
          f"stride={geometry.stride} reps={args.reps} threads={torch.get_num_threads()}")
    print("| model | patches | chunk | ours (s) | limit (s) | ours/limit | max diff |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        model = torchvision.models.get_model(name, weights=None).eval().to(device)
        x = torch.randn(args.batch, 3, args.size, args.size, device=device)
        fns, chunk = contenders(model, x, spec)
        ours = mil.mil_maps(model, x, spec).scores  # (N, K, gh, gw)
        limit = torch.softmax(torch.cat(fns["limit"]()).float(), dim=1)  # type: ignore[arg-type]
        diff = (ours.permute(0, 2, 3, 1).reshape(limit.shape) - limit).abs().max().item()
        t = time_all(fns, args.reps, device)
        print(f"| {name} | {args.batch * geometry.count} | {chunk} | {t['ours']:.3f} | {t['limit']:.3f} "
              f"| {t['ours'] / t['limit']:.3f}x | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
