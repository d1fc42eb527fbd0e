"""A shard's Parquet parts: streamed batch by batch, placed at the end, none left by a failure."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from conftest import make_shapes

from visaudit.tasks.audit import shard as shard_module
from visaudit.tasks.audit import steps
from visaudit.tasks.audit.plan import prepare_run
from visaudit.tasks.audit.request import AuditRequest
from visaudit.tasks.data import storage

TABLES = ("predictions", "explanations", "signals")


def _plan(tmp_path, tiny_model_file):
    manifest = make_shapes(tmp_path / "data", {"red": 4, "green": 3, "blue": 3})
    model, weights = tiny_model_file
    request = AuditRequest(source=str(manifest), out_dir=str(tmp_path / "out"), model=f"{model}:build",
                           weights=str(weights), resize=32, crop=32, batch_size=3, shard_size=10,
                           setup_checks=False)
    return prepare_run(request)


def test_a_shard_streams_one_part_per_table_in_row_groups(tmp_path, tiny_model_file, monkeypatch) -> None:
    monkeypatch.setattr(storage.PartWriter.__init__, "__defaults__", (4,))  # a row group once 4 rows wait
    plan = _plan(tmp_path, tiny_model_file)
    result = steps.run_shard(str(plan.folder), *plan.shards[0])
    assert (result.images, result.unreadable) == (10, 0)
    for table in TABLES:
        folder = storage.staging_dir(plan.out_dir, table, plan.run_id)
        assert [p.name for p in folder.iterdir()] == ["part-00000.parquet"], "one part, no temporary file"
    part = pq.ParquetFile(storage.staging_dir(plan.out_dir, "predictions", plan.run_id) / "part-00000.parquet")
    assert part.metadata.num_rows == 10 and part.num_row_groups == 2, "batches of 3, 3, 3, 1: row groups of 6 and 4"
    explanations = storage.read_staged("explanations", plan.out_dir, plan.run_id)
    predictions = storage.read_staged("predictions", plan.out_dir, plan.run_id)
    assert len(explanations) == int((2 - predictions["correct"].astype(int)).sum()), "predicted and true class maps"
    assert set(explanations["image_id"]) == set(predictions["image_id"])


def test_a_shard_that_fails_midway_leaves_no_part(tmp_path, tiny_model_file, monkeypatch) -> None:
    plan = _plan(tmp_path, tiny_model_file)
    calls = []
    real = shard_module.batch_rows

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("row builder failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(shard_module, "batch_rows", failing)
    monkeypatch.setattr(storage.PartWriter.__init__, "__defaults__", (1,))  # row groups on disk before the failure
    with pytest.raises(RuntimeError, match="row builder failed"):
        steps.run_shard(str(plan.folder), *plan.shards[0])
    assert len(calls) >= 3
    for table in TABLES:
        folder = storage.staging_dir(plan.out_dir, table, plan.run_id)
        assert not folder.exists() or not list(folder.iterdir()), f"{table}: nothing left behind"
    assert not storage.part_exists("predictions", plan.out_dir, plan.run_id, "00000"), "the shard is not done"


def test_a_full_disk_ends_the_shard_at_once_and_leaves_no_file(tmp_path, tiny_model_file, monkeypatch) -> None:
    import errno
    import time

    manifest = make_shapes(tmp_path / "data", {"red": 10, "green": 10, "blue": 10})
    model, weights = tiny_model_file
    plan = prepare_run(AuditRequest(source=str(manifest), out_dir=str(tmp_path / "out"), model=f"{model}:build",
                                    weights=str(weights), resize=32, crop=32, batch_size=2, shard_size=30,
                                    setup_checks=False))
    batches = []
    real_batch = shard_module._run_batch

    def slow_batch(*args, **kwargs):  # a model slower than the writer, as on a real shard
        batches.append(1)
        time.sleep(0.1)
        return real_batch(*args, **kwargs)

    def full(self, table, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shard_module, "_run_batch", slow_batch)
    monkeypatch.setattr(storage.PartWriter.__init__, "__defaults__", (1,))  # every batch's rows go to disk at once
    monkeypatch.setattr(storage.pq.ParquetWriter, "write_table", full)
    with pytest.raises(OSError, match="No space left on device"):
        steps.run_shard(str(plan.folder), *plan.shards[0])
    assert len(batches) <= 5, f"the model ran {len(batches)} of 15 batches after the disk was full"
    leftovers = [p for p in (tmp_path / "out" / "tables").rglob("*") if p.is_file()]
    assert not leftovers, leftovers
