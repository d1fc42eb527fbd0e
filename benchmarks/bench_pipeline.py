"""Pipeline overhead: a whole audit (predictions + Grad-CAM, report and PDF) against its model compute.

Audits N generated images (the demo generator, 96 px PNGs upscaled to 224 by the
preprocessing) with a 4-class ResNet (random weights) through the flow, in-process, and
splits the wall time into model compute (the shards' forward + Grad-CAM) and everything
else (orchestration, decoding not hidden by the prefetch, Parquet, sanity check,
findings, report). Peak RSS is read at the end.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_pipeline.py [--images 2000] [--arch resnet18]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

ARCH = os.environ.get("VISAUDIT_BENCH_ARCH", "resnet18")


def build(num_classes: int = 4):
    """The benchmarked model (importable as benchmarks.bench_pipeline:build)."""
    import torch
    import torchvision

    torch.manual_seed(0)
    return getattr(torchvision.models, ARCH)(weights=None, num_classes=num_classes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--arch", default=ARCH)
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "visaudit-bench-pipeline")
    args = parser.parse_args()
    os.environ["VISAUDIT_BENCH_ARCH"] = args.arch

    from visaudit.flows.audit import AuditRequest, audit
    from visaudit.tasks.demo.recipe import generate_dataset, load_recipe

    recipe = dataclasses.replace(load_recipe(), test_per_class=args.images // 4, train_per_class=1)
    data = generate_dataset(recipe, args.data / f"n{args.images}")
    classes = data / "classes.txt"
    classes.write_text("\n".join(recipe.classes) + "\n")
    out = Path(tempfile.mkdtemp(prefix="visaudit-pipeline-"))
    request = AuditRequest(source=str(data / "test.csv"), out_dir=str(out), model="benchmarks.bench_pipeline:build",
                           classes_file=str(classes), batch_size=32, shard_size=256)
    started = time.perf_counter()
    run_id = audit(request)
    wall = time.perf_counter() - started
    timings = json.loads((out / "runs" / run_id / "run.json").read_text())["timings"]
    model = timings["shards.model"]
    rows = {
        "images": args.images, "arch": args.arch, "wall_s": round(wall, 1), "model_compute_s": round(model, 1),
        "overhead_s": round(wall - model, 1), "overhead_share": f"{(wall - model) / wall:.1%}",
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    stages = {k: v for k, v in timings.items() if not k.startswith("shards.") and k != "total_before_report"}
    stages["report (rest of the wall time)"] = round(wall - timings["total_before_report"], 3)
    print(json.dumps(rows))
    print(json.dumps(stages))


if __name__ == "__main__":
    main()
