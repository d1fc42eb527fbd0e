"""Data sources: a class-per-folder directory or a CSV/Parquet manifest, turned into an index.

The index has one row per image: ``image_id``, ``uri``, ``labels`` (list of class names),
``box_x0..box_y1`` (pixels of the original image, NaN when unknown) and ``attributes``
(dict of the manifest's other columns, as strings). Everything downstream reads the index.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
BOX_COLUMNS = ("x0", "y0", "x1", "y1")
MANIFEST_SUFFIXES = {".csv", ".parquet", ".pq"}
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


def is_url(path: str) -> bool:
    """Whether ``path`` is an fsspec URL (``http://``, ``s3://``, ...) rather than a local path."""
    return "://" in path and not path.startswith("file://")


def build_index(source: str | Path, allow_outside: bool = False) -> pd.DataFrame:
    """Index a data source: a class-per-folder directory or a ``.csv``/``.parquet`` manifest.

    ``allow_outside``: let a manifest's relative paths climb out of its folder (``../``).
    """
    source_str = str(source)
    if is_url(source_str):
        if Path(source_str.split("?")[0]).suffix.lower() not in MANIFEST_SUFFIXES:
            raise DataSourceError(f"{source_str}: a remote data source must be a .csv or .parquet manifest")
        return index_manifest(source_str, allow_outside)
    path = Path(source_str.removeprefix("file://")).expanduser()
    if not path.exists():
        raise DataSourceError(
            f"{path}: data source not found; pass a class-per-folder directory or a .csv/.parquet manifest"
        )
    if path.is_dir():
        return index_folder(path)
    if path.suffix.lower() in MANIFEST_SUFFIXES:
        return index_manifest(str(path), allow_outside)
    raise DataSourceError(
        f"{path}: not a folder nor a manifest; pass a class-per-folder directory or a .csv/.parquet manifest"
    )


def index_folder(root: Path) -> pd.DataFrame:
    """Index ``root/<class>/<image>``: the folder name is the label.

    Every file inside a class folder is indexed, images or not, so that an unreadable file
    is recorded in the run's ``error`` column instead of silently disappearing.
    """
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    rows = []
    for class_dir in class_dirs:
        for file in sorted(class_dir.rglob("*")):
            if file.is_file() and not file.name.startswith("."):
                rows.append(_row(str(file.resolve()), [class_dir.name], None, {}))
    if not rows:
        raise DataSourceError(
            f"{root}: no images found; expected one sub-folder per class, e.g. {root}/cat/001.jpg"
        )
    return _finish(pd.DataFrame(rows, columns=INDEX_COLUMNS), str(root))


def read_manifest(uri: str) -> pd.DataFrame:
    """Read a CSV or Parquet manifest, local or remote (fsspec)."""
    suffix = Path(uri.split("?")[0]).suffix.lower()
    try:
        if suffix == ".csv":
            return pd.read_csv(_open_bytes(uri), dtype=str, keep_default_na=False)
        return pd.read_parquet(_open_bytes(uri))
    except DataSourceError:
        raise
    except Exception as exc:  # the parser's own message is the useful part
        raise DataSourceError(f"{uri}: cannot read the manifest ({exc})") from exc


def index_manifest(uri: str, allow_outside: bool = False) -> pd.DataFrame:
    """Index a manifest with ``path``, ``label`` and optional ``x0,y0,x1,y1`` and attributes.

    Relative paths resolve against the manifest's folder and must stay inside it unless
    ``allow_outside`` (a manifest from elsewhere must not read arbitrary files through
    ``../``); absolute paths and URLs are taken as written. ``label`` may hold several
    labels separated by ``;`` (or be a list in Parquet) for multi-label data.
    """
    table = read_manifest(uri)
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
    base = uri.rsplit("/", 1)[0] if is_url(uri) else str(Path(uri).resolve().parent)
    attribute_columns = [c for c in table.columns if c not in ("path", "label", *BOX_COLUMNS)]
    rows = []
    for number, record in enumerate(table.to_dict("records"), start=2 if uri.lower().endswith(".csv") else 0):
        if not allow_outside and _climbs_out(str(record["path"]), base):
            where = f"line {number}" if uri.lower().endswith(".csv") else f"row {number}"
            raise DataSourceError(
                f"{uri}: {where}: path {record['path']!r} points outside the manifest's folder {base}; move the "
                "images under it or write absolute paths, or pass --allow-outside-paths if you trust this manifest"
            )
        box = [_to_float(record[c]) for c in BOX_COLUMNS] if present_box else None
        attributes = {c: _to_str(record[c]) for c in attribute_columns}
        rows.append(_row(_resolve(str(record["path"]), base), _parse_labels(record["label"]), box, attributes))
    return _finish(pd.DataFrame(rows, columns=INDEX_COLUMNS), uri)


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
    """Class names, one per line, in the model's output order."""
    if not Path(path).is_file():
        raise DataSourceError(f"{path}: class-names file not found; write one class name per line")
    names = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise DataSourceError(f"{path}: the class-names file is empty; write one class name per line")
    return names


def write_index(index: pd.DataFrame, path: Path) -> None:
    """Save an index as Parquet (attributes as a string map)."""
    frame = index.assign(attributes=index["attributes"].map(lambda a: list(a.items())))
    pq.write_table(pa.Table.from_pandas(frame[INDEX_COLUMNS], schema=INDEX_SCHEMA, preserve_index=False), path)


def read_index(path: Path, start: int = 0, stop: int | None = None) -> pd.DataFrame:
    """Load rows ``start:stop`` of a saved index, with labels as lists and attributes as dicts."""
    table = pq.read_table(path, schema=INDEX_SCHEMA)
    table = table.slice(start, (stop if stop is not None else table.num_rows) - start)
    frame = table.to_pandas()
    frame["labels"] = frame["labels"].map(list)
    frame["attributes"] = frame["attributes"].map(lambda a: dict(a) if a is not None else {})
    return frame


REMOTE_TIMEOUT_S = 30.0  # per attempt, for http(s) reads
REMOTE_ATTEMPTS = 3  # a timeout or connection error is retried with backoff; a 404 is not


def read_bytes(uri: str) -> bytes:
    """The raw bytes of an image, local or remote (fsspec, e.g. http, s3)."""
    if is_url(uri):
        return _read_remote(uri)
    return Path(uri).read_bytes()


def _read_remote(uri: str) -> bytes:
    """Read a URL with a bounded timeout and bounded retries; the last error names the URL.

    http(s) goes through urllib (fsspec's http layer reports a timeout as a missing file);
    other protocols (s3, gcs, ...) through fsspec.
    """
    last: Exception | None = None
    for attempt in range(REMOTE_ATTEMPTS):
        try:
            if uri.startswith(("http://", "https://")):
                return _read_http(uri)
            import fsspec

            with fsspec.open(uri, "rb") as handle:
                return handle.read()
        except (FileNotFoundError, PermissionError):
            raise  # 404, 403: asking again will not help
        except Exception as exc:  # timeouts, resets, 5xx: each library raises its own type
            last = exc
            if attempt + 1 < REMOTE_ATTEMPTS:
                time.sleep(0.5 * 2**attempt)
    raise OSError(f"{uri}: unreachable after {REMOTE_ATTEMPTS} attempts ({type(last).__name__}: {last})")


def _read_http(uri: str) -> bytes:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(uri, headers={"User-Agent": "visaudit"})
    try:
        with urllib.request.urlopen(request, timeout=REMOTE_TIMEOUT_S) as answer:  # noqa: S310 (the user's URL)
            return answer.read()
    except urllib.error.HTTPError as exc:
        if exc.code in (404, 410):
            raise FileNotFoundError(f"{uri}: HTTP {exc.code} {exc.reason}") from None
        if exc.code < 500 and exc.code != 429:
            raise PermissionError(f"{uri}: HTTP {exc.code} {exc.reason}") from None  # not retried
        raise


def _open_bytes(uri: str) -> io.BytesIO:
    return io.BytesIO(read_bytes(uri))


def _climbs_out(path: str, base: str) -> bool:
    """Whether a relative manifest path leaves the manifest's folder (judged on the text, ``..``)."""
    if is_url(path) or (not is_url(base) and Path(path).is_absolute()):
        return False
    if is_url(base):
        return ".." in path.replace("\\", "/").split("/")
    joined = os.path.normpath(os.path.join(base, path))
    return joined != base and not joined.startswith(base.rstrip(os.sep) + os.sep)


def _resolve(path: str, base: str) -> str:
    if is_url(path) or (not is_url(base) and Path(path).is_absolute()):
        return path
    if is_url(base):
        return f"{base}/{path}"
    return str((Path(base) / path).resolve())


def _parse_labels(value: Any) -> list[str]:
    if isinstance(value, (list, tuple)) or hasattr(value, "tolist"):
        items = list(value.tolist() if hasattr(value, "tolist") else value)
    else:
        items = str(value).split(";")
    return [str(item).strip() for item in items if str(item).strip()]


def _to_float(value: Any) -> float:
    try:
        return float(value) if value not in ("", None) else float("nan")
    except (TypeError, ValueError):
        return float("nan")


def _to_str(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and value != value):
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
