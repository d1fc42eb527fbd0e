"""What the detectors read: the run's tables as given (:class:`FindingInputs`) and as the
detectors see them (:class:`AuditTables`: readable images only, maps of the explained layer);
and what several detectors derive from them, computed once per findings run (:func:`shared`)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from visaudit.tasks.data.columns import rows_where
from visaudit.tasks.findings.probe_records import CueProbe, LocationCandidate, LocationProbe

Locations = tuple[list[LocationCandidate], dict[str, LocationProbe]]
Embeddings = Callable[[Sequence[str]], np.ndarray]  # image ids -> their (N, D) float64 embeddings, in that order
P = ParamSpec("P")
R = TypeVar("R")

# One findings run's memo (None outside :func:`sharing`): key -> (result, the arguments it was computed from)
_MEMO: ContextVar[dict[tuple[Any, ...], tuple[Any, tuple[Any, ...]]] | None] = ContextVar("findings_memo", default=None)


@dataclass(frozen=True)
class FindingInputs:
    """The tables of one run that findings are computed from.

    ``layer`` is the explained layer: attention is judged on its maps (not on the shallow
    stages of a layer-by-layer run). ``signals`` (per-image embeddings, probabilities and
    properties), ``occlusion``, ``metrics`` (the sanity check's rows) and ``impressions``
    (colour impressions) feed the detectors that need them; ``locations`` are the
    fixed-location candidates with their probe results by class and ``cues`` the
    shortcut-cue probes by class (both need the model, so the flow runs them);
    ``adversarial`` the PGD experiment's rows. A detector whose input is missing is skipped.
    ``embeddings`` reads chosen images' embeddings when ``signals`` is given without its
    ``embedding`` column (the findings step: 512 bytes an image that only a few images'
    comparisons need); by default they are taken from ``signals``.
    """

    predictions: pd.DataFrame
    explanations: pd.DataFrame
    classes: list[str]
    multi_label: bool
    layer: str | None
    signals: pd.DataFrame | None = None
    occlusion: pd.DataFrame | None = None
    metrics: pd.DataFrame | None = None
    impressions: pd.DataFrame | None = None
    locations: Locations | None = None
    cues: dict[str, CueProbe] | None = None
    adversarial: pd.DataFrame | None = None
    embeddings: Embeddings | None = None

    def tables(self) -> AuditTables:
        """The inputs as the detectors read them."""
        explanations = self.explanations
        if self.layer is not None and not explanations.empty:
            explanations = rows_where(explanations, explanations["layer"] == self.layer)
        return AuditTables(
            audited=rows_where(self.predictions, self.predictions["error"].isna()),
            explanations=explanations,
            classes=self.classes,
            multi_label=self.multi_label,
            layer=self.layer,
            signals=self.signals if self.signals is not None else pd.DataFrame(),
            occlusion=self.occlusion,
            metrics=self.metrics,
            impressions=self.impressions,
            locations=self.locations,
            cues=self.cues,
            adversarial=self.adversarial,
            embeddings=self.embeddings,
        )


@dataclass(frozen=True)
class AuditTables:
    """:class:`FindingInputs` prepared once for every detector: ``audited`` holds the readable
    images' predictions, ``explanations`` the maps of the explained layer (every map when no
    layer is named), ``signals`` is empty when absent; the rest as given."""

    audited: pd.DataFrame
    explanations: pd.DataFrame
    classes: list[str]
    multi_label: bool
    layer: str | None
    signals: pd.DataFrame
    occlusion: pd.DataFrame | None
    metrics: pd.DataFrame | None
    impressions: pd.DataFrame | None
    locations: Locations | None
    cues: dict[str, CueProbe] | None
    adversarial: pd.DataFrame | None = None
    embeddings: Embeddings | None = None  # None: taken from ``signals`` (:func:`embedding_rows`)

    def has(self, name: str) -> bool:
        """Whether input ``name`` is present: not None and, for a table, not empty."""
        value = getattr(self, name)
        return value is not None and not (isinstance(value, pd.DataFrame) and value.empty)


@contextmanager
def sharing() -> Iterator[None]:
    """Within this block (one findings run), each :func:`shared` result is computed once; the
    memo is dropped when the block ends, so nothing carries over to another run."""
    token = _MEMO.set({})
    try:
        yield
    finally:
        _MEMO.reset(token)


def _key(value: Any) -> Any:
    """How an argument of a :func:`shared` function is told apart: a table by its identity (its
    object is held by the memo, so the id cannot be reused meanwhile), a list as a tuple, the rest by value."""
    if isinstance(value, (pd.DataFrame, pd.Series)):
        return ("table", id(value))
    return tuple(value) if isinstance(value, list) else value


def shared(compute: Callable[P, R]) -> Callable[P, R]:
    """``compute`` run once per distinct arguments within :func:`sharing` (outside it, every call
    computes). Detectors derive the same tables, groups and clusters from one run's frames: the
    result is shared between them, so no caller may modify what ``compute`` returns."""

    @functools.wraps(compute)
    def once(*args: P.args, **kwargs: P.kwargs) -> R:
        memo = _MEMO.get()
        if memo is None:
            return compute(*args, **kwargs)
        key = (compute.__module__, compute.__qualname__, *map(_key, args),
               *((name, _key(value)) for name, value in sorted(kwargs.items())))
        if key not in memo:
            memo[key] = (compute(*args, **kwargs), (args, kwargs))
        return memo[key][0]

    return once


def listed(cells: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """A column of list cells (labels, predictions: lists or arrays; a null cell lists nothing)
    flattened: the row position of every listed name, and the names (object array), in order."""
    values = cells.to_numpy(dtype=object)
    present = ~pd.isna(values)
    kept = values[present]
    rows = np.repeat(np.flatnonzero(present), np.fromiter(map(len, kept), dtype=np.int64, count=len(kept)))
    names = np.concatenate(kept).astype(object, copy=False) if len(kept) else np.empty(0, dtype=object)
    return rows, names


STACK_CHUNK = 65_536  # object cells stacked per step (no full-size copy in the cells' own dtype)


def evenly_spaced(n: int, at_most: int) -> np.ndarray:
    """Positions of at most ``at_most`` evenly spaced items of ``n`` (all of them when fewer):
    the sample a fit on a large class or table is made from."""
    return np.linspace(0, n - 1, min(n, at_most)).astype(np.int64)


def stacked(cells: pd.Series, dtype: type[np.generic], rows: np.ndarray | None = None) -> np.ndarray:
    """A column of equal-length vectors (``signals.embedding``, ``thumbnail``, ``probabilities``)
    as one (N, D) array of ``dtype``; only the cells at row positions ``rows``, in that order,
    when given.

    The column may hold Arrow lists (``pd.ArrowDtype``, as the findings step reads the signals):
    each Arrow chunk's values are viewed as a (rows, D) numpy array, no Python object per cell,
    and the wanted rows copied from it (pandas' ``iloc`` or Arrow's ``take`` on the lists
    cost 1.3-2.4 KB a row here, for 192-byte thumbnails). Array cells are stacked a chunk at a
    time. Every row of a one-chunk Arrow column in its own dtype is that chunk's values viewed
    in place (a read-only array, no copy). A null cell or cells of unequal length are a
    ``ValueError``: these columns are written whole for every audited image."""
    picked = None if rows is None else np.asarray(rows, np.int64)
    if not isinstance(cells.dtype, pd.ArrowDtype):
        values = cells.to_numpy(dtype=object)
        values = values if picked is None else values[picked]
        out = np.empty((len(values), len(values[0]) if len(values) else 0), dtype)
        for start in range(0, len(values), STACK_CHUNK):
            out[start : start + STACK_CHUNK] = np.stack(values[start : start + STACK_CHUNK])
        return out
    views = [_vectors(chunk, str(cells.name)) for chunk in pa.chunked_array(pa.array(cells, from_pandas=True)).chunks]
    views = [view for view in views if len(view)]
    widths = {view.shape[1] for view in views}
    if len(widths) > 1:
        raise ValueError(f"column {cells.name!r} holds vectors of lengths {sorted(widths)}")
    whole = picked is None or (len(picked) == len(cells) and bool((picked == np.arange(len(cells))).all()))
    if len(views) == 1 and views[0].dtype == dtype and whole:
        return views[0]  # the Arrow data itself, read-only: no copy of a million thumbnails
    out = np.empty((len(cells) if picked is None else len(picked), widths.pop() if widths else 0), dtype)
    ends = np.cumsum([len(view) for view in views])
    if picked is None:
        for view, end in zip(views, ends):
            out[end - len(view) : end] = view
        return out
    chunk_of = np.searchsorted(ends, picked, side="right")
    order = np.argsort(chunk_of, kind="stable")
    bounds = np.searchsorted(chunk_of[order], np.arange(len(views) + 1))
    for k, view in enumerate(views):
        wanted = order[bounds[k] : bounds[k + 1]]
        out[wanted] = view[picked[wanted] - (ends[k] - len(view))]
    return out


def _vectors(chunk: pa.ListArray, name: str) -> np.ndarray:
    """One Arrow chunk of equal-length lists as a (rows, D) numpy view of its values (no copy)."""
    if chunk.null_count:
        raise ValueError(f"column {name!r} has {chunk.null_count} null cells; expected a vector in every row")
    lengths = chunk.value_lengths().to_numpy()
    if len(chunk) and (lengths != lengths[0]).any():
        raise ValueError(f"column {name!r} holds vectors of lengths {sorted(set(lengths.tolist()))}")
    width = int(lengths[0]) if len(chunk) else 0
    return chunk.flatten().to_numpy(zero_copy_only=False).reshape(len(chunk), width)


@shared
def signal_rows(audited: pd.DataFrame, signals: pd.DataFrame) -> np.ndarray:
    """Each ``audited`` image's row position in ``signals`` (one row per image), -1 for an
    image without one: Arrow's hash lookup of the ids (no Python object per id, unlike a
    pandas merge on them: 0.5 s and no copy of the frames at a million images)."""
    if signals.empty or audited.empty:  # an absent signals table is an empty frame with no columns
        return np.full(len(audited), -1, np.int64)
    return _positions(audited["image_id"], signals["image_id"])


def _positions(ids: Sequence[str] | pd.Series, among: pd.Series) -> np.ndarray:
    """Each of ``ids``' position in ``among`` (its first), -1 where absent: Arrow's hash lookup."""
    if len(ids) == 0 or len(among) == 0:
        return np.full(len(ids), -1, np.int64)
    found = pc.index_in(pa.array(ids, pa.string()), value_set=pa.array(among, pa.string()))
    return found.fill_null(-1).to_numpy().astype(np.int64, copy=False)


def embedding_rows(signals: pd.DataFrame, image_ids: Sequence[str]) -> np.ndarray:
    """The ``embedding`` vectors of ``image_ids`` in ``signals`` (one row per image), in the
    order given, as one float64 (N, D) array; a ``KeyError`` names an image without a row."""
    position = _positions(list(image_ids), signals["image_id"])
    if (missing := position < 0).any():
        raise KeyError(f"no signals row for images {np.asarray(image_ids)[missing][:5].tolist()}")
    return stacked(signals["embedding"], np.float64, position)


@shared
def true_class(audited: pd.DataFrame) -> pd.Series:
    """The single label of each image (multi-class data), None when it has zero or several."""
    return audited["labels"].map(lambda labels: labels[0] if labels is not None and len(labels) == 1 else None)
