"""The audit flow: plan, audit shard by shard, check, find, commit, gate, report, publish.

Read top to bottom, :func:`audit` is the story of a run; the work lives in
``visaudit.tasks.audit``. Tasks pass the plan and names, never models or tensors (Prefect
hashes task arguments); each step loads the model from the per-process cache. (No
``from __future__ import annotations`` here: Prefect builds the flow's parameter model from
its real annotations.)
"""

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from visaudit.flows.artifacts import publish
from visaudit.flows.runners import task_runner_for
from visaudit.tasks.audit import steps
from visaudit.tasks.audit.commit import commit
from visaudit.tasks.audit.gate import GateFailed, judge_run
from visaudit.tasks.audit.plan import RunPlan, prepare_run
from visaudit.tasks.audit.progress import mark_stage
from visaudit.tasks.audit.request import AuditRequest
from visaudit.tasks.report.pdf import PdfFailed, PdfProcess
from visaudit.tasks.report.render import render_report


def _task(fn: Callable[..., Any], name: str, **options: Any) -> Any:
    return task(fn, name=name, cache_policy=NO_CACHE, **options)


prepare_task = _task(prepare_run, "prepare")
shard_task = _task(steps.run_shard, "audit-shard", task_run_name="shard-{shard}")
sanity_task = _task(steps.sanity, "sanity-check")
rise_task = _task(steps.deletion_insertion, "deletion-insertion")
impressions_task = _task(steps.impressions, "class-impressions")
adversarial_task = _task(steps.adversarial, "adversarial")
find_task = _task(steps.find, "findings")
features_task = _task(steps.feature_views, "feature-views")
commit_task = _task(commit, "commit")
gate_task = _task(judge_run, "release-gate")
report_task = _task(render_report, "report")
publish_task = _task(publish, "publish")


@flow(name="visaudit-audit", task_runner=ThreadPoolTaskRunner(max_workers=1), validate_parameters=True)
def audit(request: AuditRequest) -> str:
    """Audit a model on a data source; returns the run id. The story of a run:"""
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def timed(name: str, step: Any, *args: Any) -> Any:
        if args and isinstance(args[0], RunPlan):  # the later stages, by name, for the progress bar
            mark_stage(args[0].folder, name)
        mark = time.perf_counter()
        result = step(*args)
        timings[name] = round(time.perf_counter() - mark, 3)
        return result

    # 1. Validate, index the data, load the model once, and plan the shards.
    plan: RunPlan = timed("prepare", prepare_task, request)
    # 2. Audit shard by shard: decode, one forward, predictions, maps, Parquet parts. One worker
    #    per device (concurrent shards would only fight over it); resolving every future fails
    #    the flow on any failure.
    futures = [shard_task.submit(str(plan.folder), *shard) for shard in plan.shards]
    results = timed("shards", lambda: [future.result() for future in futures])
    for stage in ("decode", "model", "rows", "rows_wait", "write"):
        timings[f"shards.{stage}"] = round(sum(r.seconds.get(stage, 0.0) for r in results), 3)
    # 3. Do the maps change when the model's weights are randomised (the sanity check)? How
    #    fast does the score fall when the most salient pixels go (deletion/insertion)? What
    #    has the model learnt for each class, from noise (class impressions)?
    timed("sanity_check", sanity_task, plan)
    timed("deletion_insertion", rise_task, plan)
    timed("class_impressions", impressions_task, plan)
    #    Does a tiny adversarial perturbation flip the prediction, and where do the maps point then?
    timed("adversarial", adversarial_task, plan)
    # 4. Findings over the staged tables, then feature views of a few of the images they show.
    timed("findings", find_task, plan)
    timed("feature_views", features_task, plan)
    # 5. Commit: the run becomes visible to readers all at once. The PDF's own process starts now:
    #    WeasyPrint loads there while the tables are committed and the HTML is written.
    timings["total_before_report"] = round(time.perf_counter() - clock, 3)
    pdf = PdfProcess() if request.report.pdf else None
    try:
        mark_stage(plan.folder, "commit")
        commit_task(plan, timings, sum(result.reused for result in results))
        # 6. The release gate (--fail-on, --policy), judged on the committed tables: its outcome goes on the cover.
        outcome = gate_task(plan.out_dir, plan.run_id, request.gate.gate_policy())
        # 7. Report from the committed tables (re-rendered later with `visaudit report`): the HTML, then its PDF
        #    twin in the child; a failed PDF loses nothing else (the flow fails at the end, saying so).
        templates = request.report.template_dir
        html = report_task(Path(plan.out_dir), plan.run_id, Path(templates) if templates else None, pdf=False).html
        pdf_failure = None
        if pdf is not None:
            pdf.submit(html, html.parent, html.with_suffix(".pdf"))
            try:
                pdf.result()
            except PdfFailed as exc:
                pdf_failure = exc
    finally:
        if pdf is not None:
            pdf.close()
    # 8. Tell Prefect: artifacts keyed by the run's series, and events (completed, new findings, drops).
    publish_task(plan.out_dir, plan.run_id, request.events.drop_margin, outcome)
    # 9. A broken release policy, or a PDF that could not be written, fails the flow run with its reason, now
    #    that everything else is written.
    if outcome is not None and not outcome.passed:
        raise GateFailed(outcome.summary)
    if pdf_failure is not None:
        raise PdfFailed(f"{html.with_suffix('.pdf')}: {pdf_failure} (the tables and {html.name} are written; "
                        f"`visaudit report {plan.run_id}` renders the PDF again)")
    return plan.run_id


def run_audit(request: AuditRequest) -> str:
    """Run the audit flow on the request's task runner; returns the run id. Dask's process
    workers need a real Prefect API: PREFECT_API_URL's, or a local server for the run."""
    from visaudit.flows.server import pin_ephemeral_port, shared_api

    if request.compute.runner == "threads":
        pin_ephemeral_port()
        return audit(request)
    import logging
    import os

    # Cluster start/stop chatter: distributed sets its loggers' levels from dask's config when it is
    # imported, in this process and in every worker process, so the config (the environment, which
    # the workers inherit) says warning; the level is set too in case it is imported already.
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    logging.getLogger("distributed").setLevel(logging.WARNING)
    with shared_api():
        return audit.with_options(task_runner=task_runner_for(request))(request)


__all__ = ["AuditRequest", "RunPlan", "audit", "prepare_run", "run_audit"]
