"""`--runner dask`: the shards on a LocalCluster of two worker processes (with a real local
Prefect server, as process workers need) give the same tables as the default runner."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest
from conftest import make_shapes, sorted_tables

pytest.importorskip("prefect_dask")


def test_dask_local_cluster_gives_the_same_tables(tmp_path, tiny_model_file) -> None:
    manifest = make_shapes(tmp_path / "data", {"red": 6, "green": 6, "blue": 6})
    model, weights = tiny_model_file
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING"}
    env.pop("PREFECT_API_URL", None)
    outputs = {}
    for runner in ("threads", "dask"):
        out = tmp_path / runner
        result = subprocess.run(
            [sys.executable, "-m", "visaudit.flows.cli", "run", str(manifest), "--out", str(out), "--model", f"{model}:build",
             "--weights", str(weights), "--crop", "48", "--resize", "48", "--shard-size", "4", "--no-pdf",
             "--no-sanity-check", "--runner", runner, "--dask-workers", "2", "-q"],
            env=env, capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        chatter = [line for line in result.stderr.splitlines() if "distributed." in line and "INFO" in line]
        assert not chatter, chatter[:5]  # the cluster's (and its workers') INFO lines stay out of -q
        outputs[runner] = sorted_tables(out, ("predictions", "explanations", "signals", "findings"))
    assert len(outputs["dask"]["predictions"]) == 18
    for table, frame in outputs["threads"].items():
        pd.testing.assert_frame_equal(outputs["dask"][table], frame, check_exact=False, rtol=1e-5, obj=table)
