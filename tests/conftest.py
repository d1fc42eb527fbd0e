"""Shared fixtures: real photos from scikit-image, small random-weight models."""

from __future__ import annotations

import contextlib
import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import numpy as np
import pytest
import torch
from PIL import Image

from visaudit.tasks.data.batches import normalise
from visaudit.tasks.data.images import Preprocess, fit


def sample_photos() -> list[Image.Image]:
    """Real RGB photos bundled with scikit-image (no network)."""
    from skimage import data

    return [Image.fromarray(getattr(data, name)()) for name in ("astronaut", "chelsea", "coffee", "rocket")]


@pytest.fixture(scope="session")
def photo_batch() -> torch.Tensor:
    """The photos preprocessed like ImageNet models expect: (4, 3, 224, 224) float."""
    pre = Preprocess()
    crops = [np.asarray(fit(image, pre)[0]) for image in sample_photos()]
    batch = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()
    return normalise(batch, pre)


@pytest.fixture(scope="session")
def resnet18() -> torch.nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220)}


def make_shapes(root, counts: dict[str, int], size: int = 48, seed: int = 0):
    """A tiny class-per-folder dataset (a coloured square per image) and its manifest.

    Returns the manifest path; boxes are the squares, ``background`` an attribute column.
    """
    import pandas as pd

    rng = np.random.default_rng(seed)
    rows = []
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            background = "dark" if i % 2 else "light"
            image = np.full((size, size, 3), 30 if background == "dark" else 200, dtype=np.uint8)
            side = int(rng.integers(size // 4, size // 2))
            x0, y0 = (int(v) for v in rng.integers(0, size - side, 2))
            image[y0 : y0 + side, x0 : x0 + side] = COLOURS.get(name, (128, 128, 128))
            path = root / name / f"{i:03d}.png"
            Image.fromarray(image).save(path)
            rows.append(dict(path=f"{name}/{i:03d}.png", label=name, x0=x0, y0=y0, x1=x0 + side, y1=y0 + side,
                             background=background))
    manifest = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


TINY_MODEL = '''
import torch
from torch import nn


def build(num_classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes),
    )
'''


@pytest.fixture()
def tiny_model_file(tmp_path):
    """A model factory file (``path/to/file.py:build``) and weights for it."""
    path = tmp_path / "tiny_model.py"
    path.write_text(TINY_MODEL)
    namespace: dict = {}
    exec(TINY_MODEL, namespace)
    weights = tmp_path / "tiny.pt"
    torch.save(namespace["build"](3).state_dict(), weights)
    return path, weights


def sorted_tables(out, tables, run_id=None) -> dict:
    """Tables of a run (or every run) without ``run_id``, rows in a stable order: for comparing
    two runs' outputs with ``pd.testing.assert_frame_equal``."""
    from visaudit.tasks.data.storage import read_table

    frames = {}
    for table in tables:
        frame = read_table(out, table, run_id).drop(columns="run_id")
        keys = [c for c in ("image_id", "target", "method", "layer", "kind", "class_name", "slice") if c in frame]
        frames[table] = frame.sort_values(keys, kind="stable").reset_index(drop=True) if len(frame) else frame
    return frames


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """One Prefect API server (its own SQLite database) for the test modules that only need flows to run:
    each `prefect_test_harness` boots a server and migrates a fresh database (~25 s on 2 cores). Modules
    that read the server's runs, artifacts or events back keep a harness of their own."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL, temporary_settings

    database = tmp_path_factory.mktemp("prefect") / "prefect.db"
    with temporary_settings(updates={PREFECT_SERVER_DATABASE_CONNECTION_URL: f"sqlite+aiosqlite:///{database}"}):
        server = SubprocessASGIServer(port=_free_port())  # the child takes the database from these settings
        server.start(timeout=120)
    try:
        yield server.api_url
    finally:
        server.stop()


@contextlib.contextmanager
def using_prefect_api(url: str):
    """Flows run against ``url`` within the block (as `prefect_test_harness` sets it up, this thread's and
    the process-global settings), and Prefect's log and event workers are drained at its end."""
    import inspect

    import prefect.context
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def drain() -> None:
        try:
            result = APILogWorker.instance().drain()
            if inspect.isawaitable(result):
                await result
        except RuntimeError:  # never started
            pass
        result = EventsWorker.drain_all()
        if inspect.isawaitable(result):
            await result

    with temporary_settings(updates={PREFECT_API_URL: url}), \
            prefect.context._temporary_global_settings_context(prefect.context.get_settings_context()):
        try:
            yield
        finally:
            run_coro_as_sync(drain())


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
