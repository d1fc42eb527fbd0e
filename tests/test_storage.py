"""Tables: atomic commits, Hive partitions by run, one schema per table."""

from __future__ import annotations

import pandas as pd
import pyarrow.parquet as pq
import pytest

from visaudit.tasks.data import schema, storage


def _findings(n: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "kind": ["confident_error"] * n, "severity": ["high"] * n, "class_name": ["cat"] * n,
            "slice": [None] * n, "metric": ["m"] * n, "value": [0.5] * n, "threshold": [0.1] * n,
            "message": ["msg"] * n, "evidence": [["a", "b"]] * n, "confidence": ["normal"] * n, "cause": [None] * n,
        }
    )


def test_runs_are_invisible_until_committed_then_read_together(tmp_path) -> None:
    storage.write_part(_findings(2), "findings", tmp_path, "r1", "0")
    assert storage.read_table(tmp_path, "findings").empty, "a run in progress is invisible"
    storage.commit_run(tmp_path, "r1")
    storage.write_part(_findings(3), "findings", tmp_path, "r2", "0")
    storage.commit_run(tmp_path, "r2")
    both = pd.read_parquet(tmp_path / "tables" / "findings")
    assert sorted(both["run_id"].astype(str).unique()) == ["r1", "r2"]
    one = pd.read_parquet(tmp_path / "tables" / "findings", filters=[("run_id", "==", "r2")])
    assert len(one) == 3
    assert len(storage.read_table(tmp_path, "findings", "r1")) == 2
    # every table exists for a committed run, even with no rows
    assert storage.read_table(tmp_path, "explanations", "r1").empty
    assert (tmp_path / "tables" / "explanations" / "run_id=r1").is_dir()


def test_read_table_can_read_some_columns(tmp_path) -> None:
    storage.write_part(_findings(2), "findings", tmp_path, "r1", "0")
    storage.commit_run(tmp_path, "r1")
    some = storage.read_table(tmp_path, "findings", "r1", columns=["kind", "value"])
    assert list(some.columns) == ["kind", "value", "run_id"] and some["value"].tolist() == [0.5, 0.5]
    assert list(storage.read_table(tmp_path / "none", "findings", columns=["kind"]).columns) == ["kind", "run_id"]


def test_parts_carry_the_versioned_schema(tmp_path) -> None:
    path = storage.write_part(_findings(1), "findings", tmp_path, "r1", "0")
    written = pq.read_schema(path)
    assert written.metadata[b"visaudit.schema_version"] == schema.SCHEMA_VERSION.encode()
    assert written.field("evidence").type == schema.SCHEMAS["findings"].field("evidence").type
    assert not list(path.parent.glob(".part-*")), "no temporary files left"


def test_missing_columns_are_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="lack columns"):
        storage.write_part(_findings(1).drop(columns=["message"]), "findings", tmp_path, "r1", "0")


def test_stray_temp_file_does_not_break_readers(tmp_path) -> None:
    storage.write_part(_findings(1), "findings", tmp_path, "r1", "0")
    storage.commit_run(tmp_path, "r1")
    (tmp_path / "tables" / "findings" / "_tmp-r9").mkdir()
    (tmp_path / "tables" / "findings" / "_tmp-r9" / "part-0.parquet").write_bytes(b"truncated")
    assert len(pd.read_parquet(tmp_path / "tables" / "findings")) == 1
