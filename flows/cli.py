"""The ``visaudit`` command line: ``run``, ``demo``, ``report``.

Bad input ends with a one-line ``error: ...`` naming the file and the fix (exit code 2),
never a traceback.
"""

from __future__ import annotations

import json
import os

# Prefect reads its settings at import time: quiet by default, no analytics, patient start.
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from pydantic import ValidationError

from visaudit.tasks.model.loading import ModelError
from visaudit.tasks.data.sources import DataSourceError

app = typer.Typer(
    help="Audit image classifiers: predictions, Grad-CAM, Parquet tables, and a PDF report of bias and failure modes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DEFAULT_OUT = Path("visaudit-out")
USER_ERRORS = (DataSourceError, ModelError, ValueError, FileNotFoundError)


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _validation_message(exc: ValidationError) -> str:
    return "; ".join(f"--{'.'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in exc.errors())


def parse_thresholds(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            fail(f"--threshold {item!r}: expected NAME=VALUE, e.g. --threshold confident_error_confidence=0.95")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            fail(f"--threshold {item!r}: {value!r} is not a number")
    return out


def parse_impression_options(items: list[str]) -> dict[str, Any]:
    """``NAME=VALUE`` pairs; VALUE is read as JSON (numbers, lists such as ``[0.8, 1.2]``),
    else kept as text (``objective=logit``)."""
    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            fail(f"--impression-option {item!r}: expected NAME=VALUE, e.g. --impression-option lr=0.1")
        try:
            out[name.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[name.strip()] = value.strip()
    return out


def execute(request: "AuditRequest", quiet: bool = False) -> Path:  # noqa: F821
    """Validate and plan (clean errors), then run the flow with a progress bar; returns the run folder."""
    from visaudit.flows.audit import prepare_run, run_audit

    try:
        plan = prepare_run(request)
    except USER_ERRORS as exc:
        fail(str(exc))
    request = request.model_copy(update={"run_id": plan.run_id})
    typer.echo(
        f"auditing {plan.images} images of {len(plan.classes)} classes from {request.source} "
        f"(run {plan.run_id}, layer {', '.join(plan.layers)})",
        err=True,
    )
    stop = threading.Event()
    watcher = None if quiet else threading.Thread(target=_progress, args=(plan, stop), daemon=True)
    if watcher:
        watcher.start()
    try:
        run_audit(request)
    except USER_ERRORS as exc:
        fail(f"{exc} (finished shards are kept: rerun with --run-id {plan.run_id} to resume)")
    except Exception as exc:
        fail(
            f"the audit failed: {type(exc).__name__}: {exc} "
            f"(finished shards are kept: rerun with --run-id {plan.run_id} to resume)"
        )
    finally:
        stop.set()
        if watcher:
            watcher.join()
    return Path(plan.out_dir) / "runs" / plan.run_id


def _progress(plan: "RunPlan", stop: threading.Event) -> None:  # noqa: F821
    """Show shards as they land in the run's staging folder."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from visaudit.tasks.data.storage import staging_dir

    folder = staging_dir(Path(plan.out_dir), "predictions", plan.run_id)
    sizes = {name: stop_ - start for name, start, stop_ in plan.shards}
    with Progress(
        TextColumn("images"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True,
        console=None,
    ) as bar:
        job = bar.add_task("audit", total=plan.images)
        while not stop.wait(0.25):
            done = sum(sizes.get(p.stem.removeprefix("part-"), 0) for p in folder.glob("part-*.parquet"))
            bar.update(job, completed=done)


def _print_result(run_dir: Path) -> None:
    import json

    record = json.loads((run_dir / "run.json").read_text())
    metrics = record.get("metrics", {})
    accuracy = metrics.get("accuracy")
    typer.echo(
        f"audited {metrics.get('audited')} of {metrics.get('images')} images"
        f" ({metrics.get('unreadable')} unreadable)"
        + (f", accuracy {accuracy:.1%}" if accuracy is not None else "")
    )
    for name in ("report.pdf", "report.html"):
        if (run_dir / name).exists():
            typer.echo(f"report: {run_dir / name}")
    typer.echo(f"tables: {run_dir.parent.parent / 'tables'}")


@app.command()
def run(
    source: Annotated[str, typer.Argument(help="Class-per-folder directory, or a .csv/.parquet manifest (path or URL).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (tables/ and runs/).")] = DEFAULT_OUT,
    arch: Annotated[Optional[str], typer.Option(help="torchvision architecture name, e.g. resnet18.")] = None,
    model: Annotated[
        Optional[str], typer.Option(help="Model factory 'package.module:function' or 'path/to/file.py:function'.")
    ] = None,
    weights: Annotated[
        Optional[str], typer.Option(help="state_dict file, or a torchvision weights name such as IMAGENET1K_V1.")
    ] = None,
    layer: Annotated[Optional[str], typer.Option(help="Layer to explain (default: the last spatial conv stage).")] = None,
    classes: Annotated[
        Optional[Path], typer.Option(help="File with class names, one per line, in the model's output order.")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    shard_size: Annotated[int, typer.Option(help="Images per Prefect task.")] = 256,
    resize: Annotated[Optional[int], typer.Option(help="Resize the shorter side to this (default: weights' or 256).")] = None,
    crop: Annotated[Optional[int], typer.Option(help="Centre crop size (default: weights' or 224).")] = None,
    multi_label: Annotated[
        Optional[bool], typer.Option("--multi-label/--multi-class", help="Sigmoid or softmax model (default: from the labels).")
    ] = None,
    methods: Annotated[
        str,
        typer.Option(
            help="Comma-separated: gradcam, gradcam++, xgradcam, layercam, hirescam, counterfactual, cam, "
            "guided_backprop, guided_gradcam, occlusion, impressions."
        ),
    ] = "gradcam",
    layer_by_layer: Annotated[
        bool, typer.Option(help="Also Grad-CAM at each of the 4 deepest stages (same backward pass).")
    ] = False,
    targets: Annotated[
        str, typer.Option(help="Classes to explain per image, comma-separated: predicted, true, top<k>.")
    ] = "predicted,true",
    target_class: Annotated[
        list[str], typer.Option(help="Also explain this class for every image (repeatable).")
    ] = [],  # noqa: B006 - typer needs a literal default
    threshold: Annotated[
        list[str], typer.Option(help="Override a finding threshold, NAME=VALUE (repeatable).")
    ] = [],  # noqa: B006 - typer needs a literal default
    templates: Annotated[Optional[Path], typer.Option(help="Folder with your own report.html.j2 and report.css.")] = None,
    pdf: Annotated[bool, typer.Option("--pdf/--no-pdf", help="Also render the PDF.")] = True,
    run_id: Annotated[Optional[str], typer.Option(help="Resume or name a run (default: a new id).")] = None,
    trust_checkpoint: Annotated[
        bool, typer.Option(help="Allow weights files that are full pickles (they can run code).")
    ] = False,
    occlusion_grid: Annotated[int, typer.Option(help="Occlusion: windows per side (window = stride = size / grid).")] = 7,
    occlusion_window: Annotated[Optional[int], typer.Option(help="Occlusion: window in pixels (instead of a grid).")] = None,
    occlusion_stride: Annotated[Optional[int], typer.Option(help="Occlusion: stride in pixels (default: the window).")] = None,
    occlusion_baseline: Annotated[str, typer.Option(help="Occlusion: what a muted window holds: zero, mean, blur.")] = "zero",
    rise_images: Annotated[
        int, typer.Option(help="With occlusion: images for RISE deletion/insertion of Grad-CAM and occlusion (0 = off).")
    ] = 16,
    impression_class: Annotated[
        list[str], typer.Option(help="Impressions: synthesise this class (repeatable; default: every class up to the cap).")
    ] = [],  # noqa: B006 - typer needs a literal default
    impression_max_classes: Annotated[int, typer.Option(help="Impressions: most classes, the most frequent first.")] = 16,
    impression_iterations: Annotated[int, typer.Option(help="Impressions: gradient-ascent steps.")] = 200,
    impression_tv_weight: Annotated[float, typer.Option(help="Impressions: Total Variation weight (0 = off).")] = 10.0,
    impression_seed: Annotated[int, typer.Option(help="Impressions: random seed (same seed, same images).")] = 0,
    impression_option: Annotated[
        list[str], typer.Option(help="Impressions: any other parameter, NAME=VALUE (repeatable; see README).")
    ] = [],  # noqa: B006 - typer needs a literal default
    sanity_check: Annotated[
        bool, typer.Option("--sanity-check/--no-sanity-check", help="Model-randomisation check of the methods.")
    ] = True,
    sanity_images: Annotated[int, typer.Option(help="Images used by the sanity check.")] = 16,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    allow_outside_paths: Annotated[
        bool, typer.Option(help="Let a manifest's relative paths leave its folder (../); only for manifests you trust.")
    ] = False,
    runner: Annotated[str, typer.Option(help="Where shard tasks run: threads (one device) or dask.")] = "threads",
    precision: Annotated[
        str, typer.Option(help="auto: bf16 autocast on CUDA (maps in float32), fp32 on the CPU; or fp32.")
    ] = "auto",
    gpu_decode: Annotated[
        bool, typer.Option("--gpu-decode/--no-gpu-decode", help="On CUDA, decode JPEG files on the GPU (nvJPEG).")
    ] = True,
    dask_address: Annotated[Optional[str], typer.Option(help="An existing Dask scheduler (tcp://host:8786).")] = None,
    dask_workers: Annotated[int, typer.Option(help="LocalCluster worker processes (default 2; one per GPU).")] = 2,
    cron: Annotated[
        Optional[str], typer.Option(help="Serve on this cron schedule instead of running once (see `serve`).")
    ] = None,
    timezone: Annotated[str, typer.Option(help="Time zone of --cron, e.g. Europe/Paris.")] = "UTC",
    deployment: Annotated[str, typer.Option(help="Name of the served deployment.")] = "nightly",
) -> None:
    """Audit a model on a data source once (or, with --cron, on a schedule)."""
    from visaudit.flows.audit import AuditRequest

    try:
        request = AuditRequest(
            source=source, out_dir=str(out), arch=arch, model=model, weights=weights, layer=layer,
            classes_file=str(classes) if classes else None, run_id=run_id, device=device,
            batch_size=batch_size, shard_size=shard_size, resize=resize, crop=crop, multi_label=multi_label,
            methods=[m.strip() for m in methods.split(",") if m.strip()], thresholds=parse_thresholds(threshold),
            layer_by_layer=layer_by_layer, targets=[t.strip() for t in targets.split(",") if t.strip()],
            target_classes=target_class, occlusion_grid=occlusion_grid, occlusion_window=occlusion_window,
            occlusion_stride=occlusion_stride, occlusion_baseline=occlusion_baseline, sanity_check=sanity_check, sanity_images=sanity_images,
            rise_images=rise_images, impression_classes=impression_class, impression_max_classes=impression_max_classes,
            impression_iterations=impression_iterations, impression_tv_weight=impression_tv_weight,
            impression_seed=impression_seed, impression_options=parse_impression_options(impression_option),
            template_dir=str(templates) if templates else None, pdf=pdf, trust_checkpoint=trust_checkpoint,
            allow_outside_paths=allow_outside_paths, runner=runner, dask_address=dask_address, dask_workers=dask_workers,
            precision=precision, gpu_decode=gpu_decode,
        )
        request.model_spec()
    except ValidationError as exc:
        fail(_validation_message(exc))
    except ModelError as exc:
        fail(str(exc))
    if cron is not None:
        serve_request(request, cron, timezone, deployment)
        return
    _print_result(execute(request, quiet))


def serve_request(request: "AuditRequest", cron: str, timezone: str, name: str) -> None:  # noqa: F821
    """Check the request once (a bad source or model fails now, not at 2 a.m.), then serve it."""
    from visaudit.flows.audit import prepare_run
    from visaudit.flows.schedule import check_schedule, serve_audit

    try:
        check_schedule(cron, timezone)
        plan = prepare_run(request.model_copy(update={"run_id": f"check-{os.getpid()}-{time.time_ns()}"}))
    except USER_ERRORS as exc:
        fail(str(exc))
    import shutil

    shutil.rmtree(plan.folder, ignore_errors=True)
    typer.echo(f"serving the audit of {request.source} as deployment visaudit-audit/{name} on '{cron}' "
               f"({timezone}); Ctrl-C stops", err=True)
    serve_audit(request, cron, timezone, name)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(
    ctx: typer.Context,
    cron: Annotated[str, typer.Option(help="Cron schedule (default: every night at 02:00).")] = "0 2 * * *",
    timezone: Annotated[str, typer.Option(help="Time zone of the schedule, e.g. Europe/Paris.")] = "UTC",
    name: Annotated[str, typer.Option(help="Deployment name.")] = "nightly",
    config: Annotated[
        Optional[Path], typer.Option(help="TOML file with the audit's parameters (the run options' names).")
    ] = None,
) -> None:
    """Serve the audit on a schedule (nightly by default). Audit options as for `run`
    (SOURCE --out ... --arch ...), or from --config FILE.toml."""
    if config is not None:
        if ctx.args:
            fail(f"give the audit's parameters either in {config} or as options, not both (got {' '.join(ctx.args)})")
        serve_request(request_from_config(config), cron, timezone, name)
        return
    if not ctx.args:
        fail("serve needs the audit to run: SOURCE and the run options (see `visaudit run --help`), or --config FILE")
    command = typer.main.get_command(app)
    code = command.main(["run", *ctx.args, "--cron", cron, "--timezone", timezone, "--deployment", name],
                        prog_name="visaudit", standalone_mode=False)
    if isinstance(code, int) and code:
        raise typer.Exit(code)


def request_from_config(path: Path) -> "AuditRequest":  # noqa: F821
    """An AuditRequest from a TOML file whose keys are AuditRequest fields (e.g. source, out_dir, arch)."""
    import tomllib

    from visaudit.flows.audit import AuditRequest

    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        fail(f"{path}: {exc}")
    unknown = sorted(set(raw) - set(AuditRequest.model_fields))
    if unknown:
        fail(f"{path}: unknown keys {unknown}; known: {', '.join(sorted(AuditRequest.model_fields))}")
    try:
        return AuditRequest(**raw)
    except ValidationError as exc:
        fail(f"{path}: {_validation_message(exc)}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = DEFAULT_OUT,
    cache: Annotated[
        Path, typer.Option(help="Where the generated dataset and trained model are kept.")
    ] = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "visaudit" / "demo",
    pdf: Annotated[bool, typer.Option("--pdf/--no-pdf", help="Also render the PDF.")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Build the planted-bias demo (data + a small CNN trained on the CPU) and audit it."""
    from visaudit.flows.audit import AuditRequest
    from visaudit.tasks.demo import recipe as demo_data

    recipe = demo_data.load_recipe()
    started = time.perf_counter()
    typer.echo(f"generating the demo dataset in {cache} ...", err=True)
    data_dir = demo_data.generate_dataset(recipe, cache / "data")
    typer.echo("training the demo model on the CPU (cached after the first time) ...", err=True)
    metrics = demo_data.train_model(data_dir, recipe, cache / "model.pt", log=lambda line: typer.echo(line, err=True))
    classes_file = cache / "classes.txt"
    classes_file.write_text("\n".join(recipe.classes) + "\n")
    typer.echo(
        f"model ready: held-out accuracy {metrics['test_accuracy']:.1%} "
        f"({time.perf_counter() - started:.0f} s so far)",
        err=True,
    )
    request = AuditRequest(
        source=str(data_dir / "test.csv"), out_dir=str(out), model="visaudit.tasks.demo.recipe:build_model",
        weights=str(cache / "model.pt"), classes_file=str(classes_file), resize=recipe.image_size,
        crop=recipe.image_size, batch_size=64, shard_size=100, pdf=pdf,
        layer="features.stage3", methods=["gradcam", "counterfactual", "guided_gradcam", "impressions"], layer_by_layer=True,
    )
    _print_result(execute(request, quiet))
    typer.echo(f"demo finished in {time.perf_counter() - started:.0f} s")


@app.command()
def report(
    run_id: Annotated[str, typer.Argument(help="The run to render (a folder name under OUT/runs).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder of the run.")] = DEFAULT_OUT,
    templates: Annotated[Optional[Path], typer.Option(help="Folder with your own report.html.j2 and report.css.")] = None,
    pdf: Annotated[bool, typer.Option("--pdf/--no-pdf", help="Also render the PDF.")] = True,
) -> None:
    """Re-render a run's HTML and PDF report from its tables."""
    if not (out / "runs" / run_id / "run.json").exists():
        known = sorted(p.name for p in (out / "runs").glob("*") if (p / "run.json").exists()) if (out / "runs").exists() else []
        fail(f"{out / 'runs' / run_id}: no such completed run; known runs: {', '.join(known[-5:]) or 'none'}")
    from visaudit.tasks.report.render import render_report

    paths = render_report(out, run_id, templates, pdf=pdf)
    typer.echo(f"report: {paths.pdf or paths.html}")


@app.command()
def explain(
    image: Annotated[str, typer.Argument(help="Image file or URL.")],
    arch: Annotated[Optional[str], typer.Option(help="torchvision architecture name, e.g. resnet18.")] = None,
    model: Annotated[
        Optional[str], typer.Option(help="Model factory 'package.module:function' or 'path/to/file.py:function'.")
    ] = None,
    weights: Annotated[
        Optional[str], typer.Option(help="state_dict file, or a torchvision weights name such as IMAGENET1K_V1.")
    ] = None,
    layer: Annotated[Optional[str], typer.Option(help="Layer to explain (default: the last spatial conv stage).")] = None,
    classes: Annotated[
        Optional[Path], typer.Option(help="File with class names, one per line, in the model's output order.")
    ] = None,
    target: Annotated[
        list[str], typer.Option(help="Class to explain (repeatable; default: the predicted class).")
    ] = [],  # noqa: B006 - typer needs a literal default
    out: Annotated[Path, typer.Option("--out", "-o", help="Panel PNG to write.")] = Path("explain.png"),
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = "auto",
    resize: Annotated[Optional[int], typer.Option(help="Resize the shorter side to this (default: weights' or 256).")] = None,
    crop: Annotated[Optional[int], typer.Option(help="Centre crop size (default: weights' or 224).")] = None,
    trust_checkpoint: Annotated[
        bool, typer.Option(help="Allow weights files that are full pickles (they can run code).")
    ] = False,
) -> None:
    """Explain one image: a panel PNG with Grad-CAM, guided backprop, Guided Grad-CAM, counterfactual, top-5."""
    from visaudit.tasks.model.loading import ModelSpec, load_model
    from visaudit.tasks.explain.panel import explain_image
    from visaudit.tasks.data.sources import read_class_file

    try:
        spec = ModelSpec(arch=arch, factory=model, weights=weights, layer=layer, trust_checkpoint=trust_checkpoint)
        loaded = load_model(spec, device, crop or 224)
        if classes:
            names = read_class_file(classes)
        elif loaded.categories:
            names = loaded.categories
        else:
            names = [f"class {i}" for i in range(loaded.num_classes)]
        result = explain_image(image, loaded, names, out, target or None, resize, crop)
    except (*USER_ERRORS, OSError) as exc:
        fail(f"{image}: {exc}" if isinstance(exc, OSError) else str(exc))
    for name, value in result.top:
        typer.echo(f"{value:.3f}  {name}")
    typer.echo(f"panel: {result.path}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
