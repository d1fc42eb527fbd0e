"""Explanations under adversarial noise: PGD against a loop written here from Madry et al.'s
update, the budget, Spearman against scipy, and the adversarial_fragility finding on a
fragile model and on two controls (a model robust at small budgets, a constant model)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn

from visaudit.tasks.data.batches import standardise
from visaudit.tasks.data.images import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from visaudit.tasks.explain.adversarial import AttackSettings, attack_and_explain, pgd
from visaudit.tasks.explain.adversarial_output import adversarial_table, strip_rows
from visaudit.tasks.findings.adversarial_fragility import fragile_classes
from visaudit.tasks.findings.thresholds import Thresholds

SIZE = 16
CLASSES = ["red", "green", "blue"]
PRE = Preprocess(SIZE, SIZE)


def to_input(x: torch.Tensor) -> torch.Tensor:
    return standardise(x, PRE)


def fragile_model() -> nn.Module:
    """A conv layer then a dense linear head on every position: a high-dimensional linear
    model, the textbook case of adversarial fragility (Goodfellow et al. 2015)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * SIZE * SIZE, 3)).eval()


class MeanColour(nn.Module):
    """Scores each class by the image's mean of its colour channel minus the others' (x50):
    an L-inf perturbation of eps moves each mean by at most eps, so it cannot flip an image
    whose margin is over 2 eps (robust at small budgets by construction)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 3, 1, bias=False)
        with torch.no_grad():
            self.features.weight.copy_(torch.eye(3).view(3, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        means = self.features(x).mean(dim=(2, 3))
        return 50 * (means - means.mean(dim=1, keepdim=True))


class Constant(nn.Module):
    """Ignores its input: no perturbation can change its prediction."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 3, 1)
        self.logits = nn.Parameter(torch.tensor([0.5, 0.2, 0.1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(1, 2, 3))[:, None] * 0 + self.logits


def squares(per_class: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Grey images with a coloured square (red, green or blue), pixels in [0, 1], and the boxes."""
    rng = np.random.default_rng(seed)
    colours = np.array([[0.86, 0.16, 0.16], [0.16, 0.78, 0.24], [0.16, 0.24, 0.86]])
    images, boxes = [], []
    for k in range(3):
        for _ in range(per_class):
            image = np.full((3, SIZE, SIZE), 0.5) + rng.uniform(-0.05, 0.05, (3, SIZE, SIZE))
            x0, y0 = (int(v) for v in rng.integers(0, SIZE // 2, 2))
            image[:, y0 : y0 + SIZE // 2, x0 : x0 + SIZE // 2] = colours[k][:, None, None]
            images.append(image)
            boxes.append([x0, y0, x0 + SIZE // 2, y0 + SIZE // 2])
    return torch.tensor(np.stack(images), dtype=torch.float32).clamp(0, 1), torch.tensor(boxes, dtype=torch.float32)


def reference_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, alpha: float,
                  start: torch.Tensor) -> torch.Tensor:
    """Madry et al.'s PGD written out: ascend the cross-entropy by alpha * sign(grad), project
    onto the L-inf ball of radius eps around x and onto [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    adv = start.clone()
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = F.cross_entropy(model((adv - mean) / std), y, reduction="sum")
        grad = torch.autograd.grad(loss, adv)[0]
        adv = adv.detach() + alpha * grad.sign()
        adv = torch.clamp(torch.min(torch.max(adv, x - eps), x + eps), 0, 1)
    return adv


@pytest.mark.parametrize("random_start", [False, True])
def test_pgd_matches_the_update_written_out(random_start: bool) -> None:
    model = fragile_model()
    pixels, _ = squares(2)
    target = model(to_input(pixels)).argmax(dim=1)
    eps, steps = 2 / 255, 7
    settings = AttackSettings(epsilons=(eps,), steps=steps, random_start=random_start, seed=3)
    ours = pgd(model, pixels, target, torch.full((len(pixels),), eps), settings, to_input, batch_size=64)
    start = pixels.clone()
    if random_start:
        noise = torch.rand(pixels.shape, generator=torch.Generator().manual_seed(3))
        start = (pixels + (2 * noise - 1) * eps).clamp(0, 1)
    theirs = reference_pgd(model, pixels, target, eps, steps, 2.5 * eps / steps, start)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    fooled_ours = model(to_input(ours)).argmax(dim=1) != target
    assert torch.equal(fooled_ours, model(to_input(theirs)).argmax(dim=1) != target)
    assert fooled_ours.float().mean() >= 0.5, "the fragile model is fooled at 2/255"


def test_budgets_are_respected_and_spearman_matches_scipy() -> None:
    model = fragile_model()
    pixels, boxes = squares(2)
    settings = AttackSettings(steps=5)
    result = attack_and_explain(model, pixels, boxes, "1", settings, to_input, batch_size=5)  # chunks of 5 rows
    assert len(result.image) == len(pixels) * 4
    gap = (result.pixels - pixels[result.image]).abs().amax(dim=(1, 2, 3))
    assert (gap <= result.epsilon + 1e-6).all() and torch.allclose(gap, result.linf)
    assert result.pixels.min() >= 0 and result.pixels.max() <= 1
    table = adversarial_table(result, [f"i{k}" for k in range(len(pixels))], CLASSES,
                              np.full(len(pixels), 0.9), settings, "1", {})
    assert (table["linf"] <= table["epsilon"] + 1e-6).all()
    for row in table.itertuples():
        expected = spearmanr(row.heatmap, row.clean_heatmap).statistic
        if np.isnan(expected):
            assert np.isnan(row.spearman)
        else:
            assert row.spearman == pytest.approx(expected, abs=1e-5)
    assert table["success"].equals(table["adversarial_index"] != table["target_index"])
    assert table.loc[~table["success"], "adversarial_heatmap"].isna().all()
    assert table["pointing_hit_clean"].notna().all(), "every image has a box"
    shown = strip_rows(result).tolist()
    assert len(shown) == len(set(result.image[shown].tolist())), "one strip per fooled image"
    for row in shown:  # the smallest budget that fooled the image
        same = (result.image == result.image[row]) & result.success
        assert result.epsilon[row] == result.epsilon[same].min()


def findings_for(model: nn.Module, epsilons: tuple[float, ...] = (1, 2, 4, 8)) -> tuple[list, pd.DataFrame]:
    pixels, boxes = squares(6)
    settings = AttackSettings(epsilons=tuple(e / 255 for e in epsilons), steps=10)
    result = attack_and_explain(model, pixels, boxes, "features" if hasattr(model, "features") else "1",
                                settings, to_input, batch_size=64)
    with torch.no_grad():
        confidence = model(to_input(pixels)).softmax(dim=1).amax(dim=1).numpy()
    table = adversarial_table(result, [f"i{k}" for k in range(len(pixels))], CLASSES, confidence, settings,
                              "features", {})
    return fragile_classes(table, CLASSES, Thresholds()), table


def test_fragile_model_is_flagged_and_its_message_is_its_numbers() -> None:
    found, table = findings_for(fragile_model())
    assert found, "a dense linear model flips at 2/255"
    tiny = table[table["epsilon"] <= 2 / 255 + 1e-9]
    for finding in found:
        rows = tiny[tiny["target"] == finding.class_name]
        fooled = rows[rows["success"]]["image_id"].nunique()
        n = rows["image_id"].nunique()
        assert finding.value == pytest.approx(fooled / n)
        assert f"{fooled} of {n} attacked '{finding.class_name}' images" in finding.message
        assert set(finding.evidence) <= set(rows[rows["success"]]["image_id"])
        assert finding.kind == "adversarial_fragility" and finding.threshold == 0.5


@pytest.mark.parametrize("control", [MeanColour, Constant])
def test_controls_stay_silent(control: type[nn.Module]) -> None:
    found, table = findings_for(control().eval(), (1, 2, 4, 8, 96))
    assert found == []
    tiny = table[table["epsilon"] <= 2 / 255 + 1e-9]
    assert not tiny["success"].any()
    if control is MeanColour:  # robust only at small budgets: the ladder still shows where it breaks
        assert table["success"].any() and table.loc[table["success"], "epsilon"].min() > 2 / 255
