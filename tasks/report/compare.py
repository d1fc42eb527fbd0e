"""The comparison report of two runs (``visaudit compare A B``): views, figures, HTML and PDF.

Written to ``OUT/comparisons/<A>_vs_<B>/compare.html`` (+ ``compare.pdf``), with each run's
figures under ``a/images/`` and ``b/images/`` (the two runs' maps of one image must not share
a file name); the numbers are those of ``tables/comparisons`` (``audit.compare``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from visaudit.tasks.audit.compare import Comparison, compare_runs, write_comparison
from visaudit.tasks.audit.map_shift import MOVED_BELOW
from visaudit.tasks.audit.record import RunRecord
from visaudit.tasks.data.storage import read_table
from visaudit.tasks.findings.paired import PairedChange
from visaudit.tasks.report.examples import Thumb
from visaudit.tasks.report.figures import BOX_COLUMNS, Painter
from visaudit.tasks.report.formatting import file_name, format_date, number, percent
from visaudit.tasks.report.render import ReportPaths, environment, stylesheet, write_documents

TEMPLATE_NAME = "compare.html.j2"
COMPARISONS_DIR = "comparisons"
FLIPS_SHOWN = 12  # of each status
MOVED_SHOWN = 8
MAP_COLUMNS = ["image_id", "method", "layer", "target", "height", "width", "heatmap"]
SHOWN_COLUMNS = ["image_id", "uri", "error", *BOX_COLUMNS]  # what the painters and the captions read


@dataclass(frozen=True)
class RunSide:
    """One of the two runs, as the cover names it."""

    letter: str
    run_id: str
    model: str
    weights: str
    source: str
    date: str
    images: int


@dataclass(frozen=True)
class ChangeRow:
    """One line of the accuracy table."""

    name: str
    images: int
    accuracy_a: str
    accuracy_b: str
    change: str
    interval: str
    fixed: int
    broken: int
    p_value: str
    test: str
    significant: bool


@dataclass(frozen=True)
class ImagePair:
    """An image shown with both runs' maps: a flip, or a map that moved."""

    image_id: str
    file_name: str
    label: str
    caption: str
    thumbs: list[Thumb]


def change_row(name: str, change: PairedChange) -> ChangeRow:
    return ChangeRow(name=name, images=change.images, accuracy_a=percent(change.accuracy_a),
                     accuracy_b=percent(change.accuracy_b), change=f"{change.change * 100:+.1f} pp",
                     interval=f"{change.low * 100:+.1f} to {change.high * 100:+.1f} pp", fixed=change.fixed,
                     broken=change.broken, p_value=number(change.p_value), test=change.test,
                     significant=change.significant)


def side(letter: str, record: RunRecord, images: int) -> RunSide:
    return RunSide(letter=letter, run_id=record.run_id, model=record.model.name or "unnamed model",
                   weights=record.model.weights or "", source=record.data.source or "unknown source",
                   date=format_date(record.finished or record.started), images=images)


def painters(folder: Path, out_dir: Path, comparison: Comparison, records: dict[str, RunRecord],
             predictions: dict[str, pd.DataFrame], shown: set[str]) -> dict[str, Painter]:
    """One painter per run, each drawing into its own subfolder, knowing only the shown images' maps
    (``predictions``: the shown images' rows of each run)."""
    out = {}
    for letter, run in (("a", comparison.run_a), ("b", comparison.run_b)):
        maps = read_table(out_dir, "explanations", run, columns=MAP_COLUMNS, image_ids=shown)
        painter = Painter(folder / letter, records[run].preprocessing(), maps, list(records[run].model.layers))
        painter.decode(predictions[run])
        out[letter] = painter
    return out


def thumb(painters_: dict[str, Painter], letter: str, image_id: str, target: str, caption: str,
          method: str | None = None, layer: str | None = None) -> Thumb:
    """A map of one run over the image, its path relative to the comparison folder."""
    src = painters_[letter].overlay(image_id, target, layer, method)
    return Thumb(f"{letter}/{src}" if src else None, caption)


def image_thumb(painters_: dict[str, Painter], image_id: str) -> Thumb:
    src = painters_["a"].image(image_id)
    return Thumb(f"a/{src}" if src else None, "image")


def flip_pair(row: pd.Series, painters_: dict[str, Painter]) -> ImagePair:
    """A flipped image: the image, then each run's map of the class it predicted."""
    first_a, first_b = str(row["predicted_a"]).split(";")[0], str(row["predicted_b"]).split(";")[0]
    return ImagePair(
        image_id=str(row["image_id"]), file_name=file_name(str(row["uri"])), label=str(row["label"]),
        caption=f"A: {row['predicted_a']} ({row['confidence_a']:.2f}) -> B: {row['predicted_b']} "
                f"({row['confidence_b']:.2f})",
        thumbs=[image_thumb(painters_, str(row["image_id"])),
                thumb(painters_, "a", str(row["image_id"]), first_a, f"A: {first_a}"),
                thumb(painters_, "b", str(row["image_id"]), first_b, f"B: {first_b}")])


def moved_pair(row: pd.Series, uris: pd.Series, painters_: dict[str, Painter]) -> ImagePair:
    """An image both runs got right whose map moved: the image, then each run's map."""
    image_id, target = str(row["image_id"]), str(row["target"])
    return ImagePair(
        image_id=image_id, file_name=file_name(str(uris.get(image_id, image_id))), label=target,
        caption=f"{row['method']} at {row['layer']}: Spearman {row['spearman']:.2f}",
        thumbs=[image_thumb(painters_, image_id),
                thumb(painters_, "a", image_id, target, f"A: {target}", str(row["method"]), str(row["layer"])),
                thumb(painters_, "b", image_id, target, f"B: {target}", str(row["method"]), str(row["layer"]))])


def comparison_context(comparison: Comparison, out_dir: Path, folder: Path) -> tuple[dict[str, object], list[Painter]]:
    """Everything compare.html.j2 shows, and the painters that drew its figures."""
    records = {run: RunRecord.load(out_dir / "runs" / run) for run in (comparison.run_a, comparison.run_b)}
    flips = comparison.flips
    shown_flips = pd.concat([flips[flips["status"] == s].head(FLIPS_SHOWN) for s in ("broken", "fixed")])
    moved = comparison.shifts.dropna(subset=["spearman"]).head(MOVED_SHOWN)
    moved = moved[moved["spearman"] < MOVED_BELOW]
    shown = set(shown_flips["image_id"]) | set(moved["image_id"])
    predictions = {run: read_table(out_dir, "predictions", run, columns=SHOWN_COLUMNS, image_ids=shown)
                   for run in (comparison.run_a, comparison.run_b)}  # of the shown images only
    drawn = painters(folder, out_dir, comparison, records, predictions, shown)
    uris = predictions[comparison.run_a].set_index("image_id")["uri"]
    context: dict[str, object] = {
        "a": side("A", records[comparison.run_a], comparison.images_a),
        "b": side("B", records[comparison.run_b], comparison.images_b),
        "shared": comparison.shared,
        "overall": change_row("all images", comparison.overall),
        "classes": [change_row(c.class_name or "", c.change) for c in comparison.classes],
        "counts": {s: int((flips["status"] == s).sum()) for s in ("fixed", "broken")},
        "flips": {s: [flip_pair(row, drawn) for _, row in shown_flips[shown_flips["status"] == s].iterrows()]
                  for s in ("broken", "fixed")},
        "flips_shown": FLIPS_SHOWN,
        "findings": comparison.findings,
        "shift_summary": comparison.shift_summary,
        "moved": [moved_pair(row, uris, drawn) for _, row in moved.iterrows()],
        "moved_below": MOVED_BELOW,
        "comparison_id": comparison.comparison_id,
    }
    return context, list(drawn.values())


def render_comparison(out_dir: Path, run_a: str, run_b: str, template_dir: Path | None = None, *,
                      pdf: bool = True) -> tuple[Comparison, ReportPaths]:
    """Compare two committed runs: ``tables/comparisons`` and ``comparisons/<A>_vs_<B>/compare.html`` (+ PDF)."""
    out_dir = Path(out_dir)
    comparison = compare_runs(out_dir, run_a, run_b)
    write_comparison(out_dir, comparison)
    folder = out_dir / COMPARISONS_DIR / comparison.comparison_id
    folder.mkdir(parents=True, exist_ok=True)
    env = environment(template_dir)
    context, drawn = comparison_context(comparison, out_dir, folder)
    paths = write_documents(env.get_template(TEMPLATE_NAME).render(**context, stylesheet=stylesheet(env)), folder,
                            "compare", pdf)
    for painter in drawn:
        painter.prune()
    return comparison, paths
