"""Grad-CAM against an independent implementation (Captum), and model hygiene."""

from __future__ import annotations

import pytest
import torch
from captum.attr import LayerGradCam

from visaudit.tasks.explain import cam
from visaudit.tasks.model.hooks import hooked_forward


def _normalised(maps: torch.Tensor) -> torch.Tensor:
    flat = maps.reshape(maps.shape[0], -1)
    return flat / flat.amax(dim=1, keepdim=True).clamp_min(1e-12)


@pytest.mark.parametrize("layer", ["layer4", "layer3"])
def test_grad_cam_equals_captum(resnet18: torch.nn.Module, photo_batch: torch.Tensor, layer: str) -> None:
    forward = hooked_forward(resnet18, photo_batch, [layer])
    n = photo_batch.shape[0]
    # two targets per image: top-1 and top-2, so the per-round batching is exercised too
    top2 = forward.scores.detach().topk(2, dim=1).indices
    sample = torch.arange(n).repeat_interleave(2)
    target = top2.reshape(-1)
    ours = cam.grad_cam(forward, sample, target)[layer]

    captum = LayerGradCam(resnet18, dict(resnet18.named_modules())[layer])
    theirs = torch.cat(
        [captum.attribute(photo_batch, target=top2[:, j], relu_attributions=True)[:, 0] for j in range(2)]
    )
    theirs = theirs.reshape(2, n, *theirs.shape[1:]).transpose(0, 1).reshape(2 * n, *theirs.shape[1:])
    assert ours.shape == theirs.shape
    assert torch.allclose(_normalised(ours), _normalised(theirs.detach()), atol=1e-5)
    assert (ours.reshape(2 * n, -1).amax(dim=1) > 0).all(), "maps must not be empty"


def test_model_left_untouched(resnet18: torch.nn.Module, photo_batch: torch.Tensor) -> None:
    before = resnet18(photo_batch).detach()
    flags = [p.requires_grad for p in resnet18.parameters()]
    forward = hooked_forward(resnet18, photo_batch, ["layer4"])
    cam.grad_cam(forward, torch.arange(4), forward.scores.argmax(1))
    assert [p.requires_grad for p in resnet18.parameters()] == flags
    assert all(p.grad is None for p in resnet18.parameters()), "no parameter gradients"
    assert not any(m._forward_hooks for m in resnet18.modules())
    assert torch.equal(resnet18(photo_batch).detach(), before)


def test_hooks_removed_after_error(resnet18: torch.nn.Module) -> None:
    with pytest.raises(RuntimeError):
        hooked_forward(resnet18, torch.zeros(1, 5, 64, 64), ["layer4"])  # wrong channel count
    assert not any(m._forward_hooks for m in resnet18.modules())
    assert all(p.requires_grad for p in resnet18.parameters())


def test_inplace_relu_after_layer_does_not_change_activations() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(inplace=True),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3),
    ).eval()
    x = torch.randn(2, 3, 16, 16)
    forward = hooked_forward(model, x, ["0"])
    assert (forward.activations["0"] < 0).any(), "captured values are pre-ReLU"
    maps = cam.grad_cam(forward, torch.arange(2), torch.tensor([0, 1]))["0"]
    assert maps.shape == (2, 16, 16)


def test_box_scores() -> None:
    maps = torch.zeros(2, 4, 4)
    maps[0, 0, 0] = 1.0  # all energy top-left
    maps[1] = 1.0  # uniform
    boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0], [0.0, 0.0, 16.0, 8.0]])
    scores = cam.score_maps(maps, boxes, 16)
    assert scores.peak_row[0] == 0 and scores.peak_col[0] == 0
    assert scores.box_area_fraction[1].item() == pytest.approx(0.5)
    assert scores.energy_in_box[1].item() == pytest.approx(0.5, abs=1e-6), "uniform map scores the area fraction"
    assert scores.energy_in_box[0].item() > 0.9
    assert scores.pointing_hit[0].item() == 1.0
    no_box = cam.score_maps(maps, torch.full((2, 4), float("nan")), 16)
    assert torch.isnan(no_box.energy_in_box).all() and torch.isnan(no_box.pointing_hit).all()


def test_box_tolerance_grows_the_box_for_coarse_maps() -> None:
    maps = torch.zeros(1, 4, 4)
    maps[0, 1, 2] = 1.0  # peak cell just right of the box (cells are 4 px at 16 px input)
    box = torch.tensor([[0.0, 0.0, 8.0, 8.0]])
    strict = cam.score_maps(maps, box, 16)
    tolerant = cam.score_maps(maps, box, 16, tolerance=2.0)
    assert strict.pointing_hit[0].item() == 0.0 and tolerant.pointing_hit[0].item() == 1.0
    assert tolerant.box_area_fraction[0].item() == pytest.approx(10 * 10 / 256)
    assert tolerant.energy_in_box[0].item() > strict.energy_in_box[0].item()
    uniform = cam.score_maps(torch.ones(1, 4, 4), torch.tensor([[12.0, 12.0, 16.0, 16.0]]), 16, tolerance=2.0)
    assert uniform.box_area_fraction[0].item() == pytest.approx(6 * 6 / 256)  # clamped at the image edge
    assert uniform.energy_in_box[0].item() == pytest.approx(6 * 6 / 256, abs=1e-6)
