"""A run killed with SIGKILL and started again reuses its finished shards and ends with the
same tables as an uninterrupted run; two runs at once on one output folder stay apart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import make_shapes, sorted_tables

from visaudit.tasks.audit.record import RunRecord
from visaudit.tasks.data.storage import read_table, staging_dir

TABLES = ("predictions", "explanations", "signals", "occlusion", "findings")


def _command(manifest: Path, model: Path, weights: Path, out: Path, run_id: str) -> list[str]:
    return [sys.executable, "-m", "visaudit.flows.cli", "run", str(manifest), "--out", str(out), "--model", f"{model}:build",
            "--weights", str(weights), "--crop", "48", "--resize", "48", "--shard-size", "8", "--batch-size", "4",
            "--methods", "gradcam,occlusion", "--occlusion-grid", "12", "--no-pdf", "--no-sanity-check",
            "--run-id", run_id, "-q"]


def _env() -> dict[str, str]:
    return {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING"}


def _failure_summary(stderr: str) -> str:
    """The lines that say why a run failed (its Prefect server's too), then the end of its stderr."""
    telling = [line for line in stderr.splitlines()
               if any(word in line for word in ("Error", "error", "Errno", "locked", "Killed", "server", "Traceback"))]
    return "\n".join(telling[-40:]) + "\n--- end of stderr ---\n" + stderr[-3000:]


@pytest.fixture()
def dataset(tmp_path, tiny_model_file):
    manifest = make_shapes(tmp_path / "data", {"red": 24, "green": 24, "blue": 24})
    return manifest, *tiny_model_file


def test_sigkill_then_rerun_equals_an_uninterrupted_run(tmp_path, dataset) -> None:
    manifest, model, weights = dataset
    killed_out, clean_out = tmp_path / "killed", tmp_path / "clean"
    run_id = "rkilled"
    process = subprocess.Popen(_command(manifest, model, weights, killed_out, run_id), env=_env(),
                               start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = staging_dir(killed_out, "predictions", run_id)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(parts.glob("part-*.parquet"))) < 2 and process.poll() is None:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished = sorted(p.name for p in parts.glob("part-*.parquet"))
    assert 2 <= len(finished) < 9, f"the kill must land mid-run (shards done: {finished})"
    assert read_table(killed_out, "predictions").empty, "nothing of a killed run is visible to readers"

    resumed = subprocess.run(_command(manifest, model, weights, killed_out, run_id), env=_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert RunRecord.load(killed_out / "runs" / run_id).resumed_shards == len(finished), \
        "finished shards are reused, not recomputed"
    uninterrupted = subprocess.run(_command(manifest, model, weights, clean_out, run_id), env=_env(),
                                   capture_output=True, text=True, timeout=300)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-2000:]
    assert RunRecord.load(clean_out / "runs" / run_id).resumed_shards == 0

    got, want = sorted_tables(killed_out, TABLES, run_id), sorted_tables(clean_out, TABLES, run_id)
    assert len(got["predictions"]) == 72 and got["predictions"]["image_id"].is_unique
    for table in TABLES:
        pd.testing.assert_frame_equal(got[table], want[table], check_exact=False, rtol=1e-5, obj=table)
    assert not list(killed_out.rglob("*.tmp")) and not list((killed_out / "tables").rglob("_tmp-*"))


def test_two_runs_at_once_on_one_output_folder(tmp_path, dataset) -> None:
    manifest, model, weights = dataset
    out = tmp_path / "shared"
    logs = {run_id: tmp_path / f"{run_id}.log" for run_id in ("rfirst", "rsecond")}
    runs = {}
    for run_id, log in logs.items():
        with log.open("w") as stderr:  # files, not pipes: a pipe nobody drains can stall a run
            runs[run_id] = subprocess.Popen(_command(manifest, model, weights, out, run_id), env=_env(),
                                            stdout=subprocess.DEVNULL, stderr=stderr)
    for run_id, process in runs.items():
        process.wait(timeout=300)
        assert process.returncode == 0, "\n".join(  # both logs: a run can fail on its sibling's server
            f"=== {name} ===\n{_failure_summary(log.read_text())}" for name, log in logs.items())
    predictions = read_table(out, "predictions")
    assert predictions.groupby("run_id").size().to_dict() == {"rfirst": 72, "rsecond": 72}
    first, second = sorted_tables(out, TABLES, "rfirst"), sorted_tables(out, TABLES, "rsecond")
    for table in TABLES:
        pd.testing.assert_frame_equal(first[table], second[table], check_exact=False, rtol=1e-5, obj=table)
    assert all((out / "runs" / run_id / "report.html").is_file() for run_id in ("rfirst", "rsecond"))


PINNED = """
from visaudit.flows.server import pin_ephemeral_port
from prefect.client.orchestration import get_client

port = pin_ephemeral_port()
with get_client(sync_client=True) as client:
    print(port, client.api_url, client.api_healthcheck())
"""


def test_the_ephemeral_api_runs_on_the_port_the_kernel_chose() -> None:
    env = {key: value for key, value in _env().items() if key != "PREFECT_API_URL"}
    done = subprocess.run([sys.executable, "-c", PINNED], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, _failure_summary(done.stderr)
    port, url, health = done.stdout.split()
    assert url == f"http://127.0.0.1:{port}/api/" and health == "None", done.stdout  # None: healthy
