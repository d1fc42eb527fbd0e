"""Same-cause findings: linked by shared evidence images, led by the strongest kind of evidence."""

from __future__ import annotations

import pandas as pd
import test_findings_general as general

from visaudit.tasks.findings.causes import cause_label, link_causes
from visaudit.tasks.findings.compute import FindingInputs, Thresholds, compute_findings, detect_all
from visaudit.tasks.findings.finding import Finding
from visaudit.tasks.findings.registry import DETECTORS
from visaudit.tasks.report.overview import finding_view


def _row(kind: str, evidence: list[str], class_name: str | None = "hospital", slice_: str | None = None) -> Finding:
    return Finding(kind=kind, severity="medium", class_name=class_name, slice=slice_, metric="m", value=0.5,
                   threshold=0.1, message=f"{kind} says so.", evidence=tuple(evidence))


TOKEN = [f"t{k}" for k in range(8)]


def test_the_intervention_leads_and_the_others_say_they_are_its_symptoms() -> None:
    found = [
        _row("shortcut_property", TOKEN[:6], slice_="property=border_r"),
        _row("group_gap", TOKEN[2:8], slice_="token=yes"),
        _row("shortcut_cue", TOKEN, slice_="carriers=8/16"),
        _row("near_duplicate", TOKEN[:4], class_name=None, slice_="within split"),  # copies: a cause of its own
        _row("confident_error", ["x1", "x2", "x3", TOKEN[0]]),  # shares one image: not linked
        _row("slice_gap", TOKEN[:6], class_name=None, slice_="camera=old"),  # no class: a slice is a cause of its own
        _row("confused_pair", TOKEN[:6], class_name="other"),  # another class's
    ]
    out = link_causes(found, DETECTORS)
    lead = cause_label(found[2])
    assert lead == "shortcut_cue on 'hospital' (carriers=8/16)"
    assert [f.cause for f in out] == [lead, lead, lead, None, None, None, None]
    assert out[3:] == found[3:]
    assert "shortcut_property on 'hospital' (property=border_r) (6 shared)" in out[2].message
    assert "group_gap on 'hospital' (token=yes) (6 shared)" in out[2].message
    assert "an intervention on the model confirms it" in out[2].message
    for f, shared in ((out[0], 6), (out[1], 6)):
        assert f.message.startswith(f"{f.kind} says so. Same cause as {lead}: {shared} of this finding's")
        assert "the explanation the evidence supports" in f.message
    views = [finding_view(pd.Series(f.to_row()), [], painter=None) for f in out]  # the report's measure line
    assert views[0].measure.endswith(f"; one cause, explained by {lead}")
    assert views[2].measure.endswith("; one cause with other findings, best explained here")
    assert "one cause" not in views[3].measure


def test_a_comparison_on_metadata_leads_an_association() -> None:
    out = link_causes([_row("error_slice", TOKEN[:5]), _row("group_gap", TOKEN[:8], slice_="site=b")], DETECTORS)
    assert {f.cause for f in out} == {"group_gap on 'hospital' (site=b)"}
    assert "an interval on named metadata" in out[0].message


def test_tested_label_errors_lead_the_confident_errors_they_explain() -> None:
    out = link_causes([_row("confident_error", TOKEN[:4]), _row("likely_label_error", TOKEN, slice_="suggested=x")],
                      DETECTORS)
    assert {f.cause for f in out} == {"likely_label_error on 'hospital' (suggested=x)"}
    assert "labels more surprising than model errors explain" in out[0].message


def test_a_group_shift_links_the_errors_it_explains() -> None:
    audited, signals, _ = general._birds()
    found = detect_all(FindingInputs(audited, pd.DataFrame(), general.BIRDS, multi_label=False, layer=None,
                                     signals=signals), Thresholds())
    gap = next(f for f in found if f.kind == "group_gap")
    explained = [f for f in found if (f.slice or "").startswith("explained=")]
    assert explained and gap.cause == cause_label(gap)
    assert all(f.cause == gap.cause and "Same cause as" not in f.message for f in explained)
    table = compute_findings(FindingInputs(audited, pd.DataFrame(), general.BIRDS, multi_label=False, layer=None,
                                           signals=signals), Thresholds())
    assert (table.loc[table["kind"] == "group_gap", "cause"] == gap.cause).all()


def test_links_are_not_transitive() -> None:
    """A shares images with B and B with C, A and C share none: C is not A's cause's member."""
    make = lambda kind, images, where=None: Finding(  # noqa: E731
        kind=kind, severity="medium", class_name="x", slice=where, metric="m", value=1.0, threshold=0.0,
        message=kind, evidence=tuple(images))
    found = link_causes([make("group_gap", "1234", "place=land"), make("confident_error", "3456"),
                         make("shortcut_property", "5678", "mean_b")], DETECTORS)
    by_kind = {f.kind: f for f in found}
    lead = by_kind["group_gap"].cause
    assert lead and by_kind["confident_error"].cause == lead
    assert by_kind["shortcut_property"].cause != lead and "Same cause as group_gap" not in by_kind["shortcut_property"].message
    assert "(0 shared)" not in by_kind["group_gap"].message
