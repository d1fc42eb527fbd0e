"""How far a run has got, as small files in its staging folder, for the command line's bar.

Each shard writes ``progress/<shard>`` (the images it has finished) after every batch, and the
flow writes ``progress/stage`` (the stage it starts) before each later stage. A reader sums
the shards and reads the stage; once the run is committed (the staging folder gone, its
``run.json`` written) the stage is the report. One tiny file write per batch and per stage.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from visaudit.tasks.data.files import write_atomically

PROGRESS_DIR = "progress"
STAGE_FILE = "stage"
STAGE_LABELS = {  # the flow's stage names, as the bar shows them
    "sanity_check": "sanity check", "deletion_insertion": "deletion/insertion",
    "class_impressions": "class impressions", "adversarial": "adversarial noise",
    "findings": "findings", "feature_views": "feature views",
    "commit": "commit", "report": "report",
}


@dataclass(frozen=True)
class Progress:
    """Images finished by the shards, and the later stage running (None while the shards run)."""

    images: int
    stage: str | None

    @property
    def label(self) -> str:
        return STAGE_LABELS.get(self.stage, self.stage) if self.stage else "images"


def _write(path: Path, text: str) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(text))


def mark_images(plan_folder: Path, shard: str, done: int) -> None:
    """Shard ``shard`` has finished ``done`` of its images."""
    _write(Path(plan_folder) / PROGRESS_DIR / shard, str(done))


def mark_stage(plan_folder: Path, stage: str) -> None:
    """The flow starts ``stage`` (a key of :data:`STAGE_LABELS`)."""
    _write(Path(plan_folder) / PROGRESS_DIR / STAGE_FILE, stage)


def read_progress(plan_folder: Path, run_dir: Path, images: int) -> Progress:
    """The run's progress (``images``: the planned total, reported once the shards are past)."""
    return ProgressReader(plan_folder, run_dir, images).read()


class ProgressReader:
    """Reads a run's progress again and again (the bar, 4 times a second): a shard's file is
    read until it says the shard is finished (``sizes``: each shard's planned images), so a
    million-image run's thousands of finished shards cost one directory listing a read."""

    def __init__(self, plan_folder: Path, run_dir: Path, images: int, sizes: dict[str, int] | None = None) -> None:
        self.folder = Path(plan_folder) / PROGRESS_DIR
        self.run_dir = Path(run_dir)
        self.images = images
        self.sizes = sizes or {}
        self.finished: dict[str, int] = {}

    def read(self) -> Progress:
        try:
            names = [entry.name for entry in os.scandir(self.folder)]
        except OSError:  # no shard has started yet, or the run is committed (the staging folder gone)
            return Progress(self.images, "report") if (self.run_dir / "run.json").exists() else Progress(0, None)
        done, stage = 0, None
        for name in names:
            if name.startswith("."):  # a write in flight
                continue
            if name in self.finished:
                done += self.finished[name]
                continue
            try:
                text = (self.folder / name).read_text().strip()
            except OSError:  # renamed into place while we read, or the folder committed away
                continue
            if name == STAGE_FILE:
                stage = text
            elif text.isdigit():
                done += int(text)
                if self.sizes.get(name) == int(text):
                    self.finished[name] = int(text)
        return Progress(self.images if stage else done, stage)
