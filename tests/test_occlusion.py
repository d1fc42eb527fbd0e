"""Occlusion engine against Captum's Occlusion, and the scores built on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from visaudit.tasks.explain import occlusion as occ
from visaudit.tasks.explain import perturb, rise
from visaudit.tasks.explain.ranks import spearman
from visaudit.tasks.model.head import Head

SIZE = 112


@pytest.fixture(scope="module")
def photos(photo_batch: torch.Tensor) -> torch.Tensor:
    """Two real photos at 112 px (keeps the Captum comparisons fast on 2 cores)."""
    return F.interpolate(photo_batch[:2], size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)


def captum_pixels(model: nn.Module, x: torch.Tensor, window: int, stride: int, target, baselines=0.0) -> torch.Tensor:
    from captum.attr import Occlusion

    attr = Occlusion(model).attribute(
        x, sliding_window_shapes=(3, window, window), strides=(3, stride, stride), baselines=baselines,
        target=target, perturbations_per_eval=32,
    )
    assert torch.equal(attr[:, 0], attr[:, 1])  # the window spans all channels
    return attr[:, 0]


class Softmax(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(x), dim=1)


# overlapping windows whose last one is cut at the border: starts 0,24,48,72,96 on 112 px
OVERLAP = occ.OcclusionSpec(window=32, stride=24)


@pytest.fixture(scope="module")
def overlap_logits(resnet18: nn.Module, photos: torch.Tensor) -> occ.OcclusionResult:
    return occ.occlusion_maps(resnet18, photos, OVERLAP, output="logit")


def test_geometry() -> None:
    assert occ.OcclusionSpec().geometry(224) == occ.Geometry((224, 224), (32, 32), (32, 32), (7, 7))
    assert OVERLAP.geometry(SIZE).grid == (5, 5)
    assert occ.OcclusionSpec(grid=(2, 4)).geometry((100, 60)) == occ.Geometry((100, 60), (50, 15), (50, 15), (2, 4))


def test_probability_maps_equal_captum(resnet18: nn.Module, photos: torch.Tensor) -> None:
    spec = occ.OcclusionSpec(grid=4)  # window = stride = 28
    result = occ.occlusion_maps(resnet18, photos, spec)
    assert result.drops.shape == (2, 1000, 4, 4) and result.base_scores.shape == (2, 1000)
    target = result.base_scores.argmax(dim=1)
    ours = occ.to_pixels(result.maps(torch.arange(2), target), spec, SIZE)
    expected = captum_pixels(Softmax(resnet18), photos, 28, 28, target)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
    # relative to the map's scale too (probability drops of a random model are small)
    assert (ours - expected).abs().max() <= 1e-3 * expected.abs().max()


def test_overlapping_windows_equal_captum(resnet18: nn.Module, photos: torch.Tensor,
                                          overlap_logits: occ.OcclusionResult) -> None:
    target = overlap_logits.base_scores.argmax(dim=1)
    ours = occ.to_pixels(overlap_logits.maps(torch.arange(2), target), OVERLAP, SIZE)
    torch.testing.assert_close(ours, captum_pixels(resnet18, photos, 32, 24, target), atol=1e-4, rtol=1e-4)
    # the whole result at once gives the same per-pixel maps
    every = occ.to_pixels(overlap_logits)
    torch.testing.assert_close(every[torch.arange(2), target], ours)


def test_every_class_equals_single_class_captum(resnet18: nn.Module, photos: torch.Tensor,
                                                overlap_logits: occ.OcclusionResult) -> None:
    for cls in (3, 517):
        ours = occ.to_pixels(overlap_logits.drops[:, cls], OVERLAP, SIZE)
        torch.testing.assert_close(ours, captum_pixels(resnet18, photos, 32, 24, cls), atol=1e-4, rtol=1e-4)


def test_chunk_size_does_not_change_results(resnet18: nn.Module, photos: torch.Tensor) -> None:
    spec = occ.OcclusionSpec(grid=3)
    results = [occ.occlusion_maps(resnet18, photos, spec, chunk_size=c, output="logit") for c in (1, 7, None)]
    for other in results[1:]:
        torch.testing.assert_close(other.base_scores, results[0].base_scores, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(other.drops, results[0].drops, atol=1e-4, rtol=1e-4)


class Linear(nn.Module):
    """score_k = sum(W_k * x): the drop of a window is sum over the window of W_k (x - b)."""

    def __init__(self, c: int = 3, h: int = 12, w: int = 12, k: int = 4) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.weight = nn.Parameter(torch.randn(k, c, h, w, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("kchw,nchw->nk", self.weight, x)


@pytest.mark.parametrize("spec", [
    occ.OcclusionSpec(window=4, baseline="zero"),
    occ.OcclusionSpec(window=5, stride=3, baseline="mean"),
    occ.OcclusionSpec(window=4, baseline="mean", mean=(0.1, -0.2, 0.3)),
    occ.OcclusionSpec(grid=3, baseline="blur", blur_sigma=2.0),
])
def test_baselines_on_a_linear_model(spec: occ.OcclusionSpec) -> None:
    model = Linear()
    x = torch.randn(3, 3, 12, 12, dtype=torch.float64)
    result = occ.occlusion_maps(model, x, spec, output="logit")
    geo = spec.geometry(12)
    b = perturb.baseline_images(x, spec.baseline, spec.mean, spec.blur_sigma).expand_as(x)
    if spec.baseline == "mean" and spec.mean is None:
        torch.testing.assert_close(b[:, :, 0, 0], x.mean(dim=(2, 3)))
    expected = torch.zeros(3, 4, *geo.grid, dtype=torch.float64)
    for i in range(geo.grid[0]):
        for j in range(geo.grid[1]):
            mask = torch.zeros(12, 12, dtype=torch.float64)
            mask[i * geo.stride[0] : i * geo.stride[0] + geo.window[0], j * geo.stride[1] : j * geo.stride[1] + geo.window[1]] = 1
            expected[:, :, i, j] = torch.einsum("kchw,nchw->nk", model.weight.detach(), (x - b) * mask)
    torch.testing.assert_close(result.drops.double(), expected, atol=1e-5, rtol=1e-5)


def test_model_state_is_restored_and_sigmoid_output() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model.train()
    model[1].eval()  # mixed flags must come back as they were
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 16, 16)
    result = occ.occlusion_maps(model, x, occ.OcclusionSpec(grid=2), head=Head(multi_label=True))
    assert model.training and not model[1].training and model[0].training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # BatchNorm running stats untouched
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(result.base_scores, torch.sigmoid(model(x)))


def test_spearman_equals_scipy_with_ties() -> None:
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    a = rng.integers(0, 6, size=(20, 49)).astype(np.float32)  # many ties
    b = rng.normal(size=(20, 49)).astype(np.float32)
    b[:, ::3] = np.round(b[:, ::3])
    ours = spearman(torch.from_numpy(a), torch.from_numpy(b))
    expected = [spearmanr(a[i], b[i]).statistic for i in range(20)]
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-10)
    assert torch.isnan(spearman(torch.ones(5), torch.arange(5.0)))
    assert spearman(torch.arange(5.0), torch.arange(5.0) * 2).item() == pytest.approx(1.0)


def test_pool_to_grid_and_faithfulness() -> None:
    cam = torch.rand(3, 14, 14)
    torch.testing.assert_close(occ.pool_to_grid(cam, 7), F.avg_pool2d(cam[:, None], 2)[:, 0])
    grid_maps = occ.pool_to_grid(cam, 7)
    rho = occ.faithfulness(cam, grid_maps)
    torch.testing.assert_close(rho, torch.ones(3, dtype=torch.float64))
    assert (occ.faithfulness(cam, -grid_maps) < -0.99).all()


class RegionMean(nn.Module):
    """Two classes; the evidence for class 0 is the mean of the top-left quadrant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        evidence = 4 * x[:, :, : x.shape[2] // 2, : x.shape[3] // 2].mean(dim=(1, 2, 3))
        return torch.stack([evidence, torch.zeros_like(evidence)], dim=1)


def test_deletion_insertion_rewards_the_true_evidence() -> None:
    x = torch.rand(2, 3, 16, 16) + 0.5
    true = torch.zeros(2, 4, 4)
    true[:, :2, :2] = 1.0
    true += 0.01 * torch.rand(2, 4, 4)
    target = torch.zeros(2, dtype=torch.long)
    # insertion from zero: a blur of this near-constant image would already hold the evidence
    good = rise.deletion_insertion(RegionMean(), x, true, target, steps=16, insertion_baseline="zero", chunk_size=5)
    bad = rise.deletion_insertion(RegionMean(), x, -true, target, steps=16, insertion_baseline="zero")
    assert good.deletion_curve.shape == (2, 17)
    assert (good.deletion_auc < bad.deletion_auc - 0.1).all()
    assert (good.insertion_auc > bad.insertion_auc + 0.1).all()
    assert ((good.deletion_auc >= 0) & (good.insertion_auc <= 1)).all()
    # endpoints: the whole image, then the whole baseline
    with torch.no_grad():
        full = torch.softmax(RegionMean()(x), 1)[:, 0]
        empty = torch.softmax(RegionMean()(torch.zeros_like(x)), 1)[:, 0]
    torch.testing.assert_close(good.deletion_curve[:, 0], full)
    torch.testing.assert_close(good.deletion_curve[:, -1], empty)
    torch.testing.assert_close(good.insertion_curve[:, -1], full)
    torch.testing.assert_close(rise.auc(torch.tensor([1.0, 0.5, 0.0])), torch.tensor(0.5))
    # RISE's default insertion starts from the blurred image
    blur = rise.deletion_insertion(RegionMean(), x, true, target, steps=4)
    with torch.no_grad():
        start = torch.softmax(RegionMean()(perturb.blurred(x)), 1)[:, 0]
    torch.testing.assert_close(blur.insertion_curve[:, 0], start)


def test_box_scores_for_occlusion_maps() -> None:
    maps = torch.zeros(2, 4, 4)
    maps[0, 0, 0] = 1.0  # top-left window of 8 px
    maps[1, 3, 3] = 1.0
    boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0], [0.0, 0.0, 8.0, 8.0]])
    scores = occ.box_scores(maps, boxes, 32, occ.OcclusionSpec(grid=4))
    assert scores.pointing_hit.tolist() == [1.0, 0.0]
    assert scores.energy_in_box.tolist() == [1.0, 0.0]


@pytest.mark.parametrize("kwargs, message", [
    (dict(window=0), "window must be positive"),
    (dict(window=3.5), "window must be a positive int"),
    (dict(window=4, grid=7), "either window"),
    (dict(stride=4), "stride needs a window"),
    (dict(baseline="noise"), "baseline must be one of"),
    (dict(grid=-1), "grid must be positive"),
    (dict(mean=(0.0, 0.0, 0.0)), "only used with baseline='mean'"),
    (dict(baseline="blur", blur_sigma=0.0), "blur_sigma"),
])
def test_bad_spec(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        occ.OcclusionSpec(**kwargs)


def test_bad_calls() -> None:
    model = Linear()
    x = torch.randn(1, 3, 12, 12, dtype=torch.float64)
    with pytest.raises(ValueError, match="larger than the image"):
        occ.occlusion_maps(model, x, occ.OcclusionSpec(window=13))
    with pytest.raises(ValueError, match="stride .* larger than window"):
        occ.occlusion_maps(model, x, occ.OcclusionSpec(window=3, stride=4))
    with pytest.raises(ValueError, match="more windows than"):
        occ.occlusion_maps(model, x, occ.OcclusionSpec(grid=13))
    with pytest.raises(ValueError, match="chunk_size"):
        occ.occlusion_maps(model, x, chunk_size=0)
    with pytest.raises(ValueError, match="output must be"):
        occ.occlusion_maps(model, x, output="prob")
    with pytest.raises(TypeError, match="head must be a Head"):
        occ.occlusion_maps(model, x, head="sigmoid")
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        occ.occlusion_maps(model, x[0])
    with pytest.raises(ValueError, match="3 channels"):
        occ.occlusion_maps(model, x, occ.OcclusionSpec(baseline="mean", mean=(0.0, 0.0)))
    with pytest.raises(ValueError, match="grid"):
        occ.to_pixels(torch.zeros(1, 3, 3), occ.OcclusionSpec(grid=4), 12)
    with pytest.raises(ValueError, match="steps"):
        rise.deletion_insertion(model, x, torch.rand(1, 3, 3), torch.zeros(1, dtype=torch.long), steps=0)
    with pytest.raises(ValueError, match="saliency must be"):
        rise.deletion_insertion(model, x, torch.rand(2, 3, 3), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="insertion_baseline"):
        rise.deletion_insertion(model, x, torch.rand(1, 3, 3), torch.zeros(1, dtype=torch.long), insertion_baseline="x")
    with pytest.raises(ValueError, match="same shape"):
        spearman(torch.rand(2, 5), torch.rand(2, 4))
