"""A real Prefect API for what the ephemeral one cannot do: schedules, and Dask process workers."""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import Future

SERVER_START_TIMEOUT = 90.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def pin_ephemeral_port() -> int | None:
    """Give Prefect's ephemeral API server (started by the first API call when PREFECT_API_URL is
    unset) a port the kernel chose, and return it (None with a real API).

    Prefect draws the port at random from 8000-8999 and checks it is free; two audits started at
    the same moment (two nightly jobs on one cron minute) can both draw a port before either server
    binds it. The second then finds the first's server answering its health check, runs against it,
    and fails with "Connection refused" when the first run ends and stops it. A kernel-assigned port
    is never one already bound and is drawn from the whole ephemeral range."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return None  # before importing Prefect's server package (FastAPI, every route: 4-5 s of CPU here)
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the instance prefect's get_client() starts (a singleton per port key)
    if not server.running:
        server.port = _free_port()
        with _children_die_with_us():
            server.start()  # now, from this (the main) thread: see _children_die_with_us
    return server.port


EPHEMERAL_ENV = {  # what Prefect's own SubprocessASGIServer sets for its ephemeral server
    "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}


class _LocalApi:
    """The server :func:`start_ephemeral_api` started in this process: its future URL and process."""

    def __init__(self) -> None:
        self.url: Future[str | None] = Future()
        self.server: subprocess.Popen[bytes] | None = None

    def alive(self) -> bool:
        if not self.url.done():
            return True  # still booting
        return self.url.exception() is None and self.server is not None and self.server.poll() is None


_local_api: _LocalApi | None = None  # one per process, as Prefect's ephemeral server: later runs reuse it


def start_ephemeral_api() -> Future[str | None]:
    """Start a Prefect API server for this run now, in the background, and return its future URL
    (None when PREFECT_API_URL names a server already): run the flow with PREFECT_API_URL set to it.

    It is the server Prefect's ephemeral mode would start (the same uvicorn command and settings,
    on a port the kernel chose: see :func:`pin_ephemeral_port`), but started without importing
    Prefect's server package here: that import (FastAPI, SQLAlchemy, every API route) cost the run's
    own process 3-5 s of CPU on 2 cores, for a class it only used to spawn the child. Started before
    torch loads, the server boots while the run is planned and the model loaded. The daemon thread
    that starts it then waits for it, so the thread lives as long as the server, which still dies
    with this process (see :func:`_children_die_with_us`)."""
    global _local_api
    if os.environ.get("PREFECT_API_URL") or ("prefect.settings" in sys.modules and _api_url_set()):
        named: Future[str | None] = Future()  # a server is named (in this thread's settings, e.g. a test harness's)
        named.set_result(None)
        return named
    if _local_api is not None and _local_api.alive():
        return _local_api.url
    api = _local_api = _LocalApi()

    def keeper() -> None:
        try:
            if _api_url_set():  # a fresh process's settings: the environment and the active Prefect profile
                api.url.set_result(None)
                return
            port = _free_port()
            with _children_die_with_us():
                api.server = subprocess.Popen(
                    [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
                     "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"],
                    env={**os.environ, **EPHEMERAL_ENV}, stdin=subprocess.DEVNULL,
                )
            atexit.register(_stop, api.server)
            address = f"http://127.0.0.1:{port}/api"
            _wait_until_healthy(address, api.server, port)
            api.url.set_result(address)
        except BaseException as exc:  # handed to the caller of url.result()
            api.url.set_exception(exc)
            return
        api.server.wait()  # the thread (and the server's death signal) lives as long as the server

    threading.Thread(target=keeper, name="visaudit-prefect-api", daemon=True).start()
    return api.url


def _api_url_set() -> bool:
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


def _wait_until_healthy(url: str, server: subprocess.Popen[bytes], port: int) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            _stop(server)
            raise RuntimeError(f"the local Prefect server did not start on port {port}; set PREFECT_API_URL "
                               "to a running server instead")
        time.sleep(0.1)


def _stop(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


PR_SET_PDEATHSIG = 1  # linux/prctl.h


@contextlib.contextmanager
def _children_die_with_us() -> Iterator[None]:
    """Processes started meanwhile get SIGTERM when this process dies, even by SIGKILL (Linux's
    ``prctl(PR_SET_PDEATHSIG)``, set in the child between fork and exec): a killed run must
    not leave its ephemeral Prefect server running, orphaned, for minutes. Prefect starts that
    server with a plain ``subprocess.Popen``, so the child hook is added to ``Popen`` for the
    call. The signal follows the *thread* that started the child: call this from the main
    thread, or from a thread that lives as long as the process (:func:`start_ephemeral_api`).
    Elsewhere than Linux, nothing changes."""
    if not sys.platform.startswith("linux"):
        yield
        return
    import ctypes
    import functools
    import signal

    parent = os.getpid()
    libc = ctypes.CDLL(None, use_errno=True)

    def die_with_parent() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    popen = subprocess.Popen
    subprocess.Popen = functools.partial(popen, preexec_fn=die_with_parent)  # type: ignore[misc]
    try:
        yield
    finally:
        subprocess.Popen = popen  # type: ignore[misc]


@contextlib.contextmanager
def prefect_server() -> Iterator[str]:
    """The API URL of a real Prefect server: PREFECT_API_URL's, or a local one started here
    (``prefect server start`` on a free port) and stopped on exit."""
    if os.environ.get("PREFECT_API_URL"):
        yield os.environ["PREFECT_API_URL"]
        return
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    with _children_die_with_us():  # a killed run or serve must not leave it behind either
        server = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env={**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
    try:
        _wait_until_healthy(url, server, port)
        yield url
    finally:
        _stop(server)


@contextlib.contextmanager
def shared_api() -> Iterator[str]:
    """A real server's URL set for this process and for processes it starts (Dask workers)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    previous = os.environ.get("PREFECT_API_URL")
    with prefect_server() as url, temporary_settings(updates={PREFECT_API_URL: url}):
        os.environ["PREFECT_API_URL"] = url
        try:
            yield url
        finally:
            if previous is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = previous
