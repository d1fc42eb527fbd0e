"""mil_patches: batched patch classification against a plain loop, its grid maths, one set of
forwards for every class, and a model that scores brightness finding the bright square."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from torch import nn

from visaudit.tasks.explain import mil
from visaudit.tasks.model.head import Head

SIZE = 32


def tiny_net(classes: int = 4) -> nn.Module:
    """A seeded random conv net with dropout and batch norm (train mode, to check eval is used)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5), nn.Linear(8, classes),
    )


class MeanIntensity(nn.Module):
    """Class 0's score is the mean intensity of its input, class 1's the negative."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(1, 2, 3))
        return torch.stack([mean, -mean], dim=1)


def loop_starts(length: int, patch: int, stride: int) -> list[int]:
    """Starts every ``stride``, plus one ending at the border when the last does not reach it."""
    starts = list(range(0, length - patch + 1, stride))
    return starts + [length - patch] if starts[-1] + patch < length else starts


def loop_scores(model: nn.Module, x: torch.Tensor, patch: int, stride: int, head: Head) -> np.ndarray:
    """The direct computation: each patch cut, resized by torchvision and classified alone."""
    n, _, h, w = x.shape
    rows, cols = loop_starts(h, patch, stride), loop_starts(w, patch, stride)
    out = None
    model.eval()
    with torch.no_grad():
        for a in range(n):
            for i, r in enumerate(rows):
                for j, c in enumerate(cols):
                    crop = TF.resize(x[a : a + 1, :, r : r + patch, c : c + patch], [h, w], antialias=True)
                    p = head.probabilities(model(crop))[0].numpy()
                    if out is None:
                        out = np.zeros((n, p.size, len(rows), len(cols)), np.float32)
                    out[a, :, i, j] = p
    return out


def loop_pixels(grid: np.ndarray, size: int, patch: int, stride: int) -> np.ndarray:
    """Overlap averaging by accumulation: every patch adds its score to its pixels, then / counts."""
    starts = loop_starts(size, patch, stride)
    total = np.zeros(grid.shape[:-2] + (size, size))
    count = np.zeros((size, size))
    for i, r in enumerate(starts):
        for j, c in enumerate(starts):
            total[..., r : r + patch, c : c + patch] += grid[..., i, j, None, None]
            count[r : r + patch, c : c + patch] += 1
    assert count.min() >= 1
    return total / count


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.mark.parametrize("spec,patch,stride", [(mil.MilSpec(), 8, 4), (mil.MilSpec(0.3, 0.2), 10, 6)])
def test_scores_and_maps_equal_a_direct_loop(images: torch.Tensor, spec: mil.MilSpec, patch: int, stride: int) -> None:
    model = tiny_net().train()
    result = mil.mil_maps(model, images, spec, chunk_size=7)
    assert model.training and all(m.training for m in model.modules()), "train flags restored"
    assert result.geometry.patch == (patch, patch) and result.geometry.stride == (stride, stride)
    expected = loop_scores(model, images, patch, stride, Head(multi_label=False))
    np.testing.assert_allclose(result.scores.numpy(), expected, atol=1e-5, rtol=0)
    pixels = mil.to_pixels(result.scores, result.geometry)
    np.testing.assert_allclose(pixels.numpy(), loop_pixels(expected, SIZE, patch, stride), atol=1e-5, rtol=0)
    sample, target = torch.tensor([0, 1, 2, 2]), torch.tensor([3, 0, 1, 2])
    stored = mil.stored_maps(result.maps(sample, target), result.geometry)
    if SIZE % stride == 0:  # stride cells: the stored map is the pixel map's block means
        cells = SIZE // stride
        blocks = loop_pixels(expected, SIZE, patch, stride)[sample, target].reshape(4, cells, stride, cells, stride)
        np.testing.assert_allclose(stored.numpy(), blocks.mean(axis=(2, 4)), atol=1e-5, rtol=0)
    assert stored.shape == (4, *result.geometry.cells)


def test_sigmoid_head_and_logits(images: torch.Tensor) -> None:
    model = tiny_net()
    logits = mil.mil_maps(model, images[:1], output="logit").scores
    sigmoid = mil.mil_maps(model, images[:1], head=Head(multi_label=True)).scores
    torch.testing.assert_close(sigmoid, torch.sigmoid(logits))
    assert not torch.allclose(logits.softmax(1), sigmoid)


def test_grid_maths_with_a_stride_that_does_not_divide() -> None:
    geo = mil.MilSpec(0.4, 0.25).geometry(20)  # patch 8, stride 5: starts 0, 5, 10 and 12 (moved back)
    assert (geo.patch, geo.stride, geo.row_starts, geo.grid, geo.cells) == ((8, 8), (5, 5), (0, 5, 10, 12), (4, 4), (4, 4))
    rows, cols = geo.coverage(torch.device("cpu"))
    assert rows.sum(1).eq(8).all() and rows.any(0).all() and cols.any(0).all(), "full patches cover every pixel"
    # P[i, j] = i: each pixel row gets the mean index of the patches over it
    pixels = mil.to_pixels(torch.arange(4.0)[:, None].expand(4, 4), geo)
    by_hand = [0] * 5 + [0.5] * 3 + [1] * 2 + [1.5] * 2 + [2] + [2.5] * 5 + [3] * 2
    torch.testing.assert_close(pixels[:, 0], torch.tensor(by_hand))
    assert torch.equal(pixels, pixels[:, :1].expand(20, 20))
    assert mil.MilSpec().geometry(224).grid == (7, 7) and mil.MilSpec().geometry(224).patch == (56, 56)
    assert mil.MilSpec().geometry((48, 32)).patch == (12, 8)
    assert mil.MilSpec(1.0, 1.0).geometry(SIZE).grid == (1, 1)


@pytest.mark.parametrize("kwargs,message", [
    ({"patch": 0.0}, "in \\(0, 1\\]"), ({"patch": 1.5}, "in \\(0, 1\\]"), ({"stride": 0.3, "patch": 0.2}, "larger than"),
])
def test_bad_spec(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        mil.MilSpec(**kwargs)


def test_every_class_from_one_set_of_forwards(images: torch.Tensor) -> None:
    model = tiny_net(classes=6)
    batches: list[int] = []
    handle = model.register_forward_hook(lambda _m, args, _out: batches.append(args[0].shape[0]))
    try:
        result = mil.mil_maps(model, images, chunk_size=10)
        patches = images.shape[0] * 49
        assert batches == [10] * (patches // 10) + [patches % 10], "ceil(N * patches / chunk) forwards, no more"
        batches.clear()
        automatic = mil.mil_maps(model, images)
        assert sum(batches) == patches and batches[0] == 1, "the automatic chunk is measured on the first patch"
    finally:
        handle.remove()
    assert result.scores.shape == (3, 6, 7, 7)
    torch.testing.assert_close(automatic.scores, result.scores)
    every = result.maps(torch.tensor([1] * 6), torch.arange(6))
    torch.testing.assert_close(every, result.scores[1])


def test_the_map_finds_the_bright_square() -> None:
    x = torch.zeros(2, 3, 64, 64)
    x[0, :, 40:56, 8:24] = 1.0
    x[1, :, 4:20, 36:52] = 1.0
    result = mil.mil_maps(MeanIntensity(), x, output="logit")
    geo = result.geometry
    bright = mil.stored_maps(result.maps(torch.tensor([0, 1]), torch.tensor([0, 0])), geo)
    dark = mil.stored_maps(result.maps(torch.tensor([0, 1]), torch.tensor([1, 1])), geo)
    cell = 64 / geo.cells[0]
    for n, (r0, c0) in enumerate([(40, 8), (4, 36)]):
        row, col = divmod(int(bright[n].argmax()), geo.cells[1])
        assert r0 <= (row + 0.5) * cell < r0 + 16 and c0 <= (col + 0.5) * cell < c0 + 16
        torch.testing.assert_close(dark[n], -bright[n])
    assert bright[0, 0, -1] == 0 and bright[0].max() > 0.2, "far from the square no patch sees it"


def test_bad_calls() -> None:
    with pytest.raises(ValueError, match="N, C, H, W"):
        mil.mil_maps(tiny_net(), torch.zeros(3, SIZE, SIZE))
    with pytest.raises(ValueError, match="chunk_size"):
        mil.mil_maps(tiny_net(), torch.zeros(1, 3, SIZE, SIZE), chunk_size=0)
    with pytest.raises(ValueError, match="grid"):
        mil.to_pixels(torch.zeros(3, 3), mil.MilSpec().geometry(SIZE))


def test_settings_route_flat_keys_and_refuse_a_stride_past_the_patch() -> None:
    from pydantic import ValidationError

    from visaudit.tasks.audit.request import AuditRequest

    request = AuditRequest(source="photos/", methods="mil_patches", mil_patch=0.5, mil_stride=0.25)
    assert request.mil.spec() == mil.MilSpec(0.5, 0.25) and request.mil.spec().geometry(48).grid == (3, 3)
    with pytest.raises(ValidationError, match="stride 0.5 is larger than the patch 0.25"):
        AuditRequest(source="photos/", mil_patch=0.25, mil_stride=0.5)
