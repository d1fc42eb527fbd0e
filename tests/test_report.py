"""Report: a small committed run fabricated in a temp folder, rendered to HTML and PDF."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw
from pypdf import PdfReader

from visaudit.tasks.data.columns import attribute_pairs_of, class_matrix, first_codes
from visaudit.tasks.data.labels import label_matrix
from visaudit.tasks.data.storage import commit_run, read_table, write_part
from visaudit.tasks.report.classes import class_table
from visaudit.tasks.report.examples import most_confident
from visaudit.tasks.report.figures import digest
from visaudit.tasks.report.formatting import names
from visaudit.tasks.report.impressions import colour_notes, impression_note, position_words
from visaudit.tasks.report.render import render_report

SCRIPT = "<script>alert(1)</script>"
CLASSES = ["circle", "square", SCRIPT]
SECTIONS = ["Findings", "Per-class results", "Confusion matrix", "Calibration", "Slices", "Failure gallery",
            "Trends across runs", "Unreadable images", "Appendix"]


@dataclass(frozen=True)
class Shot:
    """One fabricated image: file name, labels, prediction, confidence (None: unreadable)."""

    name: str
    labels: list[str]
    predicted: list[str]
    confidence: float | None


MULTICLASS = [
    Shot("a0.png", ["circle"], ["circle"], 0.95),
    Shot("a1.png", ["circle"], ["square"], 0.97),
    Shot("a2.png", ["square"], ["square"], 0.90),
    Shot("a3-<b>bold.png", ["square"], ["circle"], 0.80),
    Shot("a4.png", [SCRIPT], ["circle"], 0.60),
    Shot("a5.png", ["circle"], ["circle"], 0.85),
    Shot("a6.png", ["square"], ["square"], 0.70),
    Shot("broken.png", ["circle"], [], None),
]

MULTILABEL = [
    Shot("m0.png", ["circle", "square"], ["circle", "square"], 0.9),
    Shot("m1.png", ["circle"], ["circle", "square"], 0.8),
    Shot("m2.png", ["square"], ["circle"], 0.7),
    Shot("m3.png", ["circle", "square"], ["circle"], 0.6),
]

FINDINGS = [
    dict(kind="class_imbalance", severity="low", class_name=SCRIPT, slice=None, metric="share_vs_uniform",
         value=0.43, threshold=0.5, message=f"Class '{SCRIPT}' has 1 of 7 images, a rare class.",
         evidence=["a4"], confidence="normal", cause=None),
    dict(kind="confident_error", severity="high", class_name="circle", slice=None, metric="confident_error_share",
         value=0.33, threshold=0.02, message="1 of 3 'circle' images are misclassified with high confidence.",
         evidence=["a1"], confidence="normal", cause=None),
    dict(kind="confused_pair", severity="medium", class_name="square", slice="predicted=circle",
         metric="confused_share", value=0.33, threshold=0.1,
         message="1 of 3 'square' images are predicted as 'circle'.", evidence=["a3", "a1"],
         confidence="low", cause=None),
]


def draw_image(path: Path, seed: int) -> None:
    """A small RGB picture: a coloured shape on a plain background."""
    image = Image.new("RGB", (48, 40), (30 * seed % 255, 120, 200))
    ImageDraw.Draw(image).ellipse([8, 6, 30, 28], fill=(250, 220, 40))
    image.save(path)


def prediction_rows(folder: Path, images: list[Shot]) -> pd.DataFrame:
    rows = []
    for n, spec in enumerate(images):
        uri = folder / spec.name
        ok = spec.confidence is not None
        if ok:
            draw_image(uri, n)
        else:
            uri.write_bytes(b"not an image")
        others = [c for c in CLASSES if c not in spec.predicted]
        top = spec.predicted + others if ok else None
        rows.append(
            dict(
                image_id=spec.name.split(".")[0].split("-")[0],
                uri=str(uri),
                labels=spec.labels,
                predicted=spec.predicted if ok else None,
                top_classes=top,
                top_scores=[spec.confidence] + [0.01] * (len(top) - 1) if ok else None,
                confidence=spec.confidence,
                correct=sorted(spec.labels) == sorted(spec.predicted) if ok else None,
                loss=0.1 if ok else None,
                image_height=40 if ok else None,
                image_width=48 if ok else None,
                box_x0=8.0, box_y0=6.0, box_x1=30.0, box_y1=28.0,
                attributes=[("background", "grass<i>")],
                error=None if ok else "UnidentifiedImageError: cannot identify <image> file",
            )
        )
    frame = pd.DataFrame(rows)
    frame["image_height"] = frame["image_height"].astype("Int32")
    frame["image_width"] = frame["image_width"].astype("Int32")
    frame["correct"] = frame["correct"].astype("boolean")
    return frame


def explanation_rows(predictions: pd.DataFrame) -> pd.DataFrame:
    """A 4x4 map for every predicted and every true class of each readable image."""
    rng = np.random.default_rng(0)
    rows = []
    for row in predictions[predictions["error"].isna()].itertuples():
        for target in dict.fromkeys(list(row.predicted) + list(row.labels)):
            rows.append(
                dict(
                    image_id=row.image_id, method="gradcam", layer="layer4", target=target,
                    target_index=CLASSES.index(target), is_predicted=target in row.predicted,
                    is_label=target in row.labels, height=4, width=4,
                    heatmap=rng.random(16).astype(np.float32).tolist(), peak_row=1, peak_col=2,
                    peak_x=0.6, peak_y=0.4, energy_in_box=0.3, box_area_fraction=0.25, pointing_hit=True,
                    wsl_box_x0=8.0, wsl_box_y0=8.0, wsl_box_x1=24.0, wsl_box_y1=24.0, wsl_iou=0.5,
                    localised=target in row.labels if target in row.predicted else None,
                )
            )
    return pd.DataFrame(rows)


def run_record(run_id: str, task: str) -> dict:
    return {
        "run_id": run_id,
        "started": "2026-11-22T15:15:00+00:00",
        "finished": "2026-11-22T15:16:00+00:00",
        "model": {"name": "visaudit.tasks.demo.network:build_model", "weights": None, "fingerprint": "ab" * 32, "task": task,
                  "layers": ["layer4"], "num_classes": len(CLASSES)},
        "data": {"source": "/data/shapes", "fingerprint": "cd" * 32, "images": 8, "unreadable": 1},
        "classes": CLASSES,
        "preprocess": {"resize": 32, "crop": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
        "parameters": {"methods": ["gradcam"], "device": "cpu", "batch_size": 64, "shard_size": 256,
                       "thresholds": {"confident_error_confidence": 0.9}},
        "versions": {"visaudit": "0.1.0", "python": "3.11"},
        "timings": {"shards": 1.25, "findings": 0.01},
    }


def make_run(root: Path, images: list[Shot], findings: list[dict], task: str = "multiclass",
             impressions: bool = False) -> tuple[Path, str]:
    """Write images, commit the tables (the class impressions too when asked) and run.json: a run as
    the flow leaves it."""
    out_dir, run_id, pictures = root / "out", f"r-{task}", root / "pictures"
    pictures.mkdir(parents=True)
    predictions = prediction_rows(pictures, images)
    write_part(predictions, "predictions", out_dir, run_id, "0")
    write_part(explanation_rows(predictions), "explanations", out_dir, run_id, "0")
    if findings:
        write_part(pd.DataFrame(findings), "findings", out_dir, run_id, "0")
    run_dir = out_dir / "runs" / run_id
    run_dir.mkdir(parents=True)
    if impressions:
        write_part(impression_rows(run_dir), "impressions", out_dir, run_id, "0")
    commit_run(out_dir, run_id)
    (run_dir / "run.json").write_text(json.dumps(run_record(run_id, task)))
    return out_dir, run_id


def pdf_text(path: Path) -> tuple[int, str]:
    reader = PdfReader(path)
    return len(reader.pages), " ".join(" ".join(page.extract_text() for page in reader.pages).split())


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out_dir, run_id = make_run(tmp_path_factory.mktemp("report"), MULTICLASS, FINDINGS)
    stale = out_dir / "runs" / run_id / "images" / "stale.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"left by an earlier render")
    render_report(out_dir, run_id)
    return out_dir, run_id


def test_html_and_pdf_show_classes_findings_and_sections(rendered: tuple[Path, str]) -> None:
    out_dir, run_id = rendered
    run_dir = out_dir / "runs" / run_id
    assert (run_dir / "report.html").exists()
    pages, text = pdf_text(run_dir / "report.pdf")
    assert pages >= 2
    for needle in ["visaudit report", "circle", "square", SCRIPT, *SECTIONS, "3 findings: 1 high, 1 medium, 1 low"]:
        assert needle in text
    for finding in FINDINGS:
        assert finding["message"] in text
    assert text.count("confused pair (low confidence)") == 1 and text.count("LOW CONFIDENCE") == 1
    assert "page 2 of" in text
    assert not list(run_dir.glob(".*.tmp"))


def test_findings_are_ordered_most_severe_first(rendered: tuple[Path, str]) -> None:
    out_dir, run_id = rendered
    html = (out_dir / "runs" / run_id / "report.html").read_text()
    positions = [html.index(f"<article class=\"finding severity-{s}\">") for s in ("high", "medium", "low")]
    assert positions == sorted(positions)


def test_user_strings_are_escaped(rendered: tuple[Path, str]) -> None:
    out_dir, run_id = rendered
    html = (out_dir / "runs" / run_id / "report.html").read_text()
    assert "<script>alert" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "a3-<b>bold" not in html and "a3-&lt;b&gt;bold.png" in html
    assert "grass<i>" not in html and "grass&lt;i&gt;" in html
    assert "<image> file" not in html
    _, text = pdf_text(out_dir / "runs" / run_id / "report.pdf")
    assert "a3-<b>bold.png" in text and "grass<i>" in text


def test_figures_only_for_shown_images(rendered: tuple[Path, str]) -> None:
    out_dir, run_id = rendered
    images = out_dir / "runs" / run_id / "images"
    names = {p.name for p in images.glob("*.*")}
    shown = {"a1", "a3", "a4"}  # the evidence and the wrong predictions
    charts = {"confusion-matrix.png", "reliability.png"}  # (trends.png from the second run of a series)
    assert len(names - charts) <= 3 * len(shown)  # thumbnail + two maps each
    assert charts <= names and "stale.png" not in names
    for hidden in ("a0", "a2", "a5", "a6", "broken"):
        assert not any(name.startswith(digest(hidden)) for name in names)
    assert (images / "confusion-matrix.png").stat().st_size < 60_000
    html = (out_dir / "runs" / run_id / "report.html").read_text()
    assert all(f"images/{name}" in html for name in names)


def test_image_deleted_after_the_run_renders_a_placeholder(tmp_path: Path) -> None:
    out_dir, run_id = make_run(tmp_path, MULTICLASS, FINDINGS)
    predictions = read_table(out_dir, "predictions", run_id)
    Path(predictions.loc[predictions["image_id"] == "a1", "uri"].iloc[0]).unlink()
    paths = render_report(out_dir, run_id, pdf=False)
    assert paths.pdf is None
    html = paths.html.read_text()
    assert "image unavailable" in html
    assert not (paths.html.parent / "images" / f"{digest('a1')}.png").exists()


def test_no_findings_and_custom_template_folder(tmp_path: Path) -> None:
    out_dir, run_id = make_run(tmp_path, MULTICLASS, [])
    custom = tmp_path / "templates"
    custom.mkdir()
    (custom / "report.css").write_text("body { color: #123456; }")
    paths = render_report(out_dir, run_id, custom, pdf=False)
    html = paths.html.read_text()
    assert "No findings in this run" in html and "No findings</p>" in html
    assert "#123456" in html


def test_multilabel_run(tmp_path: Path) -> None:
    out_dir, run_id = make_run(tmp_path, MULTILABEL, [], task="multilabel")
    paths = render_report(out_dir, run_id)
    html = paths.html.read_text()
    assert "does not apply" in html
    assert not (paths.html.parent / "images" / "confusion-matrix.png").exists()
    _, text = pdf_text(paths.pdf)
    assert "Recall" in text and "Precision" in text
    rows = {row.name: row for row in class_table(read_table(out_dir, "predictions", run_id), CLASSES, True)}
    # square: labelled on m0, m2, m3; predicted on m0, m1 -> 1 hit, 2 misses, 1 false alarm
    assert rows["square"].images == 3
    assert rows["square"].recall == pytest.approx(1 / 3)
    assert rows["square"].precision == pytest.approx(1 / 2)
    assert rows["square"].errors == 3
    assert rows["circle"].recall == pytest.approx(1.0) and rows["circle"].precision == pytest.approx(3 / 4)


def test_whole_column_helpers_give_what_the_per_cell_ones_give() -> None:
    cells = pd.Series([np.array(["b", "a"], dtype=object), None, np.array([], dtype=object), ["c"], np.nan], dtype=object)
    classes = ["a", "b", "c", "b"]  # a repeated name counts at its last position, as label_matrix has it
    assert (class_matrix(cells, classes) == label_matrix([names(c) for c in cells], tuple(classes))).all()
    assert first_codes(cells, classes).tolist() == [3, -1, -1, 2, -1]
    pairs = attribute_pairs_of(pd.Series([[("k", "1"), ("k", "2"), ("j", None)], None, {"k": "3"}], dtype=object))
    decoded = [(r, pairs.keys[k], None if v < 0 else pairs.values[v]) for r, k, v in zip(pairs.row, pairs.key, pairs.value)]
    assert decoded == [(0, "k", "2"), (0, "j", None), (2, "k", "3")]  # a repeated key keeps its last value, as a dict
    confidence = np.array([0.5, np.nan, 0.9, 0.5, 0.9, 0.1])
    ranked = pd.Series(confidence).sort_values(ascending=False, kind="stable").index.tolist()
    assert [most_confident(confidence, size).tolist() for size in range(8)] == [ranked[:size] for size in range(8)]


@pytest.mark.parametrize("x, y, words", [(0.1, 0.1, "top-left"), (0.5, 0.5, "centre"), (0.9, 0.5, "right"),
                                         (0.5, 0.9, "bottom"), (0.8, 0.2, "top-right")])
def test_position_words(x: float, y: float, words: str) -> None:
    assert position_words(x, y) == words


def test_impression_note_names_a_fixed_position_only_when_real_images_peak_there() -> None:
    from types import SimpleNamespace

    corner = SimpleNamespace(class_name="triangle", layer="layer4", off_centre=True, centroid_x=0.1, centroid_y=0.12)
    peaks = pd.DataFrame({"target": ["triangle"] * 4 + ["circle"] * 4, "layer": "layer4",
                          "peak_x": [0.08, 0.12, 0.15, 0.7] + [0.1] * 4, "peak_y": [0.1, 0.1, 0.2, 0.6] + [0.1] * 4})
    note = impression_note(corner, peaks)
    assert "top-left (x 0.10, y 0.12)" in note and "75% of the 4 real images" in note and "fixed-position cue" in note
    scattered = peaks.assign(peak_x=[0.9, 0.8, 0.5, 0.7] + [0.1] * 4)
    note = impression_note(corner, scattered)
    assert "0% of the 4 real images" in note and "fixed-position" not in note
    assert impression_note(SimpleNamespace(**{**vars(corner), "off_centre": False}), peaks) is None


COLOUR_MESSAGE = (f"A plain image of one colour (RGB 64, 21, 234), with no object at all, is called {SCRIPT} with "
                  "probability 0.96: the model takes that colour as evidence for the class.")
COLOUR_FINDING = dict(kind="colour_shortcut", severity="low", class_name=SCRIPT, slice="rgb=(64, 21, 234)",
                      metric="colour_probability", value=0.964, threshold=0.9, message=COLOUR_MESSAGE,
                      evidence=["a4"], confidence="normal", cause=None)


def impression_rows(run_dir: Path) -> pd.DataFrame:
    """One class impression per class (a plain PNG each), every one with a colour impression."""
    (run_dir / "impressions").mkdir(parents=True)
    rows = []
    for k, name in enumerate(CLASSES):
        path = f"impressions/class-{k}.png"
        Image.new("RGB", (32, 32), (40 * k, 100, 50)).save(run_dir / path)
        rows.append(dict(
            class_name=name, class_index=k, logit=3.0, probability=0.9, start_probability=0.3,
            competitor_name=CLASSES[(k + 1) % 3], competitor_index=(k + 1) % 3, competitor_probability=0.05,
            iterations=50, seed=7, parameters=json.dumps({"objective": "logit"}), image_path=path, layer="layer4",
            height=4, width=4, heatmap=np.linspace(0, 1, 16, dtype=np.float32).tolist(), peak_x=0.5, peak_y=0.5,
            centroid_x=0.5, centroid_y=0.5, centroid_offset=0.0, spread=0.2, off_centre=False,
            colour_r=64, colour_g=21, colour_b=234, colour_probability=0.964 if name == SCRIPT else 0.72,
        ))
    return pd.DataFrame(rows)


def test_colour_notes_are_the_colour_shortcut_findings_messages() -> None:
    findings = pd.DataFrame([*FINDINGS, COLOUR_FINDING])
    assert colour_notes(findings) == {SCRIPT: COLOUR_MESSAGE}
    assert colour_notes(pd.DataFrame(FINDINGS)) == {}


def test_impression_shows_its_class_colour_shortcut_finding(tmp_path: Path) -> None:
    out_dir, run_id = make_run(tmp_path, MULTICLASS, [*FINDINGS, COLOUR_FINDING], impressions=True)
    html = render_report(out_dir, run_id, pdf=False).html.read_text()
    impressions = html[html.index("<h2>Class impressions</h2>"):html.index("<h2>Feature views</h2>")]
    assert impressions.count('<span class="note">') == 1  # the other classes have no colour_shortcut finding
    escaped = COLOUR_MESSAGE.replace("<", "&lt;").replace(">", "&gt;")
    assert f'<span class="note">{escaped}</span>' in impressions and SCRIPT not in impressions
    assert "colour alone: 0.96" in impressions and "colour alone: 0.72" in impressions


def _browser() -> str | None:
    import shutil

    return next((path for name in ("chromium", "chromium-browser", "google-chrome")
                 if (path := shutil.which(name))), None)


@pytest.mark.skipif(_browser() is None, reason="no headless Chromium installed (apt-get install chromium)")
def test_html_opens_in_headless_chromium_with_every_image(rendered: tuple[Path, str], tmp_path: Path) -> None:
    import re
    import subprocess

    out_dir, run_id = rendered
    html_path = out_dir / "runs" / run_id / "report.html"
    sources = re.findall(r'<img[^>]+src="([^"]+)"', html_path.read_text())
    assert sources and all((html_path.parent / src).is_file() for src in sources), "every image is a local file"
    assert not any(src.startswith(("http:", "https:", "//")) for src in sources), "works offline"
    shot = tmp_path / "shot.png"
    subprocess.run(
        [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1100,1600",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", html_path.as_uri()],
        check=True, capture_output=True, timeout=120,
    )
    with Image.open(shot) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50, "the page rendered, not a blank screenshot"


NO_TORCH = """
import importlib.abc, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torch", "torchvision"):
            raise ImportError(f"the report imported {name}")
sys.meta_path.insert(0, NoTorch())
from visaudit.flows.cli import app
app(sys.argv[1:])
"""


def test_visaudit_report_renders_without_torch(rendered: tuple[Path, str]) -> None:
    """A re-render loads no torch (~4 s of imports here): the report reads the tables, not the model."""
    out_dir, run_id = rendered
    done = subprocess.run([sys.executable, "-c", NO_TORCH, "report", run_id, "--out", str(out_dir), "--no-pdf"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "circle" in (out_dir / "runs" / run_id / "report.html").read_text()
