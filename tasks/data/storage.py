"""Parquet tables of an audit: one versioned schema per table, atomic run commits.

Layout under the output folder::

    tables/<table>/run_id=<run_id>/part-<n>.parquet       (visible, complete runs: the parts merged)
    tables/<table>/_tmp-<run_id>/part-<shard>.parquet     (a run in progress: a part a shard)

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


MERGED_FILE_ROWS = 131_072  # rows per committed file of a table merged at commit
MERGED_GROUP_ROWS = 2_048  # rows per row group there: picking an image's rows (read_table's image_ids) decodes one group


def commit_run(out_dir: Path, run_id: str, tables: list[str] | None = None) -> None:
    """Make a run visible: rename each table's staging folder into its partition.

    A table with no staged parts gets an empty part, so every committed run has every table.
    A table of several parts (a shard's each) is merged first (:func:`merge_parts`) and the
    merged folder renamed instead; a commit stopped at any point leaves the staged parts, and
    a later commit does it again.
    """
    for table in tables or list(SCHEMAS):
        folder = staging_dir(out_dir, table, run_id)
        has_parts = folder.exists() and any(folder.glob("part-*.parquet"))
        if not has_parts:
            write_part(table_schema(table).empty_table().to_pandas(), table, out_dir, run_id, "empty")
        for leftover in folder.glob(".part-*.tmp"):
            leftover.unlink()
        merged = merge_parts(folder, table, folder.with_name(f"_merge-{run_id}"))
        target = partition_dir(out_dir, table, run_id)
        if target.exists():
            shutil.rmtree(target)
        os.replace(merged or folder, target)
        if merged is not None:
            shutil.rmtree(folder)


def merge_parts(folder: Path, table: str, merged: Path) -> Path | None:
    """The parts of ``folder`` rewritten, rows in file order, as files of ``MERGED_FILE_ROWS`` rows
    in row groups of ``MERGED_GROUP_ROWS`` in the new folder ``merged`` (replaced if it exists),
    streamed ``SCAN_GROUP`` parts at a time; None when ``folder`` holds one part (nothing to merge).

    A million-image run writes ~3,900 parts of 256 rows a table; every reader then opens each
    (~1 ms a file) and a dataset keeps each one's metadata. At 200,000 images merging took 6.2 s
    for every table and cut the report's reads (``read_inputs``) from 1.1 to 0.27 s and the files
    on disk by 20-50% (zstd on larger pages)."""
    files = sorted(folder.glob("part-*.parquet"))
    if len(files) < 2:
        return None
    schema = table_schema(table)
    if merged.exists():
        shutil.rmtree(merged)
    merged.mkdir()
    writer: pq.ParquetWriter | None = None
    written = files_done = 0
    waiting: list[pa.RecordBatch] = []

    def write(rows: pa.Table) -> None:
        nonlocal writer, written, files_done
        while rows.num_rows:
            if writer is None:
                writer = pq.ParquetWriter(merged / f"part-{files_done:05d}.parquet", schema, compression="zstd")
            now = rows.slice(0, MERGED_FILE_ROWS - written)
            writer.write_table(now, row_group_size=MERGED_GROUP_ROWS)
            written += now.num_rows
            rows = rows.slice(now.num_rows)
            if written == MERGED_FILE_ROWS:
                writer.close()
                writer, written, files_done = None, 0, files_done + 1

    try:
        for group in groups(files, schema):
            for batch in group.to_batches():
                waiting.append(batch)
                rows = sum(b.num_rows for b in waiting)
                if rows >= MERGED_GROUP_ROWS:  # whole row groups only; the rest waits for the next batches
                    ready = pa.Table.from_batches(waiting, schema)
                    cut = rows - rows % MERGED_GROUP_ROWS
                    write(ready.slice(0, cut))
                    waiting = ready.slice(cut).to_batches()
        write(pa.Table.from_batches(waiting, schema))
        if writer is None and files_done == 0:  # parts without rows: the run keeps its (empty) table
            pq.write_table(schema.empty_table(), merged / "part-00000.parquet", compression="zstd")
    finally:
        if writer is not None:
            writer.close()
    return merged


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

    With ``image_ids``, a first scan of the ``image_id`` column finds the row groups holding
    them, and only those are read: a few images' rows (their heatmaps, say) cost one small
    column of the table and a row group (``MERGED_GROUP_ROWS`` rows) an image, not every column."""
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
        dataset = _row_groups_holding(dataset, expr) if len(ids) else ds.FileSystemDataset(
            [], dataset.schema, dataset.format, dataset.filesystem)
    return to_frame(dataset.to_table(columns=columns, filter=expr), nested_as_arrow)


def _row_groups_holding(dataset: ds.FileSystemDataset, expr: ds.Expression) -> ds.FileSystemDataset:
    """The row groups of ``dataset`` with a row matching ``expr`` (in the dataset's order), found by
    a scan of ``image_id`` alone (``expr`` reads nothing else but partition fields)."""
    groups_of = [group for part in dataset.get_fragments(filter=expr) for group in part.split_by_row_group()]
    by_group = ds.FileSystemDataset(groups_of, dataset.schema, dataset.format, dataset.filesystem)
    scan = by_group.scanner(columns=["image_id"], filter=expr).scan_batches()
    holding = {(batch.fragment.path, batch.fragment.row_groups[0].id) for batch in scan if batch.record_batch.num_rows}
    kept = [group for group in groups_of if (group.path, group.row_groups[0].id) in holding]
    return ds.FileSystemDataset(kept, dataset.schema, dataset.format, dataset.filesystem)
