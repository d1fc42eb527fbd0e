"""Same-cause findings: when two detectors flag the same images, one cause, and which explanation the evidence supports.

A shortcut token can raise ``shortcut_cue`` (pasting it turns other images), ``shortcut_property``
(a border colour follows it) and ``group_gap`` (the images without it fail) at once; a group
shift makes errors that look like label errors. Findings are linked when they are about the same class
and their evidence shares images: at least two, and at least half of the smaller evidence
list. A finding on no class (a slice of the data, copies) is never linked: evidence lists
that start with the errors share images by chance (on the demo, the old-camera slice and
the blue-background shortcut of `circle` share 4 of 8 images while they are two causes). Each linked set
(connected through such pairs) is one cause. Its lead is the finding whose evidence is
strongest, by its detector's ``support`` (``finding.SUPPORTS``): an intervention on the model
(pasting, muting, a plain-colour probe) over a tested comparison (an interval on a group or
slice of named metadata; label errors, raised only when the labels are more surprising than
the model's errors explain) over an association (a property that predicts the class, a
cluster, a confident error); ties go to the registry's order. Every member gets the lead's
``cause`` label ("kind on class, slice"); the lead's message names the other detectors, the
others' say which explanation the evidence supports. Detectors whose ``support`` is None
(copies, map faithfulness, class counts: causes of their own) are never linked. A row its
detector already marked ``explained=KIND`` (label errors in a failing group: its message says
so) is linked to that kind's finding sharing most of its images, label only.
"""

from __future__ import annotations

from dataclasses import replace

from visaudit.tasks.findings.finding import SUPPORTS, Detector, Finding

MIN_SHARED = 2  # images two findings must share to be linked ...
MIN_SHARED_SHARE = 0.5  # ... and this share of the smaller evidence list

_WHY = {
    "intervention": "an intervention on the model confirms it",
    "comparison": "it rests on a test: an interval on named metadata, or labels more surprising than model errors explain",
    "association": "it is the more direct of two associations",
}


def finding_name(kind: str, class_name: str | None, slice_text: str | None) -> str:
    """How a finding is named as a cause: "kind on 'class' (slice)"."""
    where = f" on '{class_name}'" if class_name else ""
    return f"{kind}{where}" + (f" ({slice_text})" if slice_text else "")


def cause_label(finding: Finding) -> str:
    """The name of ``finding`` as a cause (:func:`finding_name`)."""
    return finding_name(finding.kind, finding.class_name, finding.slice)


def _shared(a: Finding, b: Finding, images_a: frozenset[str], images_b: frozenset[str]) -> int:
    """Images both findings' evidence lists name (``images_a``, ``images_b``: their evidence as
    sets), when they are about one class and that is enough to link them (else 0)."""
    if a.class_name is None or a.class_name != b.class_name:
        return 0
    common = len(images_a & images_b)
    smaller = min(len(images_a), len(images_b))
    return common if common >= MIN_SHARED and common >= MIN_SHARED_SHARE * smaller else 0


def link_causes(found: list[Finding], detectors: tuple[Detector, ...]) -> list[Finding]:
    """``found`` with every finding of a linked set carrying its lead's ``cause`` and messages
    saying which explanation the evidence supports; unlinked findings are returned unchanged."""
    support = {d.kind: d.support for d in detectors}
    rank = {d.kind: i for i, d in enumerate(detectors)}
    explained = {i: f.slice.removeprefix("explained=") for i, f in enumerate(found)
                 if (f.slice or "").startswith("explained=")}
    linkable = [i for i, f in enumerate(found) if support.get(f.kind) is not None and i not in explained]
    images = [frozenset(f.evidence) for f in found]  # each evidence list as a set, built once

    def common(i: int, j: int) -> int:
        """Images the evidence of findings i and j shares."""
        return len(images[i] & images[j])

    parent = {i: i for i in linkable}

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for n, i in enumerate(linkable):
        for j in linkable[n + 1:]:
            if found[i].kind != found[j].kind and _shared(found[i], found[j], images[i], images[j]):
                parent[root(i)] = root(j)
    sets: dict[int, list[int]] = {}
    for i in linkable:
        sets.setdefault(root(i), []).append(i)
    out = list(found)
    for members in (m for m in sets.values() if len({found[i].kind for i in m}) > 1):
        lead_at = min(members, key=lambda i: (SUPPORTS.index(support[found[i].kind]), rank[found[i].kind]))
        lead = found[lead_at]
        # links are not transitive
        members = [i for i in members if i == lead_at or _shared(lead, found[i], images[lead_at], images[i])]
        others = [i for i in members if i != lead_at]
        if not others:
            continue
        label = cause_label(lead)
        out[lead_at] = replace(out[lead_at], cause=label, message=(
            f"{lead.message} One cause: the same images also raise "
            + "; ".join(f"{cause_label(found[i])} ({common(i, lead_at)} shared)" for i in others)
            + f"; this finding's evidence is the strongest ({_WHY[support[lead.kind]]})."))
        for i in members:
            if i == lead_at:
                continue
            f = found[i]
            stronger = SUPPORTS.index(support[lead.kind]) < SUPPORTS.index(support[f.kind])
            out[i] = replace(f, cause=label, message=(
                f"{f.message} Same cause as {label}: {common(i, lead_at)} of this finding's "
                "evidence images are its too, and "
                + (f"that finding's evidence is stronger ({_WHY[support[lead.kind]]}): it is the explanation the "
                   "evidence supports, and this finding a symptom of it." if stronger else
                   "both rest on evidence of the same kind: read them together as one cause.")))
    for i, kind in explained.items():  # after the sets: an owner linked to a stronger finding passes its cause on
        # the row was set aside by the same failing groups (or clusters) its owner reports; one group_gap
        # finding covers every failing group of an attribute, whatever their classes
        owners = [j for j in linkable if found[j].kind == kind]
        if owners:
            j = max(owners, key=lambda j: (common(i, j), found[j].class_name == found[i].class_name))
            cause = out[j].cause or cause_label(found[j])
            out[i], out[j] = replace(out[i], cause=cause), replace(out[j], cause=cause)
    return out
