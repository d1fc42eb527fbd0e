"""``shortcut_cue``: near-identical attended content on a fraction of a class (a watermark, a
token at one or several places) that the model takes as the class, confirmed by intervention.

The probes are described in ``cue_probe`` (recurring attended content, paste onto other
classes, remove from the carriers, each against a control patch of equal size); they need
the model, so the flow runs them and passes them in ``FindingInputs.cues``. A class that
``attention_fixed_location`` already flags is left to it (one finding per cause: that
finding is the same mark seen at one spot on most of the class).
"""

from __future__ import annotations

from visaudit.tasks.findings.attention_fixed_location import attention_fixed_location
from visaudit.tasks.findings.cue_probe import CueProbe
from visaudit.tasks.findings.finding import Detector, Finding
from visaudit.tasks.findings.inputs import AuditTables
from visaudit.tasks.findings.thresholds import Thresholds, severity


def _beats(effect: float, control: float, least: float, t: Thresholds) -> bool:
    """Whether an intervention's effect reaches ``least`` and ``cue_control`` x its control's."""
    return effect >= least and effect >= t.cue_control * max(control, 0.0)


def _places(probe: CueProbe) -> str:
    shown = ", ".join(f"({x:.2f}, {y:.2f})" for x, y in probe.places[:4])
    more = f" and {len(probe.places) - 4} more" if len(probe.places) > 4 else ""
    return f"{'one place' if len(probe.places) == 1 else f'{len(probe.places)} places'} (x, y: {shown}{more})"


def shortcut_cue(probes: dict[str, CueProbe], t: Thresholds, explained: frozenset[str] = frozenset()) -> list[Finding]:
    """One finding per probed class whose cue covers at least ``cue_min_share`` of it and whose
    pasting or removal is decisive against its control; classes in ``explained`` are skipped."""
    found = []
    for name, p in sorted(probes.items()):
        if name in explained or p.share < t.cue_min_share:
            continue
        pasted = _beats(p.flip_share, p.control_flip_share, t.cue_flip_share, t)
        removed = _beats(p.drop, p.control_drop, t.cue_drop, t)
        if not (pasted or removed):
            continue
        by_paste = pasted and (not removed or p.flip_share >= p.drop)
        metric, value, threshold = (("flip_share_when_pasted", p.flip_share, t.cue_flip_share) if by_paste
                                    else ("probability_drop_when_removed", p.drop, t.cue_drop))
        paste_text = (f"pasting it onto {p.others} images of other classes at those places turns {p.flip_share:.3f} "
                      f"of them into '{name}' ({p.control_flip_share:.3f} pasting instead equal patches where the model "
                      f"looks on the class's other images)") if p.others else "there were no images of other classes to paste onto"
        found.append(Finding(
            kind="shortcut_cue",
            severity=severity(value, 0.5, 0.3),
            class_name=name,
            slice=f"carriers={len(p.carriers)}/{p.images}",
            metric=metric,
            value=value,
            threshold=threshold,
            message=(
                f"{len(p.carriers)} of {p.images} searched images of '{name}' ({p.share:.0%}) carry near-identical "
                f"content where the model looks: a patch {p.side:.0%} of the image wide at {_places(p)}, its "
                f"crops matching at {p.ratio:.2f}x the distance of unrelated places. It is causal: {paste_text}; "
                f"filling it with its local background on the carriers drops the class's probability by "
                f"{p.drop:.3f} ({p.control_drop:.3f} filling where it looks on the class's other images) and changes {p.removal_flip_share:.0%} "
                f"of their predictions. The model takes this watermark, tag or token as '{name}': remove it "
                f"from the training images, or put it on images of every class."
            ),
            evidence=p.carriers[: t.evidence],
        ))
    return found


def _detect(tables: AuditTables, t: Thresholds) -> list[Finding]:
    """The detector on a run's tables: classes flagged by attention_fixed_location are explained."""
    explained = frozenset(f.class_name for f in attention_fixed_location(*tables.locations, t)) if tables.locations else frozenset()
    return shortcut_cue(tables.cues, t, explained)


DETECTOR = Detector(kind="shortcut_cue", detect=_detect, needs=("cues",), map_based=True)
