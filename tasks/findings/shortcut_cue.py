"""``shortcut_cue``: near-identical content on a fraction of a class (a watermark, a token at
one or several places) that the model takes as the class, confirmed by intervention.

The probes are described in ``cue_probe`` (recurring content; pasting it onto other
classes, which decides; removing it from the carriers, reported; each against the class's
ordinary attended content as the control); they need
the model, so the flow runs them and passes them in ``FindingInputs.cues``. A class that
``attention_fixed_location`` already flags is left to it (one finding per cause: that
finding is the same mark seen at one spot on most of the class).
"""

from __future__ import annotations

from visaudit.tasks.findings.attention_fixed_location import attention_fixed_location
from visaudit.tasks.findings.finding import Detector, Finding
from visaudit.tasks.findings.inputs import AuditTables
from visaudit.tasks.findings.probe_records import CueProbe
from visaudit.tasks.findings.thresholds import Thresholds, severity


def _places(probe: CueProbe) -> str:
    shown = ", ".join(f"({x:.2f}, {y:.2f})" for x, y in probe.places[:4])
    more = f" and {len(probe.places) - 4} more" if len(probe.places) > 4 else ""
    return f"{'one place' if len(probe.places) == 1 else f'{len(probe.places)} places'} (x, y: {shown}{more})"


def shortcut_cue(probes: dict[str, CueProbe], t: Thresholds, explained: frozenset[str] = frozenset()) -> list[Finding]:
    """One finding per probed class whose cue covers at least ``cue_min_share`` of it and whose
    pasting turns other classes' images to it, at least ``cue_flip_share`` of them and
    ``cue_control`` x the control's share; classes in ``explained`` are skipped."""
    found = []
    for name, p in sorted(probes.items()):
        if name in explained or p.share < t.cue_min_share:
            continue
        if not (p.flip_share >= t.cue_flip_share and p.flip_share >= t.cue_control * max(p.control_flip_share, 0.0)):
            continue
        found.append(Finding(
            kind="shortcut_cue",
            severity=severity(p.flip_share, 0.5, 0.3),
            class_name=name,
            slice=f"carriers={len(p.carriers)}/{p.images}",
            metric="flip_share_when_pasted",
            value=p.flip_share,
            threshold=t.cue_flip_share,
            message=(
                f"{len(p.carriers)} of {p.images} searched images of '{name}' ({p.share:.0%}) carry near-identical "
                f"content: a patch {p.side:.0%} of the image wide at {_places(p)}, its "
                f"crops matching at {p.ratio:.2f}x their own contrast. It is causal: pasting it onto {p.others} "
                f"images of other classes at those places turns {p.flip_share:.3f} of them into '{name}' "
                f"({p.control_flip_share:.3f} pasting instead the patch most like it in the class's other images, "
                f"its look-alikes); filling it with its local background on the carriers drops the class's "
                f"probability by {p.drop:.3f} ({p.control_drop:.3f} filling the look-alikes) and changes "
                f"{p.removal_flip_share:.0%} of their predictions. The model takes this watermark, tag or token as '{name}': remove it "
                f"from the training images, or put it on images of every class."
            ),
            evidence=p.carriers[: t.evidence],
        ))
    return found


def _detect(tables: AuditTables, t: Thresholds) -> list[Finding]:
    """The detector on a run's tables: classes flagged by attention_fixed_location are explained."""
    explained = frozenset(f.class_name for f in attention_fixed_location(*tables.locations, t)) if tables.locations else frozenset()
    return shortcut_cue(tables.cues, t, explained)


DETECTOR = Detector(kind="shortcut_cue", detect=_detect, needs=("cues",), support="intervention")
