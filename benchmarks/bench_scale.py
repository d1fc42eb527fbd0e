"""Scale: real ``visaudit run`` audits of N generated images on disk, stage by stage.

For each size, the demo's generator writes N small PNGs (in chunks of 4,000, one process per
chunk: ``--workers``; cached under ``--data``), then a ``visaudit run`` subprocess audits them
with the demo CNN (random weights, ``visaudit.tasks.demo.network:build_model``) at
``--input-size`` pixels, defaults otherwise (predictions + Grad-CAM, setup checks, sanity
check, findings, report and PDF). Recorded per size: the wall time, each stage's seconds and
seconds per 1,000 images (``run.json``'s timings; the setup checks' own seconds; "other" is
the wall time no stage accounts for: imports, indexing, model load, Prefect, commit, gate,
report), the peak RSS of the run's process tree (the sum over the run and its children,
sampled every 0.2 s) and of its largest process, the run's table sizes on disk, and the
report's time (``visaudit report RUN_ID``, a re-render of the HTML and PDF from the committed
tables, its imports included). A markdown table goes to stdout and to ``--markdown``.

Targets (issue 21): every stage's time per image within 1.5x from 20k to the largest size,
peak RSS within 1.5x, the report's time independent of N. Run on a quiet machine; the 100k
run (about 4 GB of images, an hour or more on 2 cores) is one command:

    PYTHONPATH=. .venv/bin/python benchmarks/bench_scale.py 20000 100000 --markdown scale.md

The 200-image overhead figure of the README: ``bench_scale.py 200 --image-size 96
--input-size 224 --repeat 3``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

if TYPE_CHECKING:
    import torch

CHUNK = 4000  # images per generator process (1,000 per class)
MODEL = "visaudit.tasks.demo.network:build_model"
TABLES = ("predictions", "explanations", "signals", "metrics", "findings")
STAGES = ("setup_checks", "shards", "shards.model", "sanity_check", "findings", "feature_views")


@dataclasses.dataclass
class Measured:
    """One audit of N images."""

    images: int
    wall: float
    stages: dict[str, float]
    peak_tree_mb: float
    peak_process_mb: float
    tables_mb: dict[str, float]
    report: float
    load: float
    cpu: float  # user + system seconds of the run and the children it reaped (less sensitive to load than wall)
    peak_by_stage_mb: dict[str, float] = dataclasses.field(default_factory=dict)  # the tree's peak RSS in each stage
    peak_by_role_mb: dict[str, float] = dataclasses.field(default_factory=dict)  # the run, Prefect's server, other children


def _chunk(args: tuple[int, int, int, str]) -> str:
    index, count, size, folder = args
    from visaudit.tasks.demo.recipe import generate_dataset, load_recipe

    base = load_recipe()
    recipe = dataclasses.replace(base, seed=base.seed + index, image_size=size, test_per_class=count // 4,
                                 train_per_class=1)
    return str(generate_dataset(recipe, Path(folder)))


def generate(images: int, size: int, root: Path, workers: int) -> Path:
    """``root/n<images>-<size>px/test.csv``: N images in chunk folders (reused when complete)."""
    if images % 4:
        raise ValueError(f"--images must be a multiple of 4 (four classes), got {images}")
    data = root / f"n{images}-{size}px"
    manifest = data / "test.csv"
    if manifest.exists():
        return manifest
    counts = [min(CHUNK, images - start) for start in range(0, images, CHUNK)]
    jobs = [(i, count, size, str(data / f"chunk{i:04d}")) for i, count in enumerate(counts)]
    with ProcessPoolExecutor(workers) as pool:
        folders = list(pool.map(_chunk, jobs))
    rows: list[list[str]] = []
    header: list[str] = []
    for folder in folders:
        with open(Path(folder) / "test.csv", newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader)
            rows += [[f"{Path(folder).name}/{row[0]}", *row[1:]] for row in reader]
    (data / "classes.txt").write_text("\n".join(_classes()) + "\n")
    partial = manifest.with_suffix(".tmp")
    with partial.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    partial.replace(manifest)
    return manifest


def _classes() -> list[str]:
    from visaudit.tasks.demo.recipe import load_recipe

    return list(load_recipe().classes)


def _stage(out: Path) -> str:
    """The stage the run is in, from its progress files (``tasks/audit/progress.py``)."""
    for stage_file in (out / "runs").glob(".staging-*/progress/stage"):
        try:
            return stage_file.read_text().strip() or "shards"
        except OSError:
            break
    if any((out / "runs").glob(".staging-*/progress")):
        return "shards"
    return "report" if any((out / "runs").glob("r*/run.json")) else "prepare"


def _role(member: psutil.Process, run: psutil.Process) -> str:
    """What a process of the run's tree is: the run itself, Prefect's API server, or another child
    (the PDF's process, decode workers)."""
    if member.pid == run.pid:
        return "run"
    try:
        return "prefect server" if "uvicorn" in member.cmdline() else "other children"
    except psutil.Error:
        return "other children"


def _watch(process: psutil.Process, peaks: list[float], stop: threading.Event, out: Path,
           by_stage: dict[str, float], by_role: dict[str, float]) -> None:
    """Peak RSS (MB) of the process tree (the sum) and of its largest process, the tree's peak by
    stage, and each role's (``_role``: the sum over its processes) peak."""
    while not stop.wait(0.2):
        try:
            tree = [process, *process.children(recursive=True)]
            sizes, roles = [], {}
            for member in tree:
                try:
                    size = member.memory_info().rss
                except psutil.Error:
                    continue
                sizes.append(size)
                role = _role(member, process)
                roles[role] = roles.get(role, 0) + size
        except psutil.Error:
            return
        peaks[0] = max(peaks[0], sum(sizes) / 2**20)
        peaks[1] = max(peaks[1], max(sizes, default=0) / 2**20)
        stage = _stage(out)
        by_stage[stage] = max(by_stage.get(stage, 0.0), round(sum(sizes) / 2**20))
        for role, size in roles.items():
            by_role[role] = max(by_role.get(role, 0.0), round(size / 2**20))


def _size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20 if folder.exists() else 0.0


def resnet18() -> torch.nn.Module:
    """``--model benchmarks.bench_scale:resnet18``: torchvision's ResNet-18 with random weights, 4 classes."""
    import torchvision

    return torchvision.models.resnet18(num_classes=4)


def audit(manifest: Path, out: Path, input_size: int, extra: list[str], model_clock: bool = False,
          model: str = MODEL) -> Measured:
    """One ``visaudit run`` subprocess over the manifest, measured (``model_clock``: run through
    ``benchmarks.model_clock``, which times every forward and backward of the run)."""
    visaudit = Path(sys.executable).with_name("visaudit")
    clock = out / "model-clock.json"
    launcher = [sys.executable, "-m", "benchmarks.model_clock", str(clock)] if model_clock else [str(visaudit)]
    command = [*launcher, "run", str(manifest), "--out", str(out), "--model", model,
               "--classes", str(manifest.with_name("classes.txt")), "--resize", str(input_size),
               "--crop", str(input_size), "-q", *extra]
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks, stop, by_stage, by_role = [0.0, 0.0], threading.Event(), {}, {}
    watcher = threading.Thread(target=_watch, args=(psutil.Process(child.pid), peaks, stop, out, by_stage, by_role),
                               daemon=True)
    watcher.start()
    stdout, stderr = child.communicate()
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    stop.set()
    watcher.join()
    if child.returncode != 0:
        raise RuntimeError(f"visaudit run failed ({child.returncode}): {stderr.strip()[-2000:]}")
    record = json.loads(next((out / "runs").glob("*/run.json")).read_text())
    run_id = record["run_id"]
    timings = record["timings"]
    stages = {name: float(timings.get(name, 0.0)) for name in STAGES}
    stages["setup_checks"] = float((record.get("setup") or {}).get("seconds", 0.0))
    # the shards' wall time outside their own decode/model/rows/write timers: Prefect's task runs and the
    # shard step's own loading (plan, model from the process cache, index slice), per shard
    inside = sum(float(timings.get(f"shards.{part}", 0.0)) for part in ("decode", "model", "rows_wait", "write"))
    shards = -(-record["metrics"]["images"] // int(record["parameters"]["shard_size"]))
    stages["per_shard_outside"] = (stages["shards"] - inside) / shards
    counted = stages["setup_checks"] + sum(stages[s] for s in STAGES if s not in ("setup_checks", "shards.model"))
    stages["other"] = wall - counted
    stages["model_all"] = float(json.loads(clock.read_text())["model"]) if model_clock else float("nan")
    mark = time.perf_counter()
    subprocess.run([str(visaudit), "report", run_id, "--out", str(out)], check=True, capture_output=True)
    report = time.perf_counter() - mark
    tables = {name: _size_mb(out / "tables" / name / f"run_id={run_id}") for name in TABLES}
    return Measured(record["metrics"]["images"], wall, stages, peaks[0], peaks[1], tables, report, load, cpu, by_stage,
                    by_role)


def median_of(runs: list[Measured]) -> Measured:
    """Stage by stage medians of repeated runs of one size (the tables are the same)."""
    pick = statistics.median
    return Measured(
        runs[0].images, pick(r.wall for r in runs), {k: pick(r.stages[k] for r in runs) for k in runs[0].stages},
        pick(r.peak_tree_mb for r in runs), pick(r.peak_process_mb for r in runs), runs[0].tables_mb,
        pick(r.report for r in runs), pick(r.load for r in runs), pick(r.cpu for r in runs), runs[0].peak_by_stage_mb,
        runs[0].peak_by_role_mb,
    )


def markdown(results: list[Measured]) -> str:
    """The table: one row per size; each stage as seconds (ms per image)."""
    names = [*STAGES, "other"]
    head = ["images", "load avg", "wall", "CPU time", *names, "outside the model", "per shard outside its timers",
            "report re-render", "peak RSS tree / largest", "tables"]
    clocked = all(r.stages["model_all"] == r.stages["model_all"] for r in results)
    if clocked:  # every forward and backward of the run, in any step
        head[head.index("report re-render"):head.index("report re-render")] = ["all model work", "outside all model work"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [f"{r.images:,}", f"{r.load:.1f}", f"{r.wall:.1f} s", f"{r.cpu:.1f} s"]
        cells += [f"{r.stages[n]:.1f} s ({1000 * r.stages[n] / r.images:.2f})" for n in names]
        outside = r.wall - r.stages["shards.model"]
        cells += [f"{outside:.1f} s ({outside / r.wall:.0%})", f"{1000 * r.stages['per_shard_outside']:.0f} ms"]
        if r.stages["model_all"] == r.stages["model_all"]:  # timed with --model-clock
            beyond = r.wall - r.stages["model_all"]
            cells += [f"{r.stages['model_all']:.1f} s", f"{beyond:.1f} s ({beyond / r.wall:.0%})"]
        cells += [f"{r.report:.1f} s", f"{r.peak_tree_mb:,.0f} / {r.peak_process_mb:,.0f} MB",
                  f"{sum(r.tables_mb.values()):.1f} MB"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sizes", type=int, nargs="+", help="numbers of images (multiples of 4)")
    parser.add_argument("--image-size", type=int, default=48, help="generated images' side in pixels (>= 36)")
    parser.add_argument("--input-size", type=int, help="the model's input side (default: the image size)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per size (the medians are reported)")
    parser.add_argument("--workers", type=int, default=2, help="generator processes")
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "visaudit-bench-scale")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    parser.add_argument("--model", default=MODEL, help=f"the model factory (default {MODEL}; "
                        "benchmarks.bench_scale:resnet18 for torchvision's ResNet-18, random weights)")
    parser.add_argument("--keep", action="store_true", help="keep the output folders")
    parser.add_argument("--model-clock", action="store_true",
                        help="also time every forward and backward of the run (benchmarks/model_clock.py)")
    args, extra = parser.parse_known_args()
    results = []
    for images in args.sizes:
        manifest = generate(images, args.image_size, args.data, args.workers)
        runs = []
        for _ in range(args.repeat):
            out = Path(tempfile.mkdtemp(prefix=f"visaudit-scale-{images}-"))
            try:
                runs.append(audit(manifest, out, args.input_size or args.image_size, extra, args.model_clock,
                                  args.model))
            finally:
                if not args.keep:
                    shutil.rmtree(out, ignore_errors=True)
            print(json.dumps(dataclasses.asdict(runs[-1])), file=sys.stderr, flush=True)
        results.append(median_of(runs))
    table = markdown(results)
    print(table)
    if args.markdown:
        args.markdown.write_text(table)


if __name__ == "__main__":
    main()
