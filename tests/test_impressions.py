"""Class impressions: a small CNN trained here on generated shapes, then its impressions.

Classes (32 x 32, on noise over a random tint): 0 background only, 1 red square, 2 green
disk, 3 blue stripes. The background class keeps the starting noise away from the shapes'
classes, so "far above the starting noise" is meaningful.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from visaudit.tasks.explain.colour_impressions import colour_impressions
from visaudit.tasks.explain.impression_image import total_variation
from visaudit.tasks.explain.impression_output import impression_cam, save_pngs
from visaudit.tasks.explain.impression_settings import ImpressionSettings
from visaudit.tasks.explain.impressions import class_impressions

MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
NAMES = ["background", "red square", "green disk", "blue stripes"]
SHAPES = [1, 2, 3]
SIZE = 32
SETTINGS = ImpressionSettings(iterations=100, image_size=SIZE, jitter=2.0, tv_weight=10.0, seed=0)


def make_shapes(per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(4 per_class, 3, 32, 32) images in [0, 1] and their labels."""
    g = torch.Generator().manual_seed(seed)
    n = 4 * per_class
    tint = 0.2 + 0.6 * torch.rand((n, 3, 1, 1), generator=g)
    x = tint + 0.1 * torch.randn((n, 3, SIZE, SIZE), generator=g)
    labels = torch.arange(4).repeat_interleave(per_class)
    yy, xx = torch.meshgrid(torch.arange(SIZE).float(), torch.arange(SIZE).float(), indexing="ij")
    colours = {1: (0.9, 0.1, 0.1), 2: (0.1, 0.85, 0.1), 3: (0.1, 0.1, 0.9)}
    for i in range(n):
        c = int(labels[i])
        if c == 0:
            continue
        r = int(torch.randint(5, 9, (1,), generator=g))
        cy, cx = (int(v) for v in torch.randint(r, SIZE - r, (2,), generator=g))
        if c == 1:
            mask = ((yy - cy).abs() <= r) & ((xx - cx).abs() <= r)
        elif c == 2:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        else:
            mask = ((xx // 3) % 2 == 0) & ((yy - cy).abs() <= r + 2) & ((xx - cx).abs() <= r + 2)
        x[i][:, mask] = torch.tensor(colours[c])[:, None]
    return x.clamp(0, 1), labels


def small_cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4),
    )


def normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one thread avoids OpenMP waits on a busy machine (10-100x here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shapes_model() -> nn.Module:
    """Trained in a few seconds; > 75% accuracy on fresh images (chance is 25%)."""
    x, y = make_shapes(100, seed=0)
    inputs = normalise(x)
    model = small_cnn(0)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            batch = order[i : i + 64]
            loss = F.cross_entropy(model(inputs[batch]), y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.eval()
    test_x, test_y = make_shapes(30, seed=100)
    with torch.no_grad():
        accuracy = (model(normalise(test_x)).argmax(1) == test_y).float().mean().item()
    assert accuracy > 0.75, f"the test model did not learn the shapes (accuracy {accuracy:.2f})"
    return model


@pytest.fixture(scope="module")
def impressions(shapes_model: nn.Module):
    return class_impressions(shapes_model, SHAPES, SETTINGS, MEAN, STD, "cpu")


def high_frequency(images: torch.Tensor) -> float:
    """Mean absolute difference of neighbouring pixels (pixel values in [0, 1])."""
    x = images.float() / 255
    return ((x[:, :, 1:] - x[:, :, :-1]).abs().mean() + (x[..., 1:] - x[..., :-1]).abs().mean()).item()


def fft_high_band(images: torch.Tensor) -> float:
    """Share of the spectral energy (mean removed) above half the Nyquist frequency."""
    x = images.float() / 255
    x = x - x.mean(dim=(2, 3), keepdim=True)
    power = torch.fft.rfft2(x).abs().pow(2)
    fy = torch.fft.fftfreq(x.shape[-2])[:, None]
    fx = torch.fft.rfftfreq(x.shape[-1])[None, :]
    high = torch.sqrt(fy**2 + fx**2) > 0.25
    return (power[..., high].sum() / power.sum()).item()


def test_each_impression_is_classified_as_its_class(impressions) -> None:
    r = impressions
    k = len(SHAPES)
    assert r.classes == SHAPES
    assert r.images.shape == (k, 3, SIZE, SIZE) and r.images.dtype == torch.uint8
    assert r.logits.shape == (k, 4) and r.probabilities.shape == (k, 4)
    assert r.trace.shape == (SETTINGS.iterations, k)
    assert r.iterations == SETTINGS.iterations and r.seed == SETTINGS.seed
    assert (r.probability > 0.9).all(), r.probability
    assert (r.start_probability < 0.5).all(), r.start_probability
    assert (r.probability - r.start_probability > 0.5).all()
    # the scores are those of the returned uint8 images themselves
    assert torch.allclose(torch.softmax(r.logits, 1), r.probabilities)
    assert torch.equal(r.probabilities[torch.arange(k), torch.tensor(SHAPES)], r.probability)
    assert all(int(c) != s for c, s in zip(r.competitor, SHAPES))
    assert torch.allclose(r.competitor_probability, (r.probabilities + 0).scatter(
        1, torch.tensor(SHAPES)[:, None], -1.0).max(dim=1).values)
    # the objective went up
    assert (r.trace[-10:].mean(0) > r.trace[:5].mean(0) + 1).all()


def test_multi_label_probabilities(shapes_model: nn.Module) -> None:
    settings = replace(SETTINGS, iterations=5)
    result = class_impressions(shapes_model, [1, 2], settings, MEAN, STD, multi_label=True)
    assert torch.allclose(result.probabilities, torch.sigmoid(result.logits))
    assert torch.equal(result.probability, result.probabilities[[0, 1], [1, 2]])


def test_records(impressions) -> None:
    rows = impressions.records(NAMES)
    assert [row["class_name"] for row in rows] == ["red square", "green disk", "blue stripes"]
    assert all(row["probability"] > 0.9 and row["competitor_name"] in NAMES for row in rows)
    assert all(row["iterations"] == SETTINGS.iterations and row["seed"] == 0 for row in rows)
    assert '"tv_weight": 10.0' in rows[0]["parameters"]


def test_log_odds_objective_beats_a_competitor_that_the_logit_drags_along() -> None:
    """A model whose class-1 score is twice class 0's: ascending y_0 raises y_1 faster and
    leaves class 0 improbable; its log-odds, y_0 - y_1, is ascended by the opposite image."""
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2, bias=False))
    with torch.no_grad():
        model[2].weight.copy_(torch.tensor([[3.0, 0.0, 0.0], [6.0, 0.0, 0.0]]))
    settings = replace(SETTINGS, iterations=60)
    by_logit = class_impressions(model, [0], replace(settings, objective="logit"), MEAN, STD)
    by_log_odds = class_impressions(model, [0], settings, MEAN, STD)
    assert settings.objective == "log_odds"
    assert by_logit.probability.item() < 0.05 and by_logit.logits[0, 0] > by_log_odds.logits[0, 0]
    assert by_log_odds.probability.item() > 0.95
    red = by_log_odds.images[0, 0].float().mean() / 255
    assert red < 0.25  # the red channel, the only input, was driven down from mid-grey
    # multi-label: a sigmoid's log-odds is the logit itself, so both objectives agree
    same = [class_impressions(model, [0], replace(settings, objective=o), MEAN, STD, multi_label=True)
            for o in ("logit", "log_odds")]
    assert torch.equal(same[0].images, same[1].images)


def test_one_by_one_runs_also_reach_their_class(shapes_model: nn.Module, impressions) -> None:
    """Batched and one-by-one runs differ (transforms are random per image) but both succeed."""
    for c in SHAPES:
        single = class_impressions(shapes_model, [c], SETTINGS, MEAN, STD)
        assert single.images.shape == (1, 3, SIZE, SIZE)
        assert single.probability.item() > 0.9, (c, single.probability)
    assert (impressions.probability > 0.9).all()


def test_total_variation_lowers_high_frequency_energy(shapes_model: nn.Module) -> None:
    plain = replace(SETTINGS, tv_weight=0.0, iterations=60)
    smooth = replace(plain, tv_weight=30.0)
    rough_images = class_impressions(shapes_model, SHAPES, plain, MEAN, STD).images
    smooth_images = class_impressions(shapes_model, SHAPES, smooth, MEAN, STD).images
    assert high_frequency(smooth_images) < 0.7 * high_frequency(rough_images)
    assert fft_high_band(smooth_images) < 0.7 * fft_high_band(rough_images)
    # and the prior itself, per image
    tv_rough = total_variation(rough_images.float() / 255)
    tv_smooth = total_variation(smooth_images.float() / 255)
    assert (tv_smooth < tv_rough).all()


def test_parameterisations_across_seeds(shapes_model: nn.Module) -> None:
    """Every seed reaches its classes with both parameterisations; the Fourier one (the
    default) leaves less high-frequency energy at the same TV weight."""
    energy: dict[str, list[float]] = {"fourier": [], "pixel": []}
    for seed in range(1, 5):
        for kind in energy:
            result = class_impressions(shapes_model, SHAPES, replace(SETTINGS, seed=seed, parameterisation=kind),
                                       MEAN, STD)
            assert (result.probability > 0.9).all(), (seed, kind, result.probability)
            energy[kind].append(high_frequency(result.images))
    assert np.mean(energy["fourier"]) < 0.85 * np.mean(energy["pixel"]), energy


def test_total_variation_values() -> None:
    flat = torch.full((1, 3, 8, 8), 0.3)
    assert total_variation(flat).item() == 0.0
    stripes = torch.zeros(1, 1, 4, 4)
    stripes[..., ::2] = 1.0  # every horizontal neighbour differs by 1, the last column has none
    assert math.isclose(total_variation(stripes).item(), 12 / 16)
    assert math.isclose(total_variation(stripes, beta=1.0).item(), 12 / 16, rel_tol=1e-3)


@pytest.mark.parametrize("parameterisation", ["fourier", "pixel"])
def test_same_seed_same_images(shapes_model: nn.Module, parameterisation: str) -> None:
    settings = replace(SETTINGS, iterations=15, parameterisation=parameterisation)
    first = class_impressions(shapes_model, SHAPES, settings, MEAN, STD)
    again = class_impressions(shapes_model, SHAPES, settings, MEAN, STD)
    other = class_impressions(shapes_model, SHAPES, replace(settings, seed=1), MEAN, STD)
    assert torch.equal(first.images, again.images)
    assert torch.equal(first.logits, again.logits)
    assert not torch.equal(first.images, other.images)


def _fragile_model() -> nn.Module:
    """BatchNorm and Dropout, so a forward in train mode would change buffers and outputs."""
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )


def _hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        + len(getattr(m, "_backward_pre_hooks", {}))
        for m in model.modules()
    )


def _snapshot(model: nn.Module) -> tuple:
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
    )


def _assert_unchanged(model: nn.Module, before: tuple) -> None:
    state, modes, flags = before
    after = model.state_dict()
    assert state.keys() == after.keys()
    assert all(torch.equal(state[k], after[k]) for k in state), "parameters or buffers changed"
    assert [m.training for m in model.modules()] == modes, "train/eval flags not restored"
    assert [p.requires_grad for p in model.parameters()] == flags, "requires_grad flags not restored"
    assert all(p.grad is None for p in model.parameters()), "parameter gradients were computed"
    assert _hooks(model) == 0, "hooks left on the model"


def test_model_left_unchanged() -> None:
    model = _fragile_model().train()
    model[3].eval()  # mixed modes: each module's own flag must come back
    for p in model[0].parameters():
        p.requires_grad_(False)  # mixed requires_grad flags
    before = _snapshot(model)
    settings = ImpressionSettings(iterations=5, image_size=16, jitter=1.0)
    result = class_impressions(model, [0, 3], settings, MEAN, STD)
    _assert_unchanged(model, before)
    cams = impression_cam(model, result.images, [0, 3], "5", MEAN, STD)
    assert cams.maps.shape == (2, 16, 16)
    _assert_unchanged(model, before)


def test_model_left_unchanged_after_errors() -> None:
    model = _fragile_model().train()
    before = _snapshot(model)
    with pytest.raises(ValueError, match="out of range"):
        class_impressions(model, [0, 9], ImpressionSettings(iterations=2, image_size=16, jitter=1.0), MEAN, STD)
    _assert_unchanged(model, before)
    with pytest.raises(ValueError, match="not found"):
        impression_cam(model, torch.zeros(1, 3, 16, 16, dtype=torch.uint8), [0], "nope", MEAN, STD)
    _assert_unchanged(model, before)
    with pytest.raises(RuntimeError, match="inference_mode"):
        with torch.inference_mode():
            class_impressions(model, [0], ImpressionSettings(iterations=2, image_size=16, jitter=1.0), MEAN, STD)
    _assert_unchanged(model, before)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(iterations=0), "iterations"),
        (dict(iterations=2.5), "iterations"),
        (dict(lr=0.0), "lr"),
        (dict(tv_weight=-1.0), "tv_weight"),
        (dict(tv_weight=float("nan")), "tv_weight"),
        (dict(tv_beta=0.5), "tv_beta"),
        (dict(l2_weight=-0.1), "l2_weight"),
        (dict(jitter=-1.0), "jitter"),
        (dict(jitter=200.0), "jitter"),
        (dict(rotation=-5.0), "rotation"),
        (dict(rotation=400.0), "rotation"),
        (dict(scale=(1.2, 0.8)), "scale"),
        (dict(scale=(0.0, 1.0)), "scale"),
        (dict(crop_fraction=0.0), "crop_fraction"),
        (dict(crop_fraction=1.5), "crop_fraction"),
        (dict(rgb_jitter=2.0), "rgb_jitter"),
        (dict(image_size=4), "image_size"),
        (dict(init_std=-0.1), "init_std"),
        (dict(seed=1.5), "seed"),
        (dict(parameterisation="wavelet"), "parameterisation"),
        (dict(objective="softmax"), "objective"),
        (dict(colour_levels=-1), "colour_levels"),
        (dict(colour_levels=2.0), "colour_levels"),
        (dict(colour_steps=-3), "colour_steps"),
    ],
)
def test_bad_settings_raise(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ImpressionSettings(**changes)


def test_bad_arguments_raise(shapes_model: nn.Module) -> None:
    settings = ImpressionSettings(iterations=1, image_size=SIZE, jitter=1.0)
    with pytest.raises(ValueError, match="empty"):
        class_impressions(shapes_model, [], settings, MEAN, STD)
    with pytest.raises(ValueError, match=">= 0"):
        class_impressions(shapes_model, [-1], settings, MEAN, STD)
    with pytest.raises(ValueError, match="integer"):
        class_impressions(shapes_model, ["cat"], settings, MEAN, STD)
    with pytest.raises(ValueError, match="out of range"):
        class_impressions(shapes_model, [4], settings, MEAN, STD)
    with pytest.raises(ValueError, match="std"):
        class_impressions(shapes_model, [1], settings, MEAN, (0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match="three"):
        class_impressions(shapes_model, [1], settings, (0.5,), STD)
    with pytest.raises(ValueError, match="ImpressionSettings"):
        class_impressions(shapes_model, [1], {"iterations": 3}, MEAN, STD)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="K = len"):
        impression_cam(shapes_model, torch.zeros(2, 3, SIZE, SIZE, dtype=torch.uint8), [1], "4", MEAN, STD)


def test_impression_cam_of_the_shapes_model(shapes_model: nn.Module, impressions) -> None:
    cams = impression_cam(shapes_model, impressions.images, SHAPES, "5", MEAN, STD)
    k = len(SHAPES)
    assert cams.maps.shape == (k, 8, 8) and (cams.maps >= 0).all()
    assert (cams.maps.reshape(k, -1).amax(1) > 0).all(), "evidence found in every impression"
    for values in (cams.peak_x, cams.peak_y, cams.centroid_x, cams.centroid_y):
        assert ((values > 0) & (values < 1)).all()
    assert ((cams.centroid_offset >= 0) & (cams.centroid_offset <= math.sqrt(0.5))).all()
    assert torch.allclose(cams.centroid_offset, torch.hypot(cams.centroid_x - 0.5, cams.centroid_y - 0.5))
    assert torch.equal(cams.off_centre, cams.centroid_offset > 0.25)


class CornerModel(nn.Module):
    """Scores only the top-left quarter of the image: its evidence is pinned to a corner."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU())
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.features(x)
        h, w = a.shape[-2:]
        return self.head(a[:, :, : h // 4, : w // 4].mean(dim=(2, 3)))


def test_corner_evidence_is_reported_off_centre() -> None:
    model = CornerModel().eval()
    settings = ImpressionSettings(iterations=40, image_size=SIZE, jitter=2.0, tv_weight=10.0)
    result = class_impressions(model, [0, 1], settings, MEAN, STD)
    cams = impression_cam(model, result.images, [0, 1], "features", MEAN, STD)
    assert cams.off_centre.all(), cams.centroid_offset
    assert (cams.centroid_x < 0.35).all() and (cams.centroid_y < 0.35).all()
    assert (cams.peak_x < 0.3).all() and (cams.peak_y < 0.3).all()


def test_float_inputs_to_impression_cam(shapes_model: nn.Module, impressions) -> None:
    from_uint8 = impression_cam(shapes_model, impressions.images, SHAPES, "5", MEAN, STD)
    from_float = impression_cam(shapes_model, normalise(impressions.images.float() / 255), SHAPES, "5")
    assert torch.allclose(from_uint8.maps, from_float.maps, atol=1e-5)


def test_save_pngs(impressions, tmp_path) -> None:
    paths = save_pngs(impressions, NAMES, tmp_path / "impressions")
    assert [p.name for p in paths] == [
        "impression_000_0001_red_square.png",
        "impression_001_0002_green_disk.png",
        "impression_002_0003_blue_stripes.png",
    ]
    for k, path in enumerate(paths):
        pixels = np.asarray(Image.open(path).convert("RGB"))
        assert np.array_equal(pixels, impressions.images[k].permute(1, 2, 0).numpy())
    assert not list((tmp_path / "impressions").glob("*.tmp"))
    unnamed = save_pngs(impressions, None, tmp_path / "plain")
    assert unnamed[0].name == "impression_000_0001_1.png"


def test_settings_are_json_friendly() -> None:
    values = ImpressionSettings().as_dict()
    assert values["scale"] == [0.9, 1.1] and values["parameterisation"] in ("pixel", "fourier")
    assert ImpressionSettings(**{**values, "scale": tuple(values["scale"])}) == ImpressionSettings()


def test_copy_of_model_not_needed(shapes_model: nn.Module) -> None:
    """The caller's model object is used in place (no deepcopy): its identity and outputs stay."""
    reference = copy.deepcopy(shapes_model)
    class_impressions(shapes_model, [1], ImpressionSettings(iterations=3, image_size=SIZE, jitter=1.0), MEAN, STD)
    x = normalise(make_shapes(2, seed=7)[0])
    with torch.no_grad():
        assert torch.equal(shapes_model(x), reference(x))


# --- colour impressions -------------------------------------------------------------------------


class MeanColourBumps(nn.Module):
    """Scores from the image's mean colour u only: class 0 has a tall narrow bump at pure blue and a
    low wide one at grey-blue, so gradient ascent from mid-grey climbs the low bump; class 1 is flat."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(dim=(2, 3)) * torch.tensor(STD) + torch.tensor(MEAN)  # back to pixel colours
        tall = 8 * torch.exp(-(u - torch.tensor([0.0, 0.0, 1.0])).pow(2).sum(1) / 0.05)
        low = 3 * torch.exp(-(u - torch.tensor([0.45, 0.45, 0.6])).pow(2).sum(1) / 0.3)
        return torch.stack([self.weight * (tall + low), torch.zeros_like(tall)], dim=1)


def test_colour_impression_finds_the_best_colour_where_ascent_from_grey_would_not() -> None:
    model = MeanColourBumps()
    settings = ImpressionSettings(image_size=8, jitter=1.0)
    found = colour_impressions(model, [0], settings, MEAN, STD)
    assert found.grid_colours == 6**3
    assert (found.colours[0].int() - torch.tensor([0, 0, 255])).abs().max() <= 8, found.colours  # the tall bump
    assert float(found.logits[0, 0]) > 7.5  # its top is 8 (+ 0.1 of the low bump's tail); the low bump's is 3.3
    # plain gradient ascent from mid-grey ends on the low bump: the grid search is what finds blue
    u = torch.full((1, 3), 0.5, requires_grad=True)
    optimiser = torch.optim.Adam([u], lr=0.01)
    for _ in range(300):
        score = model(((u.view(1, 3, 1, 1) - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)))
        optimiser.zero_grad()
        (-score[0, 0]).backward()
        optimiser.step()
    assert float(u.detach()[0, 2]) < 0.8 and float(u.detach()[0, 0]) > 0.3


def test_colour_impressions_of_the_shapes_model_are_its_classes_colours(shapes_model: nn.Module) -> None:
    settings = replace(SETTINGS, colour_levels=5, colour_steps=20)
    found = colour_impressions(shapes_model, SHAPES, settings, MEAN, STD)
    rgb = found.colours.int()
    for k, channel in enumerate((0, 1)):  # the solid red square and green disk (stripes are a pattern, not a colour)
        others = [c for c in range(3) if c != channel]
        assert int(rgb[k, channel]) > 150 and all(int(rgb[k, c]) < 100 for c in others), (NAMES[SHAPES[k]], rgb[k])
    # the stored probability is the model's for a plain image of that colour, and no grid colour beats it
    flat = ((rgb.float() / 255).view(-1, 3, 1, 1) - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        p = torch.softmax(shapes_model(flat.expand(-1, 3, SIZE, SIZE)), dim=1)[torch.arange(3), torch.tensor(SHAPES)]
        levels = (torch.arange(9) + 0.5) / 9
        grid = torch.cartesian_prod(levels, levels, levels).view(-1, 3, 1, 1)
        scores = shapes_model(((grid - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)).expand(-1, 3, SIZE, SIZE))
    torch.testing.assert_close(found.probability, p, atol=1e-5, rtol=0)
    for k, c in enumerate(SHAPES):
        others = scores.clone()
        others[:, c] = -torch.inf
        best_grid = (scores[:, c] - torch.logsumexp(others, dim=1)).max()
        assert float(torch.logit(found.probability[k].double())) >= float(best_grid) - 0.05


def test_colour_impressions_are_deterministic_and_leave_the_model_unchanged() -> None:
    model = _fragile_model().train()
    model[3].eval()
    for p in model[0].parameters():
        p.requires_grad_(False)
    before = _snapshot(model)
    settings = ImpressionSettings(image_size=16, jitter=1.0, colour_levels=3, colour_steps=5)
    first = colour_impressions(model, [0, 3], settings, MEAN, STD)
    _assert_unchanged(model, before)
    second = colour_impressions(model, [0, 3], settings, MEAN, STD)
    assert torch.equal(first.colours, second.colours) and torch.equal(first.logits, second.logits)
    with pytest.raises(ValueError, match="out of range"):
        colour_impressions(model, [0, 9], settings, MEAN, STD)
    _assert_unchanged(model, before)
    with pytest.raises(ValueError, match="colour_levels is 0"):
        colour_impressions(model, [0], replace(settings, colour_levels=0), MEAN, STD)
