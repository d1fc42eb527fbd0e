"""Where a run keeps its feature views (:mod:`visaudit.tasks.explain.features` draws them at
audit time, with the model) and the reading of their index, which the report needs without torch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FEATURES_DIR = "features"  # under the run folder
INDEX_NAME = "features.json"


def read_features(run_dir: Path) -> dict[str, Any] | None:
    """The feature views' index (``features/features.json``), or None when none were drawn."""
    path = run_dir / FEATURES_DIR / INDEX_NAME
    return json.loads(path.read_text()) if path.is_file() else None
