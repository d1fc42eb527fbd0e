"""Benchmark: occlusion maps for every class against Captum and against the forwards alone, in one run.

Same model, images, window, stride (a 7x7 grid: window = stride = 32 px at 224), zero
baseline and device for all contenders:
  ours      ``visaudit.tasks.explain.occlusion.occlusion_maps``: probabilities of ALL classes for every
            muted window (1 + N*49 images through the model, automatic chunks)
  captum-P  Captum ``Occlusion`` on the softmax of the model for the predicted class only,
            ``perturbations_per_eval`` = P for each P in --ppe; the best P is reported
  limit     plain ``torch.no_grad()`` forwards of all N*49 muted copies, prebuilt before
            the clock starts, in the same chunks as ours (no mask building, no base forward)

Usage: python benchmarks/bench_occlusion.py [--models resnet18,resnet50] [--batch 4] [--reps 3]
                                            [--device cpu] [--ppe 16,49,64] [--threads 2]
Warm-up twice, contenders alternate within each repetition, medians and ratios reported.
Targets: captum-best/ours >= 1.0 (at least Captum's speed), ours/limit <= 1.1.
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch
import torchvision
from torch import nn

from benchmarks.timing import time_all
from visaudit.tasks.explain import occlusion as occ
from visaudit.tasks.explain import perturb


class Softmax(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(x), dim=1)


def chunk_for(model: nn.Module, x: torch.Tensor) -> int:
    """The chunk size ``occlusion_maps`` picks automatically for these inputs."""
    with torch.inference_mode():
        _, largest = perturb.probe_activation(model, x[:1])
    return perturb.auto_chunk(x[0].numel() * x.element_size(), largest, x.device)


def contenders(model: nn.Module, x: torch.Tensor, spec: occ.OcclusionSpec,
               ppes: list[int]) -> tuple[dict[str, Callable[[], object]], int]:
    from captum.attr import Occlusion

    geo = spec.geometry(x.shape[-2:])
    chunk = chunk_for(model, x)
    with torch.no_grad():
        target = model(x).argmax(dim=1)

    def ours() -> object:
        return occ.occlusion_maps(model, x, spec)

    ablator = Occlusion(Softmax(model))

    def captum(ppe: int) -> Callable[[], object]:
        def run() -> object:
            return ablator.attribute(
                x, sliding_window_shapes=(x.shape[1], *geo.window), strides=(x.shape[1], *geo.stride),
                baselines=0, target=target, perturbations_per_eval=ppe,
            )

        return run

    # prebuilt muted copies (N * windows, C, H, W), image-major like ours
    rows = perturb.cover(geo.size[0], geo.window[0], geo.stride[0], geo.grid[0], x.device)
    cols = perturb.cover(geo.size[1], geo.window[1], geo.stride[1], geo.grid[1], x.device)
    masks = (rows[:, None, :, None] & cols[None, :, None, :]).reshape(-1, 1, *geo.size)
    muted = torch.where(masks[None], torch.zeros((), device=x.device), x[:, None]).flatten(0, 1).contiguous()

    def limit() -> object:
        with torch.no_grad():
            return [model(muted[start : start + chunk]) for start in range(0, muted.shape[0], chunk)]

    fns: dict[str, Callable[[], object]] = {"ours": ours}
    fns.update({f"captum-{p}": captum(p) for p in ppes})
    fns["limit"] = limit
    return fns, chunk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,resnet50")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--grid", type=int, default=7)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--ppe", default="16,49,64", help="Captum perturbations_per_eval values to try")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    ppes = [int(p) for p in args.ppe.split(",")]
    spec = occ.OcclusionSpec(grid=args.grid)
    geo = spec.geometry(args.size)
    torch.manual_seed(0)
    print(f"device={device} batch={args.batch} size={args.size} grid={geo.grid} window={geo.window} "
          f"reps={args.reps} threads={torch.get_num_threads()}")
    print("| model | chunk | ours (s) | captum best (s) | captum by ppe (s) | limit (s) | captum/ours | ours/limit "
          "| max diff vs captum |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        model = torchvision.models.get_model(name, weights=None).eval().to(device)
        x = torch.randn(args.batch, 3, args.size, args.size, device=device)
        fns, chunk = contenders(model, x, spec, ppes)
        # same maps as Captum's for the predicted class (checked once, outside the clock)
        result = occ.occlusion_maps(model, x, spec)
        target = result.base_scores.argmax(dim=1)
        ours_pixels = occ.to_pixels(result.maps(torch.arange(args.batch, device=device), target), spec, args.size)
        diff = (ours_pixels - fns[f"captum-{ppes[0]}"]()[:, 0]).abs().max().item()  # type: ignore[index]
        t = time_all(fns, args.reps, device)
        best = min((f"captum-{p}" for p in ppes), key=lambda k: t[k])
        by_ppe = ", ".join(f"{p}: {t[f'captum-{p}']:.2f}" for p in ppes)
        print(
            f"| {name} | {chunk} | {t['ours']:.2f} | {t[best]:.2f} ({best.split('-')[1]}) | {by_ppe} | {t['limit']:.2f} "
            f"| {t[best] / t['ours']:.2f}x | {t['ours'] / t['limit']:.2f}x | {diff:.1e} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
