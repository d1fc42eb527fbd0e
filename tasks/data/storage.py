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
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from visaudit.tasks.data.files import write_atomically
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
    schema = table_schema(table)
    missing = [name for name in schema.names if name not in df.columns]
    if missing:
        raise ValueError(f"table {table!r}: rows lack columns {missing}")
    arrow = pa.Table.from_pandas(df[schema.names], schema=schema, preserve_index=False)
    folder = staging_dir(out_dir, table, run_id)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"part-{part}.parquet"
    write_atomically(final, lambda tmp: pq.write_table(arrow, tmp, compression="zstd"))
    return final


def part_exists(table: str, out_dir: Path, run_id: str, part: str) -> bool:
    """Whether a part was already written (lets a restarted run reuse finished shards)."""
    return (staging_dir(out_dir, table, run_id) / f"part-{part}.parquet").exists()


def read_staged(table: str, out_dir: Path, run_id: str) -> pd.DataFrame:
    """Read every part of a run in progress (before commit), with the table's schema."""
    folder = staging_dir(out_dir, table, run_id)
    files = sorted(folder.glob("part-*.parquet")) if folder.exists() else []
    schema = table_schema(table)
    if not files:
        return schema.empty_table().to_pandas()
    return ds.dataset(files, schema=schema, format="parquet").to_table().to_pandas()


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


def read_table(out_dir: Path, table: str, run_id: str | None = None, columns: list[str] | None = None) -> pd.DataFrame:
    """Read a table for every committed run (or one), with a string ``run_id`` column; only
    ``columns`` (and ``run_id``) when given."""
    root = Path(out_dir) / "tables" / table
    schema = table_schema(table)
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
    return dataset.to_table(columns=columns, filter=expr).to_pandas()
