"""Table cells and numbers as the report's text: list and optional cells, percentages, scores,
dates, run.json values and file names."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import pandas as pd


def values(cell: Any) -> list[Any]:
    """A list cell (numpy array, list or null/NaN) as a list."""
    return [] if cell is None or (isinstance(cell, float) and math.isnan(cell)) else list(cell)


def names(cell: Any) -> list[str]:
    """A list cell of class names or image ids as a list of strings."""
    return [str(v) for v in values(cell)]


def optional_str(value: Any) -> str | None:
    """A string cell, or None for null/NaN."""
    return value if isinstance(value, str) else None


def optional_float(value: Any) -> float | None:
    """A number cell as a float, or None for null/NA/NaN."""
    if value is None or value is pd.NA:
        return None
    parsed = float(value)
    return None if math.isnan(parsed) else parsed


def percent(value: float | None) -> str:
    """0.934 -> '93.4%'; None -> 'n/a'."""
    return "n/a" if value is None or math.isnan(value) else f"{value:.1%}"


def number(value: Any) -> str:
    """A metric value or threshold, short (3 significant digits); 'n/a' when missing."""
    parsed = optional_float(value)
    return "n/a" if parsed is None else f"{parsed:.3g}"


def score(value: Any) -> str:
    """A model score with two decimals; 'n/a' when missing."""
    parsed = optional_float(value)
    return "n/a" if parsed is None else f"{parsed:.2f}"


def text(value: Any) -> str:
    """A run.json value as one line of text."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(text(v) for v in value)
    if isinstance(value, Mapping):
        return json.dumps(value, sort_keys=True)
    return str(value)


def format_date(value: str | None) -> str:
    """An ISO timestamp as 'YYYY-MM-DD HH:MM UTC' (or as given when it does not parse)."""
    if not value:
        return "unknown date"
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return value
    zone = moment.tzname() or ""
    return f"{moment:%Y-%m-%d %H:%M} {'UTC' if zone in ('UTC', 'UTC+00:00') else zone}".strip()


def file_name(uri: str) -> str:
    """The last path segment of a local path or URL."""
    return uri.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0] or uri
