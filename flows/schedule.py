"""Nightly audits: serve the audit flow on a cron schedule with Prefect's ``serve``.

Schedules need a real Prefect server (the ephemeral one refuses them). With
``PREFECT_API_URL`` set, that server is used; otherwise a local one (SQLite, under
``PREFECT_HOME``) is started for as long as the schedule is served, and stopped cleanly.
Each scheduled run gets its own run id and appends its rows to the tables, so trends
accumulate; the deployment's concurrency limit of 1 keeps two nights from running at once
(a night that starts while the previous one still runs waits for it).
"""

from __future__ import annotations

from visaudit.flows.audit import AuditRequest, audit
from visaudit.flows.server import prefect_server

DEFAULT_CRON = "0 2 * * *"  # 02:00 every night


def check_schedule(cron: str, timezone: str):
    """The Prefect schedule for ``cron`` in ``timezone``; a ValueError naming the bad part otherwise."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    from prefect.schedules import Cron

    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"--timezone {timezone!r}: not a time zone name (e.g. UTC, Europe/Paris)") from None
    try:
        return Cron(cron, timezone=timezone)
    except Exception as exc:  # pydantic/croniter/zoneinfo each raise their own type
        raise ValueError(f"--cron {cron!r} --timezone {timezone!r}: {exc}".splitlines()[0]) from None


def serve_audit(request: AuditRequest, cron: str = DEFAULT_CRON, timezone: str = "UTC",
                name: str = "nightly") -> None:
    """Serve the audit of ``request`` on the schedule until interrupted (Ctrl-C / SIGTERM)."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.deployments.runner import EntrypointType
    from prefect.settings import PREFECT_API_URL, temporary_settings

    schedule = check_schedule(cron, timezone)
    parameters = {"request": request.model_copy(update={"run_id": None}).model_dump(mode="json")}
    with prefect_server() as url, temporary_settings(updates={PREFECT_API_URL: url}):
        audit.serve(
            name=name,
            schedules=[schedule],
            parameters=parameters,
            global_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
            pause_on_shutdown=False,
            entrypoint_type=EntrypointType.MODULE_PATH,
            description=f"visaudit audit of {request.source}",
        )
