"""Tables: atomic commits, Hive partitions by run, one schema per table."""

from __future__ import annotations

import pandas as pd
import pyarrow.parquet as pq
import pytest

from visaudit.tasks.data import scan, schema, storage


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


def _predictions(ids: list[str]) -> pd.DataFrame:
    n = len(ids)
    return pd.DataFrame({
        "image_id": ids, "uri": [f"/d/{i}.png" for i in ids], "labels": [["cat"]] * n, "predicted": [["dog"]] * n,
        "top_classes": [["dog", "cat"]] * n, "top_scores": [[0.6, 0.4]] * n, "confidence": [0.6] * n,
        "correct": [False] * n, "loss": [0.9] * n, "image_height": [8] * n, "image_width": [8] * n,
        "box_x0": [0.0] * n, "box_y0": [0.0] * n, "box_x1": [4.0] * n, "box_y1": [4.0] * n,
        "attributes": [[("light", "dim")]] * n, "error": [None] * n,
    })


def test_read_table_picks_rows_by_image_id_from_the_parts_holding_them(tmp_path) -> None:
    for part, ids in enumerate((["a", "b"], ["c", "d"], ["e"])):
        storage.write_part(_predictions(ids), "predictions", tmp_path, "r1", str(part))
    storage.commit_run(tmp_path, "r1")
    storage.write_part(_predictions(["a"]), "predictions", tmp_path, "r2", "0")
    storage.commit_run(tmp_path, "r2")
    full = storage.read_table(tmp_path, "predictions", "r1")
    some = storage.read_table(tmp_path, "predictions", "r1", image_ids={"e", "a", "zz"})
    assert some.equals(full[full["image_id"].isin(["a", "e"])].reset_index(drop=True)), "the full read's rows, in order"
    assert storage.read_table(tmp_path, "predictions", image_ids=["a"])["run_id"].tolist() == ["r1", "r2"]
    assert storage.read_table(tmp_path, "predictions", "r1", ["uri"], image_ids=[]).columns.tolist() == ["uri", "run_id"]
    arrow = storage.read_table(tmp_path, "predictions", "r1", ["labels"], nested_as_arrow=True)
    assert isinstance(arrow["labels"].dtype, pd.ArrowDtype) and arrow["labels"].tolist()[0] == ["cat"]
    with pytest.raises(ValueError, match="no image_id"):
        storage.read_table(tmp_path, "findings", image_ids=["a"])


def test_commit_merges_the_parts_into_files_of_whole_row_groups_rows_in_order(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(storage, "MERGED_FILE_ROWS", 6)
    monkeypatch.setattr(storage, "MERGED_GROUP_ROWS", 2)
    monkeypatch.setattr(scan, "SCAN_GROUP", 2)  # the parts streamed two at a time
    ids = [f"i{n:02d}" for n in range(13)]
    for part, start in enumerate(range(0, 13, 3)):  # five parts: 3 + 3 + 3 + 3 + 1 rows
        storage.write_part(_predictions(ids[start : start + 3]), "predictions", tmp_path, "r1", f"{part:05d}")
    staged = storage.read_staged("predictions", tmp_path, "r1")
    storage.commit_run(tmp_path, "r1")
    folder = storage.partition_dir(tmp_path, "predictions", "r1")
    files = sorted(folder.glob("*.parquet"))
    assert [pq.ParquetFile(f).metadata.num_rows for f in files] == [6, 6, 1], "files of MERGED_FILE_ROWS rows"
    assert [pq.ParquetFile(f).metadata.num_row_groups for f in files] == [3, 3, 1], "row groups of 2 rows"
    assert not list(folder.parent.glob("_*")), "no staging or merge folder left"
    full = storage.read_table(tmp_path, "predictions", "r1")
    assert full.drop(columns="run_id").equals(staged) and full["image_id"].tolist() == ids, "the same rows, in order"
    picked = storage.read_table(tmp_path, "predictions", "r1", ["image_id", "uri"], image_ids=["i12", "i03", "x"])
    assert picked["image_id"].tolist() == ["i03", "i12"] and picked["uri"].tolist() == ["/d/i03.png", "/d/i12.png"]
    assert pq.read_schema(files[0]).metadata[b"visaudit.schema_version"] == schema.SCHEMA_VERSION.encode()


def test_a_commit_stopped_after_merging_is_done_again_from_the_staged_parts(tmp_path) -> None:
    for part, ids in enumerate((["a", "b"], ["c"])):
        storage.write_part(_predictions(ids), "predictions", tmp_path, "r1", str(part))
    staged = storage.staging_dir(tmp_path, "predictions", "r1")
    stale = storage.merge_parts(staged, "predictions", staged.with_name("_merge-r1"))  # stopped here once
    (stale / "part-00009.parquet").write_bytes(b"truncated")
    storage.commit_run(tmp_path, "r1")
    assert storage.read_table(tmp_path, "predictions", "r1")["image_id"].tolist() == ["a", "b", "c"]
    assert storage.merge_parts(storage.partition_dir(tmp_path, "predictions", "r1"), "predictions",
                               tmp_path / "unused") is None, "one file: nothing to merge"
    for part in ("0", "1"):  # parts without rows keep an empty table
        storage.write_part(schema.table_schema("predictions").empty_table().to_pandas(), "predictions", tmp_path, "r2",
                           part)
    storage.commit_run(tmp_path, "r2")
    assert list(storage.partition_dir(tmp_path, "predictions", "r2").glob("*.parquet"))
    assert storage.read_table(tmp_path, "predictions", "r2").empty


def test_read_staged_can_read_some_columns(tmp_path) -> None:
    storage.write_part(_findings(2), "findings", tmp_path, "r1", "0")
    some = storage.read_staged("findings", tmp_path, "r1", columns=["value", "kind"])
    assert list(some.columns) == ["value", "kind"] and some["kind"].tolist() == ["confident_error"] * 2
    assert list(storage.read_staged("findings", tmp_path, "r9", columns=["kind"]).columns) == ["kind"]
    with pytest.raises(ValueError, match="no columns \\['heatmap'\\]"):
        storage.read_staged("findings", tmp_path, "r1", columns=["kind", "heatmap"])


def test_part_writer_streams_row_groups_into_one_part_placed_at_close(tmp_path) -> None:
    writer = storage.PartWriter("predictions", tmp_path, "r1", "00000", row_group_rows=3)
    batches = [["a", "b"], ["c", "d"], ["e"]]
    for ids in batches:
        writer.write(_predictions(ids).iloc[:, ::-1])  # any column order
    staged = storage.staging_dir(tmp_path, "predictions", "r1")
    assert not list(staged.glob("part-*.parquet")), "no part under its own name before close"
    path = writer.close()
    assert not list(staged.glob(".part-*")), "no temporary file left"
    assert pq.ParquetFile(path).num_row_groups == 2, "a row group once 3 rows waited, the rest at close"
    storage.write_part(_predictions([i for ids in batches for i in ids]), "predictions", tmp_path, "r2", "00000")
    streamed = storage.read_staged("predictions", tmp_path, "r1")
    assert streamed.equals(storage.read_staged("predictions", tmp_path, "r2")), "the same rows as one write_part"
    assert pq.read_schema(path).metadata[b"visaudit.schema_version"] == schema.SCHEMA_VERSION.encode()


def test_part_writer_with_no_rows_writes_an_empty_part_and_abort_leaves_nothing(tmp_path) -> None:
    empty = storage.PartWriter("signals", tmp_path, "r1", "00000").close()
    assert storage.read_staged("signals", tmp_path, "r1").empty and empty.exists()
    dropped = storage.PartWriter("predictions", tmp_path, "r1", "00000", row_group_rows=1)
    dropped.write(_predictions(["a"]))  # a row group on disk already
    dropped.abort()
    assert not list(storage.staging_dir(tmp_path, "predictions", "r1").glob("*")), "no part, no temporary file"
    with pytest.raises(ValueError, match="lack columns"):
        storage.PartWriter("findings", tmp_path, "r1", "0").write(_findings(1).drop(columns=["message"]))


def test_read_staged_picks_rows_by_image_id(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(scan, "SCAN_GROUP", 2)  # five parts: scans of 2 + 2 + 1 parts
    names = schema.table_schema("signals").names
    for part, ids in enumerate([["a", "b", "c"], ["d"], ["e", "f"], ["g"], ["h", "i"]]):
        rows = pd.DataFrame({name: [[0.5]] * len(ids) if name in ("probabilities", "embedding") else [0.0] * len(ids)
                             for name in names})
        rows = rows.assign(image_id=ids, thumbnail=[[1, 2]] * len(ids), embedding=[[float(ord(i))] for i in ids])
        storage.write_part(rows, "signals", tmp_path, "r1", f"{part:05d}")
    picked = storage.read_staged("signals", tmp_path, "r1", columns=["image_id", "embedding"],
                                 image_ids=["i", "c", "a", "x", "f"])
    assert picked["image_id"].tolist() == ["a", "c", "f", "i"], "table order across parts, unknown ids ignored"
    assert [cell.tolist() for cell in picked["embedding"]] == [[97.0], [99.0], [102.0], [105.0]]
    none = storage.read_staged("signals", tmp_path, "r1", columns=["embedding", "image_id"], image_ids=["x"])
    assert none.empty and none.columns.tolist() == ["embedding", "image_id"]
    with pytest.raises(ValueError, match="no image_id column"):
        storage.read_staged("metrics", tmp_path, "r1", image_ids=["a"])
