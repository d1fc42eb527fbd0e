"""shortcut_cue: a stamp on a fraction of a class, at several places, found from each image's
own peak and confirmed by pasting and removing it on a tiny model that reads the stamp."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import torch

from visaudit.tasks.findings.cue_probe import (
    CueSample,
    _best_match,
    _fine_match,
    _windows,
    cue_metric_rows,
    fill_background,
    find_cue,
    paste,
    probe_cue,
    probe_cues,
)
from visaudit.tasks.findings.probe_records import LocationCandidate, LocationProbe
from visaudit.tasks.findings.shortcut_cue import shortcut_cue
from visaudit.tasks.findings.thresholds import Thresholds

S = 32
MARK = torch.zeros(3, 6, 6)
MARK[:, 1:5, 1:5] = 1.0
MARK[:, 2:4, 2:4] = -1.0
CORNERS = ((2, 2), (24, 24), (2, 24))  # the stamp's top-left corners, in pixels


def _backgrounds(n: int, seed: int) -> torch.Tensor:
    """Smooth random images (upsampled 8x8 noise) with a little pixel noise, in [-0.5, 0.5]."""
    g = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=(S, S), mode="bilinear")
    return smooth - 0.5 + 0.1 * torch.rand(n, 3, S, S, generator=g)


def _stamped(n: int = 40, carriers: int = 12, seed: int = 0) -> torch.Tensor:
    """A class: ``carriers`` images with the stamp at one of three places, the rest without."""
    x = _backgrounds(n, seed)
    for i in range(carriers):
        cx, cy = CORNERS[i % 3]
        x[i, :, cy : cy + 6, cx : cx + 6] = MARK
    return x


class StampReader(torch.nn.Module):
    """Class 0 when the stamp's pattern is anywhere in the image (a matched filter), else class 1
    (``reads=False``: the same logits from the mean colour only, blind to the stamp)."""

    def __init__(self, reads: bool = True) -> None:
        super().__init__()
        self.reads = reads
        self.filter = torch.nn.Conv2d(3, 1, 6, bias=False)
        with torch.no_grad():
            self.filter.weight.copy_(MARK.unsqueeze(0) / MARK.abs().sum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        response = self.filter(x).amax(dim=(1, 2, 3)) if self.reads else x.mean(dim=(1, 2, 3))
        return torch.stack([20 * (response - 0.6), torch.zeros_like(response)], dim=1)


def _sample(n: int) -> CueSample:
    return CueSample("stamped", tuple(f"s{k:03d}" for k in range(n)))


def test_find_cue_finds_every_carrier_at_its_own_place() -> None:
    x = _stamped()
    match = find_cue(x, Thresholds().cue_match_ratio)
    assert sorted(match.members.tolist()) == list(range(12))
    for member, corner in zip(match.members, match.corners[match.members]):  # each carrier's 8-px crop holds its 6-px stamp
        stamp = np.array(CORNERS[member % 3])
        assert (corner <= stamp).all() and (stamp + 6 <= corner + 8).all()
    assert match.ratio < 0.5 and match.side == 8


def test_fine_match_in_chunks_equals_one_pass() -> None:
    """The fine-stride match, a few images at a time, gives every image's best distance and
    window exactly as one pass over all the windows."""
    x = _stamped(n=10, carriers=4)
    anchor = _windows(x[:1], 8, 2)[0, 5:6]
    whole = _best_match(anchor, _windows(x, 8, 1))
    chunked = _fine_match(anchor, x, 8, 1, budget=3 * 8 * 8 * 25 * 25 * 4 * 3)  # three images per chunk
    assert torch.allclose(chunked[0], whole[0], atol=1e-6) and torch.equal(chunked[1], whole[1])
    assert chunked[0].shape == (1, 10) and float(chunked[0][0, 0]) < 1e-4  # the anchor found in its own image


def test_varying_strokes_at_the_centre_are_not_a_cue() -> None:
    """A centred subject whose shape varies (random strokes through the centre) has no carriers."""
    rng = np.random.default_rng(1)
    x = _backgrounds(40, 1)
    for i in range(40):
        for _ in range(3):
            r0, c0 = rng.integers(10, 22, 2)
            length = int(rng.integers(4, 9))
            if rng.random() < 0.5:
                x[i, :, r0, c0 : c0 + length] = 1.0
            else:
                x[i, :, r0 : r0 + length, c0] = 1.0
    match = find_cue(x, Thresholds().cue_match_ratio)
    assert match is None or len(match.members) < 0.2 * 40


def test_paste_and_fill_change_only_the_square() -> None:
    x = _backgrounds(2, 3)
    corners = np.array([[4, 6], [20, 0]])
    pasted = paste(x, MARK.expand(2, -1, -1, -1), corners)
    assert torch.equal(pasted[0, :, 6:12, 4:10], MARK) and torch.equal(pasted[1, :, 0:6, 20:26], MARK)
    outside = torch.ones(2, S, S, dtype=torch.bool)
    outside[0, 6:12, 4:10] = outside[1, 0:6, 20:26] = False
    assert torch.equal(pasted.permute(1, 0, 2, 3)[:, outside], x.permute(1, 0, 2, 3)[:, outside])
    filled = fill_background(pasted, corners, 6, 1)
    ring = pasted[0, :, 4:14, 2:12].clone()
    ring[:, 1:9, 1:9] = float("nan")
    expected = torch.nanmean(ring.flatten(1), dim=1)  # the mean of the 1-px ring around the grown square
    torch.testing.assert_close(filled[0, :, 7, 7], expected)
    assert torch.equal(filled[0, :, 20:, 20:], pasted[0, :, 20:, 20:])


def test_a_model_reading_the_stamp_is_flagged_with_its_share_flips_and_drop() -> None:
    t = Thresholds()
    x = _stamped()
    sample = _sample(40)
    others = _backgrounds(30, 7)
    probe = probe_cue(StampReader(), sample, x, others, 0, t)
    assert probe.share == 12 / 40 and len(probe.carriers) == 12 and len(probe.places) == 3
    assert probe.others == 30 and probe.flip_share == 1.0 and probe.control_flip_share == 0.0
    assert probe.drop > 0.9 and abs(probe.control_drop) < 0.05 and probe.removal_flip_share == 1.0
    (row,) = shortcut_cue({"stamped": probe}, t)
    assert row.kind == "shortcut_cue" and row.severity == "high" and row.metric == "flip_share_when_pasted"
    assert row.value == 1.0 and "12 of 40" in row.message and "1.000" in row.message and "3 places" in row.message
    assert set(row.evidence) <= set(probe.carriers)
    recorded = {r.metric: r.value for r in cue_metric_rows({"stamped": probe}, "features")}
    assert recorded["cue_share"] == probe.share and recorded["cue_control_drop"] == probe.control_drop
    blind = probe_cue(StampReader(reads=False), sample, x, others, 0, t)
    assert blind.share == 12 / 40 and blind.flip_share == 0.0 and shortcut_cue({"stamped": blind}, t) == []


def test_one_cause_one_finding_and_too_few_carriers_are_not_judged() -> None:
    t = Thresholds()
    x = _stamped(carriers=6)  # 6 of 40 = 15%, under cue_min_share
    assert probe_cue(StampReader(), _sample(40), x, _backgrounds(8, 2), 0, t) is None
    x = _stamped()
    probe = probe_cue(StampReader(), _sample(40), x, _backgrounds(8, 2), 0, t)
    assert shortcut_cue({"stamped": probe}, t, explained=frozenset({"stamped"})) == []


def test_probe_cues_loads_each_class_and_the_others() -> None:
    x = _stamped()
    others = _backgrounds(10, 5)
    ids = [f"s{k:03d}" for k in range(40)]
    audited = pd.DataFrame({"image_id": ids + [f"o{k}" for k in range(10)],
                            "labels": [["stamped"]] * 40 + [["plain"]] * 10})
    batches = {tuple(ids): x, tuple(f"o{k}" for k in range(10)): others}
    probes = probe_cues(StampReader(), [CueSample("stamped", tuple(ids))], lambda wanted: batches[tuple(wanted)],
                        audited, ["stamped", "plain"], Thresholds())
    assert probes["stamped"].others == 10 and probes["stamped"].flip_share == 1.0


def test_fixed_location_flag_explains_the_cue() -> None:
    """The detector on tables: a class attention_fixed_location flags is left to it."""
    from visaudit.tasks.findings.shortcut_cue import _detect

    t = Thresholds()
    x = _stamped()
    probe = probe_cue(StampReader(), _sample(40), x, _backgrounds(8, 2), 0, t)
    candidate = LocationCandidate("stamped", 0.1, 0.1, 0.8, 40, ("s000",))
    decisive = LocationProbe(x=0.1, y=0.1, side=0.125, patch_ratio=0.1, drop=0.6, control_drop=0.0, flip_share=1.0, images=16)

    class Tables:
        cues = {"stamped": probe}
        locations = ([candidate], {"stamped": decisive})

    assert _detect(Tables(), t) == []
    Tables.locations = ([candidate], {"stamped": replace(decisive, drop=0.0)})
    assert [f.kind for f in _detect(Tables(), t)] == ["shortcut_cue"]
