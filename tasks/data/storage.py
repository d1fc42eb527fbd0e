"""Parquet tables of an audit: one versioned schema per table, atomic run commits.

Layout under the output folder::

    tables/<table>/run_id=<run_id>/part-<shard>.parquet   (visible, complete runs)
    tables/<table>/_tmp-<run_id>/part-<shard>.parquet     (a run in progress)

Readers (pyarrow, pandas) skip folders starting with ``_``, so a run in progress or one
that died is invisible; a run becomes visible when its staging folder is renamed into
place. A part is itself written under a temporary name and renamed, so a killed writer
never leaves a truncated file with a normal name.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from visaudit.tasks.data.cells import to_frame
from visaudit.tasks.data.scan import groups, read_whole, scan_table
from visaudit.tasks.data.schema import SCHEMAS, table_schema

PARTITIONING = ds.partitioning(pa.schema([pa.field("run_id", pa.string())]), flavor="hive")


def staging_dir(out_dir: Path, table: str, run_id: str) -> Path:
    """Folder where ``run_id`` writes the parts of ``table`` before the run is committed."""
    return Path(out_dir) / "tables" / table / f"_tmp-{run_id}"


def partition_dir(out_dir: Path, table: str, run_id: str) -> Path:
    """Folder of a committed run of ``table``."""
    return Path(out_dir) / "tables" / table / f"run_id={run_id}"


def write_part(df: pd.DataFrame, table: str, out_dir: Path, run_id: str, part: str) -> Path:
    """Write one part of a table for a run in progress; atomic (temp name, then rename)."""
    writer = PartWriter(table, out_dir, run_id, part)
    try:
        writer.write(df)
        return writer.close()
    except BaseException:
        writer.abort()
        raise


class PartWriter:
    """One part of a run-in-progress table written as its rows come, for a shard whose batches
    finish one by one: whenever ``row_group_rows`` rows are waiting they go to disk as a Parquet
    row group (converted to Arrow in one go: per-batch conversions cost twice as much), so that
    on a writer thread the work overlaps the model's; :meth:`close` writes the rest and renames
    the file into place. Until then the part is a hidden temporary file: a killed writer leaves
    no part, as with :func:`write_part`, and :meth:`abort` removes it. One thread at a time."""

    def __init__(self, table: str, out_dir: Path, run_id: str, part: str, row_group_rows: int = 1024) -> None:
        self.table = table
        self.schema = table_schema(table)
        self.final = staging_dir(out_dir, table, run_id) / f"part-{part}.parquet"
        self.row_group_rows = row_group_rows
        self._tmp = self.final.with_name(f".{self.final.name}.{uuid.uuid4().hex}.tmp")
        self._waiting: list[pd.DataFrame] = []
        self._rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._failed: BaseException | None = None  # a failed row group fails every later call (disk full)

    def write(self, df: pd.DataFrame) -> None:
        """Add rows (the table's columns, any order; more are ignored)."""
        if self._failed is not None:
            raise self._failed
        missing = [name for name in self.schema.names if name not in df.columns]
        if missing:
            raise ValueError(f"table {self.table!r}: rows lack columns {missing}")
        self._waiting.append(df[self.schema.names])
        self._rows += len(df)
        if self._rows >= self.row_group_rows:
            self._flush()

    def _flush(self) -> None:
        if not self._waiting:
            return
        try:
            frame = self._waiting[0] if len(self._waiting) == 1 else pd.concat(self._waiting, ignore_index=True)
            rows = pa.Table.from_pandas(frame, schema=self.schema, preserve_index=False)
            if self._writer is None:
                self._tmp.parent.mkdir(parents=True, exist_ok=True)
                self._writer = pq.ParquetWriter(self._tmp, rows.schema, compression="zstd")
            self._writer.write_table(rows)
        except BaseException as exc:
            self._failed = exc
            raise
        self._waiting, self._rows = [], 0

    def close(self) -> Path:
        """Write what is waiting (an empty table when nothing was written) and rename the part into place."""
        if self._writer is None and not self._waiting:
            self._waiting.append(self.schema.empty_table().to_pandas())
        try:
            self._flush()
            assert self._writer is not None
            self._writer.close()
            os.replace(self._tmp, self.final)
        finally:
            self._tmp.unlink(missing_ok=True)
        return self.final

    def abort(self) -> None:
        """Drop the part: nothing of it stays on disk (a writer that cannot close, on a full disk, is
        dropped all the same)."""
        try:
            if self._writer is not None:
                self._writer.close()
        except Exception:
            pass
        finally:
            self._writer = None
            self._tmp.unlink(missing_ok=True)


def part_exists(table: str, out_dir: Path, run_id: str, part: str) -> bool:
    """Whether a part was already written (lets a restarted run reuse finished shards)."""
    return (staging_dir(out_dir, table, run_id) / f"part-{part}.parquet").exists()


def read_staged(table: str, out_dir: Path, run_id: str, columns: list[str] | None = None,
                nested_as_arrow: bool = False, image_ids: Iterable[str] | None = None) -> pd.DataFrame:
    """Read every part of a run in progress (before commit), with the table's schema; only
    ``columns`` (in that order) when given; only the rows of ``image_ids`` when given (in
    table order; only the row groups holding them are decoded, so a few images' rows never
    hold the whole column); list and map columns as :func:`read_table` gives them (``cells.to_frame``)."""
    folder = staging_dir(out_dir, table, run_id)
    files = sorted(folder.glob("part-*.parquet")) if folder.exists() else []
    schema = table_schema(table)
    if columns is not None and (unknown := [name for name in columns if name not in schema.names]):
        raise ValueError(f"table {table!r} has no columns {unknown}; its columns: {', '.join(schema.names)}")
    if image_ids is not None and "image_id" not in schema.names:
        raise ValueError(f"table {table!r} has no image_id column to pick rows by")
    if not files:
        empty = schema.empty_table().to_pandas()
        return empty if columns is None else empty[columns]
    if image_ids is None and nested_as_arrow:  # vector columns gathered into one chunk as they are read
        return to_frame(read_whole(files, schema, columns), nested_as_arrow)
    if image_ids is None:
        return to_frame(scan_table(files, schema, columns), nested_as_arrow)
    return to_frame(_rows_of(files, schema, columns, pa.array(sorted(set(image_ids)), pa.string())), nested_as_arrow)


def _rows_of(files: list[Path], schema: pa.Schema, columns: list[str] | None, ids: pa.Array) -> pa.Table:
    """The rows of ``ids`` in ``files`` (in file order): a filtered scan of ``SCAN_GROUP`` files
    at a time (``scan.groups``). Reading part by part (``ParquetFile.read_row_group``, the wide
    columns only where a row group held one of ``ids``) cost 27 ms a part and held memory it had
    freed: 150,000 of a million images' embeddings (77 MB of Arrow data) took 128 s and 9.9 GB
    more at its peak, against 4.4 s and 183 MB here (200 images: 3.1 s, 32 MB)."""
    names = schema.names if columns is None else list(columns)
    target = pa.schema([schema.field(name) for name in names])
    wanted = ds.field("image_id").isin(ids)
    kept = [group.to_table(columns=names, filter=wanted) for group in groups(files, schema)]
    return pa.concat_tables(kept).cast(target) if kept else target.empty_table()


def commit_run(out_dir: Path, run_id: str, tables: list[str] | None = None) -> None:
    """Make a run visible: rename each table's staging folder into its partition.

    A table with no staged parts gets an empty part, so every committed run has every table.
    """
    for table in tables or list(SCHEMAS):
        folder = staging_dir(out_dir, table, run_id)
        has_parts = folder.exists() and any(folder.glob("part-*.parquet"))
        if not has_parts:
            write_part(table_schema(table).empty_table().to_pandas(), table, out_dir, run_id, "empty")
        for leftover in folder.glob(".part-*.tmp"):
            leftover.unlink()
        target = partition_dir(out_dir, table, run_id)
        if target.exists():
            shutil.rmtree(target)
        os.replace(folder, target)


def read_table(
    out_dir: Path,
    table: str,
    run_id: str | None = None,
    columns: list[str] | None = None,
    image_ids: Iterable[str] | None = None,
    nested_as_arrow: bool = False,
) -> pd.DataFrame:
    """Read a table for every committed run (or one), with a string ``run_id`` column; only
    ``columns`` (and ``run_id``) when given; only the rows of ``image_ids`` when given (rows in
    table order, as a full read has them). List and map columns hold a numpy array (a list of
    pairs) per cell, equal cells one shared read-only object (``cells.to_frame``), or with
    ``nested_as_arrow`` their Arrow data (``pd.ArrowDtype``: no Python object per cell, for
    whole-column work on many rows).

    With ``image_ids``, a first scan of the ``image_id`` column finds the part files holding
    them, and only those are read whole: a few images' rows (their heatmaps, say) cost one
    small column of every part, not every column."""
    root = Path(out_dir) / "tables" / table
    schema = table_schema(table)
    if image_ids is not None and "image_id" not in schema.names:
        raise ValueError(f"table {table!r} has no image_id column to pick rows by")
    if columns is not None:
        columns = [*columns, "run_id"]
    if not root.exists():
        empty = schema.append(pa.field("run_id", pa.string())).empty_table().to_pandas()
        return empty if columns is None else empty[columns]
    dataset = ds.dataset(
        root,
        schema=schema.append(pa.field("run_id", pa.string())),
        format="parquet",
        partitioning=PARTITIONING,
    )
    expr = ds.field("run_id") == run_id if run_id is not None else None
    if image_ids is not None:
        ids = pa.array(sorted(set(image_ids)), pa.string())
        expr = ds.field("image_id").isin(ids) if expr is None else expr & ds.field("image_id").isin(ids)
        holding = _parts_holding(dataset, expr) if len(ids) else set()
        parts = [part for part in dataset.get_fragments() if part.path in holding]  # in the dataset's order
        dataset = ds.FileSystemDataset(parts, dataset.schema, dataset.format, dataset.filesystem)
    return to_frame(dataset.to_table(columns=columns, filter=expr), nested_as_arrow)


def _parts_holding(dataset: ds.FileSystemDataset, expr: ds.Expression) -> set[str]:
    """The paths of the part files with a row matching ``expr``, from a scan of ``image_id``
    alone (``expr`` reads nothing else but partition fields)."""
    scan = dataset.scanner(columns=["image_id"], filter=expr).scan_batches()
    return {batch.fragment.path for batch in scan if batch.record_batch.num_rows}
