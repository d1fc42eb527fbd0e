"""Benchmark: the adversarial experiment against the bare passes it cannot avoid, in one run.

Contenders, same model, images, budgets and device:
  passes   steps x budgets forward + backward passes to the input of the whole batch, nothing
           else (the limit: PGD needs exactly these)
  pgd      ``explain.adversarial.pgd`` over every (image, budget) row, chunks of ``--batch`` rows
  full     ``attack_and_explain``: the clean forward, PGD, and Grad-CAM of the original and the
           adversarial class (what ``visaudit run --adversarial-images`` runs)

Usage: PYTHONPATH=. python benchmarks/bench_adversarial.py [--model resnet18] [--images 8] [--size 224]
       [--batch 32] [--reps 3] [--device cpu]
Warm-up twice, contenders alternate within each repetition, medians and ratios reported.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import torchvision

from benchmarks.timing import time_all
from visaudit.tasks.data.batches import standardise
from visaudit.tasks.data.images import Preprocess
from visaudit.tasks.explain.adversarial import AttackSettings, attack_and_explain, pgd
from visaudit.tasks.model.hooks import frozen_parameters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)(weights=None).eval().to(device)
    pre = Preprocess(args.size, args.size)
    settings = AttackSettings()
    budgets = len(settings.epsilons)
    pixels = torch.rand(args.images, 3, args.size, args.size, device=device)
    boxes = torch.full((args.images, 4), float("nan"), device=device)
    rows = pixels.repeat_interleave(budgets, dim=0)
    target = torch.zeros(len(rows), dtype=torch.long, device=device)
    epsilon = torch.tensor(settings.epsilons, device=device).repeat(args.images)

    def to_input(x: torch.Tensor) -> torch.Tensor:
        return standardise(x, pre)

    def passes() -> object:
        with frozen_parameters(model):
            for _ in range(settings.steps):
                for begin in range(0, len(rows), args.batch):
                    x = rows[begin : begin + args.batch].clone().requires_grad_(True)
                    loss = F.cross_entropy(model(to_input(x)), target[begin : begin + args.batch], reduction="sum")
                    torch.autograd.grad(loss, x)
        return None

    fns = {
        "passes": passes,
        "pgd": lambda: pgd(model, rows, target, epsilon, settings, to_input, args.batch),
        "full": lambda: attack_and_explain(model, pixels, boxes, "layer4", settings, to_input, args.batch),
    }
    t = time_all(fns, args.reps, device)
    print(f"device={device} model={args.model} images={args.images} budgets={budgets} steps={settings.steps} "
          f"size={args.size} batch={args.batch} threads={torch.get_num_threads()}")
    print("| passes (s) | pgd (s) | full (s) | pgd / passes | full / passes | full per image (s) |")
    print("|---|---|---|---|---|---|")
    print(f"| {t['passes']:.2f} | {t['pgd']:.2f} | {t['full']:.2f} | {t['pgd'] / t['passes']:.2f} | "
          f"{t['full'] / t['passes']:.2f} | {t['full'] / args.images:.2f} |")


if __name__ == "__main__":
    main()
