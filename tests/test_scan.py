"""``data.scan.read_whole``: a whole-table read whose vector columns come as one chunk each."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from visaudit.tasks.data import scan
from visaudit.tasks.data.scan import _Gathered, read_whole, scan_table

SCHEMA = pa.schema([pa.field("image_id", pa.string()), pa.field("thumbnail", pa.list_(pa.uint8())),
                    pa.field("probabilities", pa.list_(pa.float32())), pa.field("names", pa.list_(pa.string())),
                    pa.field("brightness", pa.float32())], metadata={"visaudit.table": "test"})


def _parts(folder: Path, parts: int, rows: int, seed: int = 0, ragged: bool = False, null_item: bool = False) -> list[Path]:
    """``parts`` files of ``rows`` rows, each a few row groups; some null lists, and lists of
    uneven length when ``ragged``, a null inside one list when ``null_item``."""
    rng = np.random.default_rng(seed)
    files = []
    for part in range(parts):
        ids = [f"p{part}-{k}" for k in range(rows)]
        thumbs = [None if rng.random() < 0.1 else rng.integers(0, 256, int(rng.integers(1, 9)) if ragged else 6).tolist()
                  for _ in range(rows)]
        probs = [rng.random(3).astype(np.float32).tolist() for _ in range(rows)]
        if null_item and part == parts - 1:
            probs[-1] = [0.5, None, 0.5]
        names = [["a", "b"][: int(rng.integers(0, 3))] for _ in range(rows)]
        table = pa.table({"image_id": ids, "thumbnail": thumbs, "probabilities": probs, "names": names,
                          "brightness": rng.random(rows).astype(np.float32)}, schema=SCHEMA)
        path = folder / f"part-{part:05d}.parquet"
        pq.write_table(table, path, row_group_size=max(1, rows // 3))
        files.append(path)
    return files


@pytest.mark.parametrize("ragged", [False, True], ids=["fixed-width", "ragged"])
def test_equals_a_plain_scan_with_one_chunk_per_vector_column(tmp_path: Path, ragged: bool) -> None:
    files = _parts(tmp_path, parts=7, rows=40, ragged=ragged)
    plain = pa.concat_tables([pq.read_table(f, schema=SCHEMA) for f in files])
    whole = read_whole(files, SCHEMA)
    assert whole.schema == SCHEMA and whole.equals(plain)
    assert whole.column("thumbnail").num_chunks == 1 and whole.column("probabilities").num_chunks == 1
    assert whole.column("thumbnail").null_count == plain.column("thumbnail").null_count > 0
    picked = read_whole(files, SCHEMA, ["probabilities", "image_id"])
    assert picked.column_names == ["probabilities", "image_id"]
    assert picked.equals(plain.select(["probabilities", "image_id"]))


def test_reads_in_file_groups_keep_file_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Groups of 3 files (7 files: 3 + 3 + 1), whole or by column, equal one plain read in file order."""
    monkeypatch.setattr(scan, "SCAN_GROUP", 3)
    files = _parts(tmp_path, parts=7, rows=12, seed=4)
    plain = pa.concat_tables([pq.read_table(f, schema=SCHEMA) for f in files])
    assert scan_table(files, SCHEMA).equals(plain) and read_whole(files, SCHEMA).equals(plain)
    assert scan_table(files, SCHEMA, ["brightness", "image_id"]).equals(plain.select(["brightness", "image_id"]))
    assert scan_table([], SCHEMA, ["image_id"]).schema.names == ["image_id"]


def test_a_null_item_or_an_offset_overflow_falls_back_to_the_plain_scan(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    files = _parts(tmp_path, parts=3, rows=20, null_item=True)  # a null item in the last file's batch
    plain = pa.concat_tables([pq.read_table(f, schema=SCHEMA) for f in files])
    kept = read_whole(files, SCHEMA)
    assert kept.equals(plain) and kept.column("probabilities").num_chunks > 1  # the whole table read plainly
    (tmp_path / "clean").mkdir()
    clean = _parts(tmp_path / "clean", parts=3, rows=20)
    monkeypatch.setattr(scan, "MAX_OFFSET", 200)  # 60 rows x 6 thumbnail bytes would overflow, 60 x 3 probabilities not
    overflowing = read_whole(clean, SCHEMA)
    assert overflowing.equals(pa.concat_tables([pq.read_table(f, schema=SCHEMA) for f in clean]))
    assert overflowing.column("thumbnail").num_chunks > 1  # that column as the scan gives it ...
    assert overflowing.column("probabilities").num_chunks == 1  # ... the other still gathered


def test_sliced_batches_with_null_lists_are_gathered_from_their_offset() -> None:
    lists = pa.array([[1, 2], None, [3], [], [4, 5, 6], None, [7]], pa.list_(pa.uint8()))
    gathered = _Gathered(lists.type, rows=6)
    for piece in (lists.slice(1, 3), lists.slice(4, 3)):  # offsets not starting at 0, null lists inside
        assert gathered.add(piece)
    assert gathered.array().equals(lists.slice(1))


def test_no_rows(tmp_path: Path) -> None:
    path = tmp_path / "part-00000.parquet"
    pq.write_table(SCHEMA.empty_table(), path)
    assert read_whole([path], SCHEMA).num_rows == 0
