"""Cost of the setup checks on a probe of 200 labelled images (seconds): screened (the default)
against every alternative scored on the whole probe (the search before screening), same run.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_setup_checks.py [--images 200] [--arch resnet18] [--reps 3]

Generates PNGs of 96 px (4 classes of coloured squares), builds the torchvision model with
random weights, and times :func:`run_setup_checks` (decoding, every alternative's forwards, the
assignment) at the default preprocessing (256/224, ImageNet mean/std, RGB), the two contenders
alternating after one warm-up; medians of ``--reps``. Both must reach the same verdict.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

from visaudit.tasks.audit.setup_checks import SetupThresholds, run_setup_checks
from visaudit.tasks.data.images import Preprocess
from visaudit.tasks.data.sources import build_index
from visaudit.tasks.model.loading import ModelSpec, load_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    classes = ["a", "b", "c", "d"]
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        for i in range(args.images):
            name = classes[i % 4]
            (root / name).mkdir(exist_ok=True)
            pixels = np.full((args.size, args.size, 3), rng.integers(0, 256, 3), dtype=np.uint8)
            side = args.size // 3
            x, y = rng.integers(0, args.size - side, 2)
            pixels[y:y + side, x:x + side] = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)][i % 4]
            Image.fromarray(pixels).save(root / name / f"{i:04d}.png")
        index = build_index(str(root))
        torch.manual_seed(0)
        weights = root / "w.pt"
        torch.save(torchvision.models.get_model(args.arch, num_classes=4).state_dict(), weights)
        loaded = load_model(ModelSpec(arch=args.arch, weights=str(weights)), "cpu", 224)
        screened = SetupThresholds(probe_images=args.images)
        contenders = {"screened": screened,
                      "whole probe": replace(screened, screen_images=args.images, screen_loss_ratio=1.0)}
        times: dict[str, list[float]] = {name: [] for name in contenders}
        verdicts: dict[str, set[tuple[str | None, int]]] = {name: set() for name in contenders}
        for rep in range(args.reps + 1):
            for name, thresholds in contenders.items():
                started = time.perf_counter()
                report = run_setup_checks(loaded, index, classes, Preprocess(), False, 32, thresholds)
                wall = time.perf_counter() - started
                assert report is not None
                verdicts[name].add((report.preprocessing_fix, report.best.assigned))
                if rep:
                    times[name].append(wall)
        print(f"{args.arch}, {report.probe_images} probe images, {report.alternatives} alternatives besides the "
              f"given one (torch threads {torch.get_num_threads()}), medians of {args.reps}:")
        for name in contenders:
            print(f"  {name}: {statistics.median(times[name]):.1f} s  (verdicts {sorted(verdicts[name], key=str)})")
        print(f"  whole probe / screened: {statistics.median(times['whole probe']) / statistics.median(times['screened']):.2f}x")


if __name__ == "__main__":
    main()
