"""Data sources: a class-per-folder directory or a CSV/Parquet manifest, turned into an index.

The index has one row per image: ``image_id``, ``uri``, ``labels`` (list of class names),
``box_x0..box_y1`` (pixels of the original image, NaN when unknown) and ``attributes``
(dict of the manifest's other columns, as strings). Everything downstream reads the index.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from visaudit.tasks.data.reads import (
    LOCAL_SCHEMES,
    Limits,
    ReadPolicy,
    file_uri,
    inside,
    is_remote,
    local_path,
    origin_of,
    read_bytes,
    scheme_of,
)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
BOX_COLUMNS = ("x0", "y0", "x1", "y1")
MANIFEST_SUFFIXES = {".csv", ".parquet", ".pq"}
MANIFEST_CHUNK = 65_536  # manifest rows turned into index rows per step
INDEX_COLUMNS = ["image_id", "uri", "labels", "box_x0", "box_y0", "box_x1", "box_y1", "attributes"]


INDEX_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string()),
        pa.field("uri", pa.string()),
        pa.field("labels", pa.list_(pa.string())),
        *(pa.field(f"box_{c}", pa.float64()) for c in BOX_COLUMNS),
        pa.field("attributes", pa.map_(pa.string(), pa.string())),
    ]
)


class DataSourceError(ValueError):
    """The data source cannot be used; the message names the file and the fix."""


OPT_IN = "pass --allow-outside-paths if you trust this manifest"


def read_policy(source: str | Path, allow_outside: bool = False, limits: Limits = Limits()) -> ReadPolicy:
    """Where a run over ``source`` may read (the rule in :mod:`visaudit.tasks.data.reads`).

    A folder: files under it, nothing remote. A local manifest: files under its folder, any
    URL. A remote manifest: images of its own origin, no local file. ``allow_outside`` lifts
    both confinements (the byte and time limits stay).
    """
    uri = _source_uri(source)
    if is_remote(uri):
        return ReadPolicy(None if allow_outside else (), None if allow_outside else (origin_of(uri),), limits)
    path = os.path.realpath(local_path(uri))
    if os.path.isdir(path):
        return ReadPolicy((path,), (), limits)
    return ReadPolicy(None if allow_outside else (os.path.dirname(path),), None, limits)


def build_index(source: str | Path, allow_outside: bool = False, limits: Limits = Limits()) -> pd.DataFrame:
    """Index a data source: a class-per-folder directory or a ``.csv``/``.parquet`` manifest.

    ``allow_outside``: let a manifest name files outside its folder (``../``, absolute paths),
    local files from a remote manifest, or images of another origin.
    """
    source_str = _source_uri(source)
    policy = read_policy(source_str, allow_outside, limits)
    if is_remote(source_str):
        if Path(source_str.split("?")[0]).suffix.lower() not in MANIFEST_SUFFIXES:
            raise DataSourceError(f"{source_str}: a remote data source must be a .csv or .parquet manifest")
        return index_manifest(source_str, policy)
    path = Path(local_path(source_str)).expanduser()
    if not path.exists():
        raise DataSourceError(
            f"{path}: data source not found; pass a class-per-folder directory or a .csv/.parquet manifest"
        )
    if path.is_dir():
        return index_folder(path)
    if path.suffix.lower() in MANIFEST_SUFFIXES:
        return index_manifest(str(path), policy)
    raise DataSourceError(
        f"{path}: not a folder nor a manifest; pass a class-per-folder directory or a .csv/.parquet manifest"
    )


def _source_uri(source: str | Path) -> str:
    """The source as text, its scheme checked (an unsupported one is a DataSourceError)."""
    text = str(source)
    try:
        scheme_of(text)
    except ValueError as exc:
        raise DataSourceError(str(exc)) from None
    return text


def index_folder(root: Path) -> pd.DataFrame:
    """Index ``root/<class>/<image>``: the folder name is the label.

    Every entry inside a class folder that is not a folder is indexed, images or not, FIFOs,
    devices and broken or looping symlinks too, so that it is recorded in the run's ``error``
    column (the read refuses it, with the reason) instead of silently disappearing; a
    symlinked folder is listed, not followed. A name that is not valid UTF-8 is kept as a
    ``file://`` URI with its bytes percent-encoded.
    """
    root = Path(os.path.realpath(root))
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith("."))
    rows = []
    cells = _Cells()
    no_attributes = cells.attributes([], ())
    for class_dir in class_dirs:
        labels = cells.labels([_readable_name(class_dir.name)])
        for folder, folders, files in os.walk(class_dir):  # symlinked folders are not entered
            folders[:] = sorted(d for d in folders if not d.startswith("."))
            linked = [d for d in folders if os.path.islink(os.path.join(folder, d))]
            for name in sorted([*files, *linked]):
                if not name.startswith("."):
                    rows.append(_row(_storable(os.path.join(folder, name)), labels, None, no_attributes))
    if not rows:
        raise DataSourceError(
            f"{root}: no images found; expected one sub-folder per class, e.g. {root}/cat/001.jpg"
        )
    return _finish(pd.DataFrame(rows, columns=INDEX_COLUMNS), str(root))


def _readable_name(name: str) -> str:
    """A file name as valid text (undecodable bytes replaced), for labels and messages."""
    return os.fsencode(name).decode("utf-8", "replace")


def _storable(path: str) -> str:
    """The path itself, or its ``file://`` URI when the name is not valid UTF-8 (Parquet
    strings are UTF-8; the URI reads back the same bytes)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return file_uri(path)
    return path


def read_manifest(uri: str, limits: Limits = Limits()) -> pd.DataFrame:
    """Read a CSV or Parquet manifest, local or remote, at most ``limits.manifest_bytes``."""
    suffix = Path(uri.split("?")[0]).suffix.lower()
    try:
        data = io.BytesIO(read_bytes(uri, ReadPolicy(limits=limits), max_bytes=limits.manifest_bytes))
        if suffix == ".csv":
            return pd.read_csv(data, dtype=str, keep_default_na=False)
        return pd.read_parquet(data)
    except DataSourceError:
        raise
    except Exception as exc:  # the parser's or the read's own message is the useful part
        raise DataSourceError(f"{uri}: cannot read the manifest ({exc})") from exc


def index_manifest(uri: str, policy: ReadPolicy = ReadPolicy()) -> pd.DataFrame:
    """Index a manifest with ``path``, ``label`` and optional ``x0,y0,x1,y1`` and attributes.

    Relative paths resolve against the manifest's folder (or URL). Every row must stay where
    ``policy`` allows (:func:`read_policy`: a local manifest's files under its folder, a
    remote manifest's images on its origin), else the manifest is refused with the row and
    the fix. ``label`` may hold several labels separated by ``;`` (or be a list in Parquet)
    for multi-label data; an empty or null label is no label.
    """
    table = read_manifest(uri, policy.limits)
    missing = [c for c in ("path", "label") if c not in table.columns]
    if missing:
        raise DataSourceError(
            f"{uri}: manifest lacks column(s) {missing}; expected 'path', 'label', optional "
            f"{', '.join(BOX_COLUMNS)} and any attribute columns (found: {list(table.columns)})"
        )
    if table.empty:
        raise DataSourceError(f"{uri}: the manifest has no rows")
    present_box = [c for c in BOX_COLUMNS if c in table.columns]
    if present_box and len(present_box) != len(BOX_COLUMNS):
        raise DataSourceError(
            f"{uri}: box columns must come together; found {present_box}, expected all of {list(BOX_COLUMNS)}"
        )
    base = uri.rsplit("/", 1)[0] if is_remote(uri) else str(Path(os.path.realpath(uri)).parent)
    attribute_columns = [c for c in table.columns if c not in ("path", "label", *BOX_COLUMNS)]
    csv = uri.lower().endswith(".csv")
    cells = _Cells()
    parts = []
    for start in range(0, len(table), MANIFEST_CHUNK):  # records a chunk at a time: no dict per row of the whole manifest
        rows = []
        chunk = table.iloc[start : start + MANIFEST_CHUNK].to_dict("records")
        for number, record in enumerate(chunk, start=start + (2 if csv else 0)):
            try:
                location = _locate(str(record["path"]), base, policy)
            except ValueError as exc:
                raise DataSourceError(f"{uri}: {'line' if csv else 'row'} {number}: {exc}") from None
            box = [_to_float(record[c]) for c in BOX_COLUMNS] if present_box else None
            attributes = cells.attributes(attribute_columns, tuple(_to_str(record[c]) for c in attribute_columns))
            rows.append(_row(location, cells.labels(_parse_labels(record["label"])), box, attributes))
        parts.append(pd.DataFrame(rows, columns=INDEX_COLUMNS))
    return _finish(pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0], uri)


class _Cells:
    """One object per distinct label list and attribute set of an index being built: a
    million-image manifest holds a few distinct ones, and a list and a dict per row cost
    ~1 KB an image. Cells are therefore shared between rows: no code edits one in place."""

    def __init__(self) -> None:
        self._labels: dict[tuple[str, ...], list[str]] = {}
        self._attributes: dict[tuple[str | None, ...], dict[str, str | None]] = {}

    def labels(self, names: list[str]) -> list[str]:
        """The shared list equal to ``names``."""
        return self._labels.setdefault(tuple(names), names)

    def attributes(self, columns: list[str], values: tuple[str | None, ...]) -> dict[str, str | None]:
        """The shared ``{column: value}`` dict of these values."""
        found = self._attributes.get(values)
        if found is None:
            found = self._attributes[values] = dict(zip(columns, values))
        return found


def _locate(path: str, base: str, policy: ReadPolicy) -> str:
    """Where a manifest row's ``path`` points, refused (ValueError) where ``policy`` forbids:
    a URL of another origin, a local file outside the roots (a remote manifest has none), a
    relative path that climbs out of a remote manifest's folder."""
    scheme = scheme_of(path)  # an unsupported scheme is a ValueError
    if scheme is not None and scheme not in LOCAL_SCHEMES:
        if policy.origins is not None and origin_of(path) not in policy.origins:
            raise ValueError(f"path {path!r} is not on the manifest's origin {', '.join(policy.origins)}; a remote "
                             f"manifest may name only its own server's images ({OPT_IN})")
        return path
    relative = scheme is None and not os.path.isabs(path)
    if is_remote(base) and relative:
        if policy.roots is not None and ".." in path.replace("\\", "/").split("/"):
            raise ValueError(f"path {path!r} points outside the manifest's folder {base} ({OPT_IN})")
        return f"{base}/{path}"
    local = os.path.normpath(os.path.join(base, path) if relative else local_path(path))
    if policy.roots is not None and not inside(local, policy.roots):
        where = " or ".join(policy.roots)
        reason = (f"names a file of this machine, which a remote manifest may not ({OPT_IN})" if is_remote(base)
                  else f"points outside the manifest's folder {where}; move the images under it, or {OPT_IN}")
        raise ValueError(f"path {path!r} {reason}")
    return _storable(local)


def attribute_pairs(cell: Any) -> list[tuple[Any, Any]]:
    """An ``attributes`` cell as (key, value) pairs: Parquet gives a list of tuples, a fresh
    index a dict; a missing cell gives none."""
    if cell is None or (isinstance(cell, float) and cell != cell):
        return []
    if isinstance(cell, dict):
        return list(cell.items())
    return [tuple(pair) for pair in cell]


def class_names_from_index(index: pd.DataFrame) -> list[str]:
    """Sorted distinct labels of the index: the default class order (folders sort the same way)."""
    return sorted({label for labels in index["labels"] for label in labels})


def read_class_file(path: Path) -> list[str]:
    """Class names, one per line, in the model's output order (a UTF-8 byte-order mark, as
    some editors write, is not part of the first name); a name listed twice is an error."""
    if not Path(path).is_file():
        raise DataSourceError(f"{path}: class-names file not found; write one class name per line")
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataSourceError(f"{path}: not UTF-8 text ({exc}); save the class names as UTF-8") from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise DataSourceError(f"{path}: the class-names file is empty; write one class name per line")
    if twice := sorted({name for name in names if names.count(name) > 1}):
        lines = {name: [n + 1 for n, line in enumerate(text.splitlines()) if line.strip() == name] for name in twice}
        raise DataSourceError(f"{path}: class name(s) listed twice: "
                              + ", ".join(f"{name!r} (lines {', '.join(map(str, lines[name]))})" for name in twice)
                              + "; each output of the model needs its own name")
    return names


INDEX_ROW_GROUP = 1024  # rows per Parquet row group of a saved index: a shard reads only the groups it spans


def write_index(index: pd.DataFrame, path: Path) -> None:
    """Save an index as Parquet (attributes as a string map), in row groups of :data:`INDEX_ROW_GROUP`."""
    frame = index.assign(attributes=index["attributes"].map(lambda a: list(a.items())))
    pq.write_table(pa.Table.from_pandas(frame[INDEX_COLUMNS], schema=INDEX_SCHEMA, preserve_index=False), path,
                   row_group_size=INDEX_ROW_GROUP)


def read_index(path: Path, start: int = 0, stop: int | None = None) -> pd.DataFrame:
    """Load rows ``start:stop`` of a saved index, with labels as lists and attributes as dicts.

    Only the row groups that hold those rows are read: every shard reading the whole index made
    the shards' reads O(N^2) (200,000 images: 0.2 s per shard, 782 shards)."""
    source = pq.ParquetFile(path)
    total = source.metadata.num_rows
    stop = total if stop is None else min(stop, total)
    groups, first, offset = [], None, 0
    for group in range(source.metadata.num_row_groups):
        rows = source.metadata.row_group(group).num_rows
        if offset < stop and offset + rows > start:
            groups.append(group)
            first = offset if first is None else first
        offset += rows
    table = source.read_row_groups(groups, use_pandas_metadata=False) if groups else INDEX_SCHEMA.empty_table()
    table = table.cast(INDEX_SCHEMA).slice(start - (first or 0), max(0, stop - start))
    frame = table.to_pandas()
    frame["labels"] = frame["labels"].map(list)
    frame["attributes"] = frame["attributes"].map(lambda a: dict(a) if a is not None else {})
    return frame


def _parse_labels(value: Any) -> list[str]:
    """A label cell as class names; null (None, NaN: Parquet's missing value) is no label,
    never a class called "nan"."""
    if isinstance(value, (list, tuple)) or hasattr(value, "tolist"):
        items = list(value.tolist() if hasattr(value, "tolist") else value)
    else:
        items = [] if _to_str(value) is None else str(value).split(";")
    return [str(item).strip() for item in items if _to_str(item) is not None and str(item).strip()]


def _to_float(value: Any) -> float:
    try:
        return float(value) if value not in ("", None) else float("nan")
    except (TypeError, ValueError):
        return float("nan")


def _to_str(value: Any) -> str | None:
    if value is None or value is pd.NA or (isinstance(value, float) and value != value):
        return None
    return str(value)


def _row(uri: str, labels: list[str], box: list[float] | None, attributes: dict[str, str | None]) -> list[Any]:
    box = box or [float("nan")] * 4
    return ["", uri, labels, *box, attributes]


def _finish(index: pd.DataFrame, source: str) -> pd.DataFrame:
    """Give each row a stable id: a short hash of its uri (same image, same id, across runs)."""
    index["image_id"] = [hashlib.sha1(uri.encode()).hexdigest()[:16] for uri in index["uri"]]
    dupes = index["image_id"].duplicated(keep="first")
    if dupes.any():
        # The same file listed twice: keep both rows, distinguish them by position.
        index.loc[dupes, "image_id"] = [f"{i}-{n}" for n, i in enumerate(index.loc[dupes, "image_id"])]
    index.attrs["source"] = source
    return index.reset_index(drop=True)
