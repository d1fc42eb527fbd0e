"""The run record, ``runs/<run_id>/run.json``: what was audited, how, with what, and how long it took.

One typed model, written by the commit (``audit.commit``) and read by the report and the command line;
records written by older versions load with their missing fields at their defaults.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from visaudit.tasks.audit.setup_report import NearChance, SetupReport
from visaudit.tasks.data.files import write_atomically
from visaudit.tasks.data.images import Preprocess
from visaudit.tasks.findings.metrics import RunMetrics

RECORD_NAME = "run.json"


class ModelInfo(BaseModel):
    """The audited model: its name (architecture or factory), weights, fingerprint and layers."""

    model_config = ConfigDict(extra="ignore")

    name: str | None = None
    weights: str | None = None
    fingerprint: str | None = None
    task: Literal["multiclass", "multilabel"] = "multiclass"
    layers: list[str] = Field(default_factory=list)  # hooked layers, shallow to deep; the explained one last
    layer_reason: str = ""  # why the explained layer was chosen
    num_classes: int | None = None
    skipped: dict[str, str] = Field(default_factory=dict)  # requested methods that cannot apply -> the note


class DataInfo(BaseModel):
    """The audited data: its source, fingerprint and image counts."""

    model_config = ConfigDict(extra="ignore")

    source: str | None = None
    fingerprint: str | None = None
    images: int | None = None
    unreadable: int | None = None


class RunRecord(BaseModel):
    """Everything ``run.json`` holds."""

    model_config = ConfigDict(extra="ignore")

    run_id: str
    started: str | None = None
    finished: str | None = None
    model: ModelInfo = Field(default_factory=ModelInfo)
    data: DataInfo = Field(default_factory=DataInfo)
    classes: list[str] = Field(default_factory=list)
    preprocess: dict[str, Any] = Field(default_factory=dict)
    parameters: dict[str, Any] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict)
    resumed_shards: int = 0  # shards an earlier attempt of this run (same --run-id) had finished, reused as written
    metrics: RunMetrics | None = None
    setup: SetupReport | None = None  # the setup checks on the probe (None when skipped)
    near_chance: NearChance | None = None  # the whole audit's accuracy against chance
    figures: dict[str, int] = Field(default_factory=dict)  # folders of figures drawn at audit time: files in each

    @property
    def multi_label(self) -> bool:
        return self.model.task == "multilabel"

    def preprocessing(self) -> Preprocess:
        """The run's preprocessing (the defaults for what an old record lacks)."""
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in self.preprocess.items()
                  if k in Preprocess.__dataclass_fields__}
        return Preprocess(**values)

    @classmethod
    def load(cls, run_dir: Path) -> RunRecord:
        """Read ``run_dir/run.json``; a clear error when the run was never committed."""
        path = Path(run_dir) / RECORD_NAME
        if not path.exists():
            raise FileNotFoundError(f"{path}: no run.json; is the run id right and did the run finish?")
        return cls.model_validate_json(path.read_text(encoding="utf-8"))

    def save(self, run_dir: Path) -> Path:
        """Write ``run_dir/run.json`` atomically (a temporary file, then a rename)."""
        path = Path(run_dir) / RECORD_NAME
        write_atomically(path, lambda tmp: tmp.write_text(json.dumps(self.model_dump(mode="json"), indent=2),
                                                          encoding="utf-8"))
        return path

