"""The adversarial-noise section: per original class, the attack's success rate at each PGD
budget with what Grad-CAM of the original class did, and strips of a few fooled images
(image / adversarial image / original-class map on each / adversarial-class map)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from visaudit.tasks.report.examples import Thumb
from visaudit.tasks.report.figures import Painter
from visaudit.tasks.report.formatting import percent, score

STRIPS_PER_CLASS = 2  # fooled images shown per class


@dataclass(frozen=True)
class BudgetRow:
    """One budget of one class: how often the attack flipped the prediction, and the maps."""

    epsilon: str  # "2/255"
    images: int
    success: str  # share of the attacked images whose top-1 changed
    spearman: str  # median rank correlation of the original class's map, adversarial vs clean
    pointing: str  # pointing-game hits of that map on the adversarial images, "k of n" (boxes only)
    confidence: str  # median probability of the adversarial class where the attack succeeded


@dataclass(frozen=True)
class AdversarialStrip:
    """One fooled image at its smallest fooling budget."""

    image_id: str
    caption: str
    thumbs: list[Thumb]


@dataclass(frozen=True)
class AdversarialClass:
    class_name: str
    rows: list[BudgetRow]
    strips: list[AdversarialStrip]


@dataclass(frozen=True)
class AdversarialView:
    """The section: every attacked class, and the attack's settings."""

    classes: list[AdversarialClass]
    images: int
    steps: int
    layer: str


def adversarial_view(table: pd.DataFrame, painter: Painter) -> AdversarialView | None:
    """The section's view, or None when the run attacked no image."""
    if table.empty:
        return None
    classes = [AdversarialClass(str(name), _budget_rows(rows), _strips(rows, painter))
               for name, rows in table.groupby("target", sort=True)]
    return AdversarialView(classes, int(table["image_id"].nunique()), int(table["steps"].iloc[0]),
                           str(table["layer"].iloc[0]))


def _budget_rows(rows: pd.DataFrame) -> list[BudgetRow]:
    out = []
    for epsilon, group in rows.groupby("epsilon", sort=True):
        success = group["success"].astype(bool)
        fooled = group[success.to_numpy()]  # the paper's claim is about images whose prediction changed
        boxed = fooled[fooled["pointing_hit"].notna()]
        rho = fooled["spearman"].dropna()
        out.append(BudgetRow(
            epsilon=f"{float(epsilon) * 255:.3g}/255", images=len(group), success=percent(float(success.mean())),
            spearman=score(rho.median()) if len(rho) else "n/a",
            pointing=f"{int(boxed['pointing_hit'].astype(bool).sum())} of {len(boxed)}" if len(boxed) else "n/a",
            confidence=score(group.loc[success, "adversarial_confidence"].median()) if success.any() else "n/a",
        ))
    return out


def _strips(rows: pd.DataFrame, painter: Painter) -> list[AdversarialStrip]:
    shown = rows[rows["adversarial_path"].notna()].sort_values(["epsilon", "adversarial_confidence"],
                                                               ascending=[True, False], kind="stable")
    strips = []
    for row in shown.head(STRIPS_PER_CLASS).itertuples(index=False):
        def heat(cells: object, h: int = row.height, w: int = row.width) -> np.ndarray:
            return np.asarray(cells, dtype=np.float32).reshape(h, w)

        target, other = row.target, row.adversarial_class
        thumbs = [
            Thumb(row.image_path if (painter.run_dir / row.image_path).is_file() else None, "image"),
            Thumb(row.adversarial_path if (painter.run_dir / row.adversarial_path).is_file() else None,
                  f"adversarial, {float(row.epsilon) * 255:.3g}/255"),
            Thumb(painter.picture_overlay(row.image_path, heat(row.clean_heatmap), "clean"), f"{target}, clean"),
            Thumb(painter.picture_overlay(row.adversarial_path, heat(row.heatmap), "original"),
                  f"{target}, adversarial"),
            Thumb(painter.picture_overlay(row.adversarial_path, heat(row.adversarial_heatmap), "adversarial"),
                  f"{other}, adversarial"),
        ]
        rho = "n/a" if pd.isna(row.spearman) else f"{row.spearman:.2f}"
        caption = (f"{target} ({row.clean_confidence:.2f}) -> {other} ({row.adversarial_confidence:.2f}) at "
                   f"{float(row.epsilon) * 255:.3g}/255; Spearman rho of the {target} maps {rho}")
        strips.append(AdversarialStrip(str(row.image_id), caption, thumbs))
    return strips
