"""What the detectors read: the run's tables as given (:class:`FindingInputs`) and as the
detectors see them (:class:`AuditTables`: readable images only, maps of the explained layer)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd

from visaudit.tasks.findings.fixed_location import LocationCandidate, LocationProbe

if TYPE_CHECKING:
    from visaudit.tasks.findings.cue_probe import CueProbe

Locations = tuple[list[LocationCandidate], dict[str, LocationProbe]]


@dataclass(frozen=True)
class FindingInputs:
    """The tables of one run that findings are computed from.

    ``layer`` is the explained layer: attention is judged on its maps (not on the shallow
    stages of a layer-by-layer run). ``signals`` (per-image embeddings, probabilities and
    properties), ``occlusion``, ``metrics`` (the sanity check's rows) and ``impressions``
    (colour impressions) feed the detectors that need them; ``locations`` are the
    fixed-location candidates with their probe results by class and ``cues`` the
    shortcut-cue probes by class (both need the model, so the flow runs them);
    ``adversarial`` the PGD experiment's rows. A detector whose input is missing is skipped.
    """

    predictions: pd.DataFrame
    explanations: pd.DataFrame
    classes: list[str]
    multi_label: bool
    layer: str | None
    signals: pd.DataFrame | None = None
    occlusion: pd.DataFrame | None = None
    metrics: pd.DataFrame | None = None
    impressions: pd.DataFrame | None = None
    locations: Locations | None = None
    cues: dict[str, CueProbe] | None = None
    adversarial: pd.DataFrame | None = None

    def tables(self) -> AuditTables:
        """The inputs as the detectors read them."""
        explanations = self.explanations
        if self.layer is not None and not explanations.empty:
            explanations = explanations[explanations["layer"] == self.layer]
        return AuditTables(
            audited=self.predictions[self.predictions["error"].isna()],
            explanations=explanations,
            classes=self.classes,
            multi_label=self.multi_label,
            layer=self.layer,
            signals=self.signals if self.signals is not None else pd.DataFrame(),
            occlusion=self.occlusion,
            metrics=self.metrics,
            impressions=self.impressions,
            locations=self.locations,
            cues=self.cues,
            adversarial=self.adversarial,
        )


@dataclass(frozen=True)
class AuditTables:
    """:class:`FindingInputs` prepared once for every detector: ``audited`` holds the readable
    images' predictions, ``explanations`` the maps of the explained layer (every map when no
    layer is named), ``signals`` is empty when absent; the rest as given."""

    audited: pd.DataFrame
    explanations: pd.DataFrame
    classes: list[str]
    multi_label: bool
    layer: str | None
    signals: pd.DataFrame
    occlusion: pd.DataFrame | None
    metrics: pd.DataFrame | None
    impressions: pd.DataFrame | None
    locations: Locations | None
    cues: dict[str, CueProbe] | None
    adversarial: pd.DataFrame | None = None

    def has(self, name: str) -> bool:
        """Whether input ``name`` is present: not None and, for a table, not empty."""
        value = getattr(self, name)
        return value is not None and not (isinstance(value, pd.DataFrame) and value.empty)


def true_class(audited: pd.DataFrame) -> pd.Series:
    """The single label of each image (multi-class data), None when it has zero or several."""
    return audited["labels"].map(lambda labels: labels[0] if labels is not None and len(labels) == 1 else None)
