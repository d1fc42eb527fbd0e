"""Shard throughput on a GPU: JPEG files on disk to Parquet tables, predictions + Grad-CAM.

Writes N JPEG files (256 px, four class folders), then audits them with
``visaudit.tasks.audit.shard.audit_shard`` (the work of one Prefect shard task: decode in a thread
pool overlapped with the model, one forward, Grad-CAM for predicted and true classes,
signals, Parquet parts) and prints images per second with where the time goes. Prefect
itself is not involved (it adds a fixed few seconds per run, see bench_pipeline.py).

    PYTHONPATH=. python benchmarks/bench_gpu.py --images 8192 --arch resnet50
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from visaudit.tasks.audit.shard import ShardSettings, audit_shard
from visaudit.tasks.data.images import Preprocess
from visaudit.tasks.data.sources import build_index
from visaudit.tasks.model.loading import ModelSpec, load_model


def write_jpegs(root: Path, count: int, size: int = 256) -> None:
    """``count`` JPEG files of coloured shapes on noisy backgrounds, in four class folders."""
    def one(i: int) -> None:
        rng = np.random.default_rng(i)
        pixels = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        image = Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR)
        x, y = rng.integers(20, size - 80, 2)
        ImageDraw.Draw(image).ellipse([x, y, x + 60, y + 60], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        folder = root / f"class{i % 4}"
        image.save(folder / f"{i:06d}.jpg", format="JPEG", quality=90)

    for k in range(4):
        (root / f"class{k}").mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(count)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8192)
    parser.add_argument("--shard", type=int, default=2048)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch-sizes", default="128,256")
    parser.add_argument("--workers", default="8,16")
    parser.add_argument("--precisions", default="auto,fp32", help="auto = bf16 autocast on CUDA")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    root = Path(tempfile.mkdtemp(prefix="visaudit-jpegs-"))
    started = time.perf_counter()
    write_jpegs(root, args.images)
    print(f"wrote {args.images} JPEGs in {time.perf_counter() - started:.1f} s", flush=True)
    index = build_index(root)
    loaded = load_model(ModelSpec(arch=args.arch), "auto", 224)
    classes = tuple(f"class{k}" for k in range(loaded.num_classes))
    print(f"device {loaded.device}, {torch.cuda.get_device_name() if loaded.device.type == 'cuda' else 'cpu'}, "
          f"layer {loaded.layers[-1]}", flush=True)
    out = Path(tempfile.mkdtemp(prefix="visaudit-gpu-out-"))
    grid = itertools.product(args.precisions.split(","), (int(b) for b in args.batch_sizes.split(",")),
                             (int(w) for w in args.workers.split(",")))
    for precision, batch_size, workers in grid:
        settings = ShardSettings(classes=classes, preprocess=Preprocess(256, 224), batch_size=batch_size,
                                 decode_workers=workers, methods=("gradcam",), layer=loaded.layers[-1],
                                 precision=precision)
        run = f"{precision}-b{batch_size}-w{workers}"
        audit_shard(index.iloc[:batch_size * 2], loaded, settings, out, run, "warmup")  # kernels, cudnn choice
        shards = [index.iloc[i : i + args.shard] for i in range(0, len(index), args.shard)]
        torch.cuda.synchronize() if loaded.device.type == "cuda" else None
        t0 = time.perf_counter()
        seconds: dict[str, float] = {}
        for n, rows in enumerate(shards):
            result = audit_shard(rows, loaded, settings, out, run, f"{n:05d}")
            for key, value in result.seconds.items():
                seconds[key] = seconds.get(key, 0.0) + value
        wall = time.perf_counter() - t0
        row = {"precision": precision, "batch": batch_size, "decode_workers": workers, "images": len(index),
               "wall_s": round(wall, 2), "images_per_s": round(len(index) / wall),
               **{k: round(v, 2) for k, v in seconds.items()}}
        print(json.dumps(row), flush=True)
    model_only = time_model(loaded, settings)
    print(json.dumps({"model_only_images_per_s": model_only}), flush=True)
    print(json.dumps({"bf16_vs_fp32_gradcam": agreement(loaded, settings, index["uri"].iloc[:64].tolist())}), flush=True)
    print(json.dumps({"decode": decode_rates(index["uri"].tolist(), settings.preprocess, loaded.device)}), flush=True)


def decode_rates(uris: list[str], pre: Preprocess, device: torch.device) -> dict[str, float]:
    """Images/s of PIL (16 threads) and GPU decoding, and how far apart their pixels are."""
    from visaudit.tasks.data.images import decode_many

    rates = {}
    for name, where in (("pil_16_threads", None), ("gpu", device)):
        decode_many(uris[:256], pre, 16, where)
        t0 = time.perf_counter()
        results = [decode_many(uris[i : i + 512], pre, 16, where) for i in range(0, len(uris), 512)]
        torch.cuda.synchronize() if device.type == "cuda" else None
        rates[name] = round(len(uris) / (time.perf_counter() - t0))
    cpu = np.stack([d.pixels for d in decode_many(uris[:64], pre, 16, None)]).astype(np.float64)
    gpu = [d.pixels for d in decode_many(uris[:64], pre, 16, device)]
    gpu = np.stack([p.permute(1, 2, 0).cpu().numpy() if isinstance(p, torch.Tensor) else p for p in gpu])
    rates["mean_abs_pixel_difference"] = round(float(np.abs(cpu - gpu).mean()), 2)
    del results
    return rates


def agreement(loaded, settings: ShardSettings, uris: list[str]) -> dict[str, float]:
    """Grad-CAM of the predicted class under bf16 autocast against fp32, on real decoded images:
    per-map Pearson correlation (median, minimum) and the share of maps with the same peak cell."""
    from visaudit.tasks.data.batches import normalise, to_batch
    from visaudit.tasks.data.images import Decoded, decode_many
    from visaudit.tasks.explain import cam
    from visaudit.tasks.model.hooks import hooked_forward

    decoded = [d for d in decode_many(uris, settings.preprocess, 8) if isinstance(d, Decoded)]
    x = normalise(to_batch(decoded, loaded.device), settings.preprocess)
    maps = {}
    with torch.no_grad():
        target = loaded.model(x).argmax(dim=1)  # the fp32 prediction, explained in both precisions
    for name, use_bf16 in (("fp32", False), ("bf16", True)):
        with torch.autocast(loaded.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            forward = hooked_forward(loaded.model, x, [settings.layer])
        maps[name] = cam.explain(forward, torch.arange(len(x), device=x.device), target, ("gradcam",))[
            ("gradcam", settings.layer)].flatten(1).double()
    a, b = maps["fp32"], maps["bf16"]
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    r = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)
    same_peak = (maps["fp32"].argmax(1) == maps["bf16"].argmax(1)).double().mean()
    return {"median_r": round(float(r.median()), 4), "min_r": round(float(r.min()), 4),
            "same_peak": round(float(same_peak), 3), "images": len(x)}


def time_model(loaded, settings: ShardSettings, batch: int = 256, repeats: int = 10) -> dict[str, int]:
    """The engine alone on device-resident inputs (no decoding, no rows): the ceiling."""
    from visaudit.tasks.explain import cam
    from visaudit.tasks.model.hooks import hooked_forward

    x = torch.randn(batch, 3, 224, 224, device=loaded.device)
    out = {}
    for name, use_bf16 in (("fp32", False), ("bf16_autocast", True)):
        def step() -> None:
            with torch.autocast(loaded.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                forward = hooked_forward(loaded.model, x, [settings.layer])
                target = forward.scores.argmax(dim=1)
                cam.explain(forward, torch.arange(batch, device=x.device), target, ("gradcam",))

        for _ in range(3):
            step()
        torch.cuda.synchronize() if x.is_cuda else None
        t0 = time.perf_counter()
        for _ in range(repeats):
            step()
        torch.cuda.synchronize() if x.is_cuda else None
        out[name] = round(batch * repeats / (time.perf_counter() - t0))
    return out


if __name__ == "__main__":
    main()
