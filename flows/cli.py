"""The ``visaudit`` command line: ``run``, ``serve``, ``demo``, ``report``, ``explain``, ``compare``.

Bad input ends with a one-line ``error: ...`` naming the file and the fix (exit code 2),
never a traceback; a run that breaks its release policy (``--fail-on``, ``--policy``) ends with
the gate's one-line summary and exit code 3, its tables and report written; one whose PDF could
not be rendered ends with that one line and exit code 1, its tables and report.html written.
"""

from __future__ import annotations

import os

# Prefect reads its settings at import time: quiet by default, no analytics, patient start.
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

import logging
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, Optional

import typer
from pydantic import ValidationError

from visaudit.flows.options import (
    group_parameters,
    request_parameters,
    request_values,
    validation_message,
    with_options,
)
from visaudit.tasks.audit.request import FLAT_KEYS, AuditRequest, ModelSettings
from visaudit.tasks.model.errors import ModelError

if TYPE_CHECKING:  # --help and the option parsing import neither torch nor pandas nor Prefect: each command imports its work
    from visaudit.tasks.audit.plan import RunPlan

app = typer.Typer(
    help="Audit image classifiers: predictions, Grad-CAM, Parquet tables, and a PDF report of bias and failure modes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DEFAULT_OUT = Path("visaudit-out")
USER_ERRORS = (ValueError, FileNotFoundError)  # DataSourceError, ModelError and SetupError are ValueErrors


def fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def build_request(values: dict[str, Any]) -> AuditRequest:
    """The request from parsed options or a config's keys; a bad value ends with one line."""
    try:
        request = AuditRequest.model_validate(request_values(values))
        request.model.spec()
        if Path(request.out_dir).exists() and not Path(request.out_dir).is_dir():
            raise ValueError(f"{request.out_dir}: --out must be a folder, and this is a file; name a folder "
                             "(it is created if missing)")
    except ValidationError as exc:
        fail(validation_message(exc))
    except (ModelError, ValueError) as exc:
        fail(str(exc))
    return request


def execute(request: AuditRequest, quiet: bool = False) -> Path:
    """Validate and plan (clean errors), then run the flow with a progress bar; returns the run folder.
    Prefect's ephemeral server boots while the run is planned (with the default thread runner and
    no PREFECT_API_URL); a bad request still ends at once with its one line."""
    from visaudit.flows.server import start_ephemeral_api

    api = start_ephemeral_api() if request.compute.runner == "threads" else None  # before torch and pandas load
    from visaudit.tasks.audit.gate import GATE_EXIT_CODE, GateFailed
    from visaudit.tasks.audit.plan import prepare_run
    from visaudit.tasks.report.pdf import PdfFailed

    try:
        plan = prepare_run(request)
    except USER_ERRORS as exc:
        fail(str(exc))
    except Exception as exc:  # the model's own failure while the run is planned (the setup checks run it)
        fail(f"the run could not be prepared: {type(exc).__name__}: {exc}")
    from visaudit.flows.audit import run_audit

    request = request.model_copy(update={"run_id": plan.run_id})
    typer.echo(
        f"auditing {plan.images} images of {len(plan.classes)} classes from {request.source} "
        f"(run {plan.run_id}, {'layer ' + ', '.join(plan.layers) if plan.layers else plan.layer_reason})",
        err=True,
    )
    _quiet_run_failures()
    stop = threading.Event()
    watcher = None if quiet else threading.Thread(target=_progress, args=(plan, stop), daemon=True)
    if watcher:
        watcher.start()
    gate_failure = pdf_failure = None
    try:
        url = api.result() if api is not None else None  # up (or its failure is the audit's, as Prefect's own would be)
        if url is None:
            run_audit(request)
        else:
            from prefect.settings import PREFECT_API_URL, temporary_settings

            with temporary_settings(updates={PREFECT_API_URL: url}):
                run_audit(request)
    except GateFailed as exc:
        gate_failure = str(exc)
    except PdfFailed as exc:
        pdf_failure = str(exc)
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
    run_dir = Path(plan.out_dir) / "runs" / plan.run_id
    if gate_failure is not None:
        _print_result(run_dir)
        typer.echo(gate_failure, err=True)
        raise typer.Exit(GATE_EXIT_CODE)
    if pdf_failure is not None:
        _print_result(run_dir)
        typer.echo(f"error: the PDF could not be rendered: {pdf_failure}", err=True)
        raise typer.Exit(1)
    return run_dir


class _NoRunFailures(logging.Filter):
    """Drops Prefect's failure records of task and flow runs (their message and traceback):
    the command line ends with its own one-line error for the same failure."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


def _quiet_run_failures() -> None:
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoRunFailures) for f in logger.filters):
            logger.addFilter(_NoRunFailures())


def _progress(plan: RunPlan, stop: threading.Event) -> None:
    """Count images as the shards finish their batches, then name each later stage
    (``visaudit.tasks.audit.progress``)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from visaudit.tasks.audit.progress import ProgressReader

    run_dir = Path(plan.out_dir) / "runs" / plan.run_id
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True,
        console=None,
    ) as bar:
        job = bar.add_task("images", total=plan.images)
        reader = ProgressReader(plan.folder, run_dir, plan.images, {s.name: s.stop - s.start for s in plan.shards})
        while not stop.wait(0.25):
            now = reader.read()
            bar.update(job, completed=now.images, description=now.label)


def _print_result(run_dir: Path) -> None:
    from visaudit.tasks.audit.gate import GateOutcome
    from visaudit.tasks.audit.record import RunRecord

    metrics = RunRecord.load(run_dir).metrics
    if metrics is not None:
        typer.echo(
            f"audited {metrics.audited} of {metrics.images} images ({metrics.unreadable} unreadable)"
            + (f", accuracy {metrics.accuracy:.1%}" if metrics.accuracy is not None else "")
        )
    for name in ("report.pdf", "report.html"):
        if (run_dir / name).exists():
            typer.echo(f"report: {run_dir / name}")
    typer.echo(f"tables: {run_dir.parent.parent / 'tables'}")
    outcome = GateOutcome.load(run_dir)
    if outcome is not None and outcome.passed:
        typer.echo(outcome.summary)


@app.command()
@with_options(request_parameters())
def run(
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    cron: Annotated[
        Optional[str], typer.Option(help="Serve on this cron schedule instead of running once (see `serve`).")
    ] = None,
    timezone: Annotated[str, typer.Option(help="Time zone of --cron, e.g. Europe/Paris.")] = "UTC",
    deployment: Annotated[str, typer.Option(help="Name of the served deployment.")] = "nightly",
    **options: Any,
) -> None:
    """Audit a model on a data source once (or, with --cron, on a schedule)."""
    request = build_request(options)
    if cron is not None:
        serve_request(request, cron, timezone, deployment)
        return
    _print_result(execute(request, quiet))


def serve_request(request: AuditRequest, cron: str, timezone: str, name: str) -> None:
    """Check the request once (a bad source or model fails now, not at 2 a.m.), then serve it."""
    from visaudit.flows.schedule import check_schedule, serve_audit
    from visaudit.tasks.audit.plan import prepare_run

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


@app.command()
@with_options(request_parameters(source_required=False))
def serve(
    ctx: typer.Context,
    cron: Annotated[str, typer.Option(help="Cron schedule (default: every night at 02:00).")] = "0 2 * * *",
    timezone: Annotated[str, typer.Option(help="Time zone of the schedule, e.g. Europe/Paris.")] = "UTC",
    name: Annotated[str, typer.Option(help="Deployment name.")] = "nightly",
    config: Annotated[
        Optional[Path], typer.Option(help="TOML file with the audit's parameters (the run options' names).")
    ] = None,
    **options: Any,
) -> None:
    """Serve the audit on a schedule (nightly by default): SOURCE and the run options, as for
    `run`, or --config FILE.toml."""
    given = [key for key in options if getattr(ctx.get_parameter_source(key), "name", "") == "COMMANDLINE"]
    if config is not None:
        if given:
            flags = ", ".join("SOURCE" if key == "source" else "--" + key.replace("_", "-") for key in given)
            fail(f"give the audit's parameters either in {config} or as options, not both (got {flags})")
        serve_request(request_from_config(config), cron, timezone, name)
        return
    if options["source"] is None:
        fail("serve needs the audit to run: SOURCE and the run options (see `visaudit serve --help`), "
             "or --config FILE")
    serve_request(build_request(options), cron, timezone, name)


def request_from_config(path: Path) -> AuditRequest:
    """An AuditRequest from a TOML file whose keys are the run options' names (``source``, ``out``,
    ``arch``, ``classes``, ``methods = "gradcam,occlusion"`` ...) or the request's own fields, flat
    or in their groups' tables (``[model]``, ``[compute]`` ...)."""
    import tomllib

    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        fail(f"{path}: {exc}")
    try:
        return AuditRequest.model_validate(raw)
    except ValidationError as exc:
        unknown = [".".join(map(str, e["loc"])) for e in exc.errors() if e["type"] == "extra_forbidden"]
        if unknown:
            known = sorted({"source", "out", "run_id", "threshold", *FLAT_KEYS})
            fail(f"{path}: unknown keys {unknown}; known: {', '.join(known)}")
        fail(f"{path}: {validation_message(exc)}")


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
    from visaudit.flows.demo import demo_request, prepare_demo

    started = time.perf_counter()
    prepared = prepare_demo(cache, log=lambda line: typer.echo(line, err=True))
    typer.echo(f"model ready: held-out accuracy {prepared.test_accuracy:.1%} "
               f"({time.perf_counter() - started:.0f} s so far)", err=True)
    _print_result(execute(demo_request(prepared, out, pdf), quiet))
    typer.echo(f"demo finished in {time.perf_counter() - started:.0f} s")


@app.command()
def report(
    run_id: Annotated[str, typer.Argument(help="The run to render (a folder name under OUT/runs).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder of the run.")] = DEFAULT_OUT,
    templates: Annotated[Optional[Path], typer.Option(help="Folder with your own report.html.j2 and report.css.")] = None,
    pdf: Annotated[bool, typer.Option("--pdf/--no-pdf", help="Also render the PDF.")] = True,
) -> None:
    """Re-render a run's HTML and PDF report from its tables."""
    require_run(out, run_id)
    from visaudit.tasks.report.render import render_report

    paths = render_report(out, run_id, templates, pdf=pdf)
    typer.echo(f"report: {paths.pdf or paths.html}")


def require_run(out: Path, run_id: str) -> None:
    """Stop with one line when ``run_id`` is not a completed run of ``out``."""
    if not (out / "runs" / run_id / "run.json").exists():
        known = sorted(p.name for p in (out / "runs").glob("*") if (p / "run.json").exists()) if (out / "runs").exists() else []
        fail(f"{out / 'runs' / run_id}: no such completed run; known runs: {', '.join(known[-5:]) or 'none'}")


@app.command()
def compare(
    run_a: Annotated[str, typer.Argument(help="The earlier run (or the reference model's).")],
    run_b: Annotated[str, typer.Argument(help="The run compared with it (the change is B minus A).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder of the runs.")] = DEFAULT_OUT,
    templates: Annotated[Optional[Path], typer.Option(help="Folder with your own compare.html.j2 and report.css.")] = None,
    pdf: Annotated[bool, typer.Option("--pdf/--no-pdf", help="Also render the PDF.")] = True,
) -> None:
    """Compare two runs on the same data: flipped predictions, per-class accuracy change (McNemar),
    findings appeared/resolved, how far the explanations moved. Writes OUT/comparisons/A_vs_B/ and
    tables/comparisons."""
    for run_id in (run_a, run_b):
        require_run(out, run_id)
    from visaudit.tasks.report.compare import render_comparison

    try:
        comparison, paths = render_comparison(out, run_a, run_b, templates, pdf=pdf)
    except ValueError as exc:
        fail(str(exc))
    c = comparison.overall
    typer.echo(f"{comparison.shared} paired images: accuracy {c.accuracy_a:.1%} -> {c.accuracy_b:.1%} "
               f"({c.change * 100:+.1f} pp, 95% interval {c.low * 100:+.1f} to {c.high * 100:+.1f} pp, "
               f"McNemar p = {c.p_value:.3g}); {c.fixed} fixed, {c.broken} broken")
    typer.echo(f"report: {paths.pdf or paths.html}")
    typer.echo(f"table: {out / 'tables' / 'comparisons'} (run_id = {comparison.comparison_id})")


@app.command()
@with_options(group_parameters(ModelSettings))
def explain(
    image: Annotated[str, typer.Argument(help="Image file or URL.")],
    target: Annotated[
        list[str], typer.Option(help="Class to explain (repeatable; default: the predicted class).")
    ] = [],  # noqa: B006 - typer needs a literal default
    out: Annotated[Path, typer.Option("--out", "-o", help="Panel PNG to write.")] = Path("explain.png"),
    **options: Any,
) -> None:
    """Explain one image: a panel PNG with Grad-CAM, guided backprop, Guided Grad-CAM, counterfactual, top-5."""
    from visaudit.tasks.data.sources import read_class_file
    from visaudit.tasks.explain.panel import explain_image
    from visaudit.tasks.model.loading import load_model

    try:
        settings = ModelSettings.model_validate(options)
    except ValidationError as exc:
        fail(validation_message(exc, ModelSettings))
    try:
        loaded = load_model(settings.spec(), settings.device, settings.input_size)
        if settings.classes_file:
            names = read_class_file(Path(settings.classes_file))
        elif loaded.categories:
            names = loaded.categories
        else:
            names = [f"class {i}" for i in range(loaded.num_classes)]
        result = explain_image(image, loaded, names, out, target or None, settings.resize, settings.crop,
                               multi_label=bool(settings.multi_label))
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
