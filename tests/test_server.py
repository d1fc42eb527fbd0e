"""A SIGKILLed run takes its ephemeral Prefect server with it (flows/server.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest
from conftest import make_shapes


def _server_of(run: psutil.Process) -> tuple[psutil.Process, int] | None:
    """The run's ephemeral server (uvicorn serving Prefect's app) and its port, once it answers."""
    for child in run.children(recursive=True):
        try:
            command = child.cmdline()
        except psutil.Error:
            continue
        if "prefect.server.api.server:create_app" in command:
            port = int(command[command.index("--port") + 1])
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=1) as answer:
                    if answer.status == 200:
                        return child, port
            except OSError:
                return None
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_sigkilled_run_takes_its_ephemeral_server_with_it(tmp_path, tiny_model_file) -> None:
    data = tmp_path / "data"
    make_shapes(data, {"red": 40, "green": 40, "blue": 40})
    model, weights = tiny_model_file
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"PREFECT_HOME": str(tmp_path / "prefect")}
    run = subprocess.Popen(
        [sys.executable, "-m", "visaudit.flows.cli", "run", str(data / "manifest.csv"), "--out", str(tmp_path / "out"),
         "--model", f"{model}:build", "--weights", str(weights), "--resize", "48", "--crop", "48", "--no-pdf", "-q",
         "--batch-size", "2", "--no-setup-checks"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    server = None
    try:
        deadline = time.monotonic() + 180
        while server is None and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
            server = _server_of(psutil.Process(run.pid))
        assert server is not None and run.poll() is None, "the run ended before its server was seen"
        os.kill(run.pid, signal.SIGKILL)
        run.wait()
        killed = time.monotonic()
        while server[0].is_running() and server[0].status() != psutil.STATUS_ZOMBIE and time.monotonic() - killed < 15:
            time.sleep(0.1)
        lived = time.monotonic() - killed
        assert lived < 10, f"the ephemeral server outlived its run by {lived:.0f} s"
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
        if server is not None and server[0].is_running():
            server[0].kill()
