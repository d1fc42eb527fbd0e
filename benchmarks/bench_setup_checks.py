"""Cost of the setup checks on a probe of 200 labelled images (seconds), per model.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_setup_checks.py [--images 200] [--arch resnet18]

Generates 200 PNGs of 96 px (4 classes of coloured squares), builds the torchvision model with
random weights, and times :func:`run_setup_checks` (decoding, every alternative's forwards, the
assignment) at the default preprocessing (256/224, ImageNet mean/std, RGB).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from visaudit.tasks.audit.setup_checks import run_setup_checks
from visaudit.tasks.data.images import Preprocess
from visaudit.tasks.data.sources import build_index
from visaudit.tasks.model.loading import ModelSpec, load_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=96)
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
        import torchvision

        torch.save(torchvision.models.get_model(args.arch, num_classes=4).state_dict(), weights)
        loaded = load_model(ModelSpec(arch=args.arch, weights=str(weights)), "cpu", 224)
        started = time.perf_counter()
        report = run_setup_checks(loaded, index, classes, Preprocess(), False, 32)
        wall = time.perf_counter() - started
    assert report is not None
    print(f"{args.arch}: {report.probe_images} probe images, {report.alternatives} alternatives besides the given "
          f"one, {wall:.1f} s (torch threads {torch.get_num_threads()})")


if __name__ == "__main__":
    main()
