"""``attention_fixed_location``: a class whose evidence is the same small thing at the same place.

The three tests are described in ``fixed_location`` (peaks cluster, same content,
the model depends on it); the candidates and their probes need the model, so the flow
computes them and passes them in ``FindingInputs.locations``. This detector flags the
candidates whose probes confirm a same-content, decisive spot.
"""

from __future__ import annotations

from visaudit.tasks.findings.finding import Detector, Finding
from visaudit.tasks.findings.probe_records import LocationCandidate, LocationProbe
from visaudit.tasks.findings.thresholds import Thresholds, severity


def attention_fixed_location(
    candidates: list[LocationCandidate], probes: dict[str, LocationProbe], t: Thresholds
) -> list[Finding]:
    """One finding per candidate whose probe finds a near-constant patch whose muting is decisive."""
    found = []
    for c in candidates:
        probe = probes.get(c.class_name)
        if probe is None:
            continue
        same_content = probe.patch_ratio <= t.fixed_location_patch_ratio
        decisive = probe.drop >= t.fixed_location_drop and probe.drop >= t.fixed_location_control * max(probe.control_drop, 0.0)
        if not (same_content and decisive):
            continue
        found.append(Finding(
            kind="attention_fixed_location",
            severity=severity(probe.drop, 0.4, 0.25),
            class_name=c.class_name,
            slice=f"spot=({probe.x:.2f}, {probe.y:.2f})",
            metric="probability_drop_when_muted",
            value=probe.drop,
            threshold=t.fixed_location_drop,
            message=(
                f"For '{c.class_name}', {c.share:.0%} of the Grad-CAM peaks ({c.images} images) fall in one "
                f"spot (x {c.x:.2f}, y {c.y:.2f} of the image), and beside it, at x {probe.x:.2f}, "
                f"y {probe.y:.2f}, a patch {probe.side:.0%} of the image wide is nearly the same in every "
                f"image (spread {probe.patch_ratio:.2f}x that of patches elsewhere). Muting that patch drops "
                f"the class's probability by {probe.drop:.2f} on average ({probe.control_drop:.2f} "
                f"muting elsewhere) and changes {probe.flip_share:.0%} of the class's predictions "
                f"({probe.images} images probed). The model recognises this class by a mark, tag or "
                "watermark at a fixed place, not by the object: remove the mark from the training images "
                f"of '{c.class_name}', or add it to images of other classes."
            ),
            evidence=c.sample_ids[: t.evidence],
        ))
    return found


DETECTOR = Detector(
    kind="attention_fixed_location",
    detect=lambda tables, t: attention_fixed_location(*tables.locations, t),
    needs=("locations",),
    map_based=True,
    support="intervention",
)
