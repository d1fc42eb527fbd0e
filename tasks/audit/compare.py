"""Two committed runs on the same data (two models, or two nights of one model), compared.

- flips: the images judged by both whose verdict changed, ``fixed`` (wrong in A, right in
  B) and ``broken`` (right in A, wrong in B), with each run's prediction and confidence;
- accuracy change, overall and per true class, with the paired interval and McNemar's test
  (``findings.paired``);
- findings appeared, resolved and kept, matched on kind and subject (class, else slice);
- how far the explanations moved on the images both got right (``audit.map_shift``).

Images are matched on ``image_id`` (a hash of the location): runs on other data share none
and are refused. The comparison is stored as ``tables/comparisons`` (one partition per
comparison, ``run_id`` = :func:`comparison_id`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from visaudit.tasks.audit.gate import finding_subject
from visaudit.tasks.audit.map_shift import MAP_COLUMNS, ShiftSummary, map_shift
from visaudit.tasks.audit.record import RunRecord
from visaudit.tasks.data import storage
from visaudit.tasks.data.schema import SCHEMAS
from visaudit.tasks.findings.metrics import judged_rows
from visaudit.tasks.findings.paired import PairedChange, paired_change

COMPARISON_TABLE = "comparisons"


@dataclass(frozen=True)
class ClassChange:
    """The accuracy change of one true class (``class_name`` None: every image)."""

    class_name: str | None
    change: PairedChange


@dataclass(frozen=True)
class FindingChange:
    """One finding (kind, subject) and what became of it from A to B."""

    kind: str
    subject: str
    status: str  # appeared, resolved, kept
    severity_a: str | None
    severity_b: str | None
    value_a: float | None
    value_b: float | None
    message: str


@dataclass(frozen=True)
class Comparison:
    """Run B against run A (the change is B minus A)."""

    run_a: str
    run_b: str
    images_a: int
    images_b: int
    shared: int  # images audited (readable) in both
    overall: PairedChange
    classes: list[ClassChange]
    flips: pd.DataFrame  # image_id, uri, label, status, predicted_a/b, confidence_a/b
    findings: list[FindingChange]
    shifts: pd.DataFrame  # image_id, method, layer, target, spearman (most moved first)
    shift_summary: list[ShiftSummary]

    @property
    def comparison_id(self) -> str:
        return comparison_id(self.run_a, self.run_b)


def comparison_id(run_a: str, run_b: str) -> str:
    """The comparison's name: its folder under ``comparisons/`` and its table partition."""
    return f"{run_a}_vs_{run_b}"


def first_label(cell: object) -> str:
    return str(list(cell)[0]) if cell is not None and len(cell) else ""  # type: ignore[arg-type]


def top_prediction(cell: object) -> str:
    return ";".join(str(v) for v in cell) if cell is not None else ""  # type: ignore[union-attr]


def paired_predictions(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """The images judged in both runs, one row each, with both runs' verdicts."""
    columns = ["image_id", "uri", "labels", "predicted", "confidence", "correct"]
    pairs = judged_rows(a)[columns].merge(judged_rows(b)[columns[:1] + columns[3:]], on="image_id",
                                          suffixes=("_a", "_b"))
    pairs["label"] = pairs["labels"].map(first_label)
    pairs["correct_a"] = pairs["correct_a"].astype(bool)
    pairs["correct_b"] = pairs["correct_b"].astype(bool)
    return pairs.sort_values("image_id", kind="stable").reset_index(drop=True)


def flips(pairs: pd.DataFrame) -> pd.DataFrame:
    """The images whose verdict changed: broken first, then fixed, the most confident error first."""
    changed = pairs[pairs["correct_a"] != pairs["correct_b"]].copy()
    changed["status"] = np.where(changed["correct_b"], "fixed", "broken")
    changed["predicted_a"] = changed["predicted_a"].map(top_prediction)
    changed["predicted_b"] = changed["predicted_b"].map(top_prediction)
    wrong_confidence = np.where(changed["correct_b"], changed["confidence_a"], changed["confidence_b"])
    changed = changed.assign(_order=changed["status"].eq("fixed").astype(int), _confidence=-wrong_confidence)
    changed = changed.sort_values(["_order", "_confidence", "image_id"], kind="stable")
    return changed[["image_id", "uri", "label", "status", "predicted_a", "confidence_a", "predicted_b",
                    "confidence_b"]].reset_index(drop=True)


def class_changes(pairs: pd.DataFrame, multi_label: bool) -> list[ClassChange]:
    """Per true class (multi-class runs), the paired accuracy change, classes in name order."""
    if multi_label:
        return []
    return [ClassChange(str(name), paired_change(rows["correct_a"].to_numpy(), rows["correct_b"].to_numpy()))
            for name, rows in pairs.groupby("label", sort=True)]


def finding_changes(a: pd.DataFrame, b: pd.DataFrame) -> list[FindingChange]:
    """Findings matched on (kind, subject): appeared in B, resolved since A, or kept."""

    def keyed(findings: pd.DataFrame) -> dict[tuple[str, str], pd.Series]:
        return {(str(row["kind"]), finding_subject(row["class_name"], row["slice"])): row
                for _, row in findings.iterrows()}

    before, after = keyed(a), keyed(b)
    out = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        status = "kept" if old is not None and new is not None else "appeared" if new is not None else "resolved"
        shown = new if new is not None else old
        assert shown is not None
        out.append(FindingChange(
            kind=key[0], subject=key[1], status=status,
            severity_a=None if old is None else str(old["severity"]), severity_b=None if new is None else str(new["severity"]),
            value_a=None if old is None or pd.isna(old["value"]) else float(old["value"]),
            value_b=None if new is None or pd.isna(new["value"]) else float(new["value"]),
            message=str(shown["message"]),
        ))
    order = {"appeared": 0, "resolved": 1, "kept": 2}
    return sorted(out, key=lambda f: order[f.status])


def compare_runs(out_dir: Path, run_a: str, run_b: str) -> Comparison:
    """Compare two committed runs of ``out_dir``; a ValueError when they share no audited image."""
    out_dir = Path(out_dir)
    records = {}
    for run in (run_a, run_b):
        records[run] = RunRecord.load(out_dir / "runs" / run)
    preds = {run: storage.read_table(out_dir, "predictions", run) for run in (run_a, run_b)}
    pairs = paired_predictions(preds[run_a], preds[run_b])
    if pairs.empty:
        raise ValueError(f"runs {run_a} and {run_b} share no audited image (image ids are hashes of the images' "
                         "locations): compare two runs on the same data")
    multi_label = records[run_a].multi_label or records[run_b].multi_label
    both_right = pairs.loc[pairs["correct_a"] & pairs["correct_b"], "image_id"].tolist()
    maps = {run: storage.read_table(out_dir, "explanations", run, columns=MAP_COLUMNS) for run in (run_a, run_b)}
    shifts, summary = map_shift(maps[run_a], maps[run_b], both_right)
    findings = {run: storage.read_table(out_dir, "findings", run) for run in (run_a, run_b)}
    return Comparison(
        run_a=run_a, run_b=run_b, images_a=len(preds[run_a]), images_b=len(preds[run_b]), shared=len(pairs),
        overall=paired_change(pairs["correct_a"].to_numpy(), pairs["correct_b"].to_numpy()),
        classes=class_changes(pairs, multi_label), flips=flips(pairs),
        findings=finding_changes(findings[run_a], findings[run_b]), shifts=shifts, shift_summary=summary,
    )


def comparison_frame(comparison: Comparison) -> pd.DataFrame:
    """The comparison as ``comparisons`` rows (long format; ``section`` says what a row is)."""
    base = {"run_a": comparison.run_a, "run_b": comparison.run_b}
    rows = []
    for item in [ClassChange(None, comparison.overall), *comparison.classes]:
        c = item.change
        rows.append(base | dict(section="accuracy", class_name=item.class_name, value_a=c.accuracy_a,
                                value_b=c.accuracy_b, change=c.change, low=c.low, high=c.high, p_value=c.p_value,
                                images=c.images, fixed=c.fixed, broken=c.broken, detail=c.test))
    for flip in comparison.flips.itertuples():
        rows.append(base | dict(section="flip", status=flip.status, image_id=flip.image_id, class_name=flip.label,
                                value_a=flip.confidence_a, value_b=flip.confidence_b,
                                detail=f"{flip.predicted_a} -> {flip.predicted_b}"))
    for finding in comparison.findings:
        rows.append(base | dict(section="finding", status=finding.status, kind=finding.kind,
                                class_name=finding.subject or None, value_a=finding.value_a, value_b=finding.value_b,
                                detail=finding.message))
    for shift in comparison.shifts.itertuples():
        rows.append(base | dict(section="explanation", image_id=shift.image_id, method=shift.method,
                                layer=shift.layer, class_name=shift.target, value=shift.spearman))
    for s in comparison.shift_summary:
        rows.append(base | dict(section="explanation_summary", method=s.method, layer=s.layer, value=s.median,
                                images=s.images, detail=f"{s.moved} moved (rho < 0.5), {s.unmatched} of other sizes"))
    frame = pd.DataFrame(rows, columns=SCHEMAS[COMPARISON_TABLE].names)
    for column in ("images", "fixed", "broken"):
        frame[column] = frame[column].astype("Int32")
    return frame


def write_comparison(out_dir: Path, comparison: Comparison) -> None:
    """Store the comparison as its own partition of ``tables/comparisons`` (replacing an earlier one)."""
    name = comparison.comparison_id
    storage.write_part(comparison_frame(comparison), COMPARISON_TABLE, Path(out_dir), name, "00000")
    storage.commit_run(Path(out_dir), name, [COMPARISON_TABLE])
