"""`visaudit serve`: a real (local) Prefect server, the audit served on a cron schedule, a
triggered run that completes and lands in the tables; bad schedules fail in one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import make_shapes
from typer.testing import CliRunner

from visaudit.flows.cli import app
from visaudit.tasks.data.storage import read_table

DEPLOYMENT = "visaudit-audit/test-nightly"


def _deployment(client):
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            return client.read_deployment_by_name(DEPLOYMENT)
        except ObjectNotFound:
            time.sleep(0.5)
    raise AssertionError(f"{DEPLOYMENT} was never served")


def test_served_schedule_runs_an_audit_into_the_tables(tmp_path, tiny_model_file, monkeypatch) -> None:
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from visaudit.flows.server import prefect_server

    manifest = make_shapes(tmp_path / "data", {"red": 4, "green": 4, "blue": 4})
    model, weights = tiny_model_file
    out = tmp_path / "out"
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))  # a server of its own, fresh database
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with prefect_server() as url:
        env = {**os.environ, "PREFECT_API_URL": url, "PREFECT_RUNNER_POLL_FREQUENCY": "1",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        served = subprocess.Popen(
            [sys.executable, "-m", "visaudit.flows.cli", "serve", str(manifest), "--out", str(out), "--model", f"{model}:build",
             "--weights", str(weights), "--crop", "48", "--resize", "48", "--no-pdf", "--no-sanity-check",
             "--cron", "30 1 * * *", "--timezone", "Europe/Paris", "--name", "test-nightly"],
            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        try:
            with temporary_settings(updates={PREFECT_API_URL: url}), get_client(sync_client=True) as client:
                deployment = _deployment(client)
                assert [s.schedule.cron for s in deployment.schedules] == ["30 1 * * *"]
                assert deployment.schedules[0].schedule.timezone == "Europe/Paris"
                assert deployment.global_concurrency_limit is not None
                assert deployment.global_concurrency_limit.limit == 1
                # a key of its own: Prefect's client retries a POST that timed out, and without the key a
                # retry can create a second flow run, queued behind the first (CI once saw 2 runs, 24 rows)
                flow_run = run_deployment(DEPLOYMENT, timeout=240, idempotency_key=f"test-{os.getpid()}-{time.time_ns()}")
            assert flow_run.state is not None and flow_run.state.is_completed(), flow_run.state
        finally:
            os.killpg(served.pid, signal.SIGTERM)
            try:
                _, stderr = served.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(served.pid, signal.SIGKILL)
                _, stderr = served.communicate()
    predictions = read_table(out, "predictions")
    assert len(predictions) == 12 and predictions["run_id"].nunique() == 1, stderr[-2000:]
    assert not list((out / "runs").glob(".staging-check-*")), "the start-up check leaves nothing behind"


@pytest.mark.parametrize(("options", "message"), [
    (["--cron", "61 2 * * *"], "Invalid cron string"),
    (["--timezone", "Mars/Olympus"], "not a time zone name"),
])
def test_bad_schedule_is_one_line(tmp_path, tiny_model_file, options, message) -> None:
    manifest = make_shapes(tmp_path / "data", {"red": 2, "green": 2, "blue": 2})
    model, weights = tiny_model_file
    result = CliRunner().invoke(app, ["serve", str(manifest), "--out", str(tmp_path / "out"), "--model",
                                      f"{model}:build", "--weights", str(weights), *options])
    assert result.exit_code != 0 and message in result.output


def test_serve_from_a_config_file_rejects_unknown_keys(tmp_path) -> None:
    config = tmp_path / "audit.toml"
    config.write_text('source = "data/"\nout_dir = "out"\narchitecture = "resnet18"\n')
    result = CliRunner().invoke(app, ["serve", "--config", str(config)])
    assert result.exit_code != 0 and "unknown keys ['architecture']" in result.output
