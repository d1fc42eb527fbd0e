"""Nightly audits: serve the audit flow on a cron schedule with Prefect's ``serve``.

Schedules need a real Prefect server (the ephemeral one refuses them). With
``PREFECT_API_URL`` set, that server is used; otherwise a local one (SQLite, under
``PREFECT_HOME``) is started for as long as the schedule is served, and stopped cleanly.
Each scheduled run gets its own run id and appends its rows to the tables, so trends
accumulate; the deployment's concurrency limit of 1 keeps two nights from running at once
(a night that starts while the previous one still runs waits for it).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

from flows.audit import AuditRequest, audit

DEFAULT_CRON = "0 2 * * *"  # 02:00 every night
SERVER_START_TIMEOUT = 90.0


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


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def prefect_server() -> Iterator[str]:
    """The API URL of a real Prefect server: PREFECT_API_URL's, or a local one started here
    (``prefect server start`` on a free port) and stopped on exit."""
    if os.environ.get("PREFECT_API_URL"):
        yield os.environ["PREFECT_API_URL"]
        return
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env={**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the local Prefect server did not start on port {port}; set PREFECT_API_URL "
                                   "to a running server instead")
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


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
