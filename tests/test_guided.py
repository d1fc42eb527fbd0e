"""Guided Backpropagation and Guided Grad-CAM against Captum, sharing one forward with Grad-CAM."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from captum.attr import GuidedBackprop, GuidedGradCam, LayerGradCam

from visaudit.tasks.explain import cam
from visaudit.tasks.explain.catalogue import INPUT_LAYER
from visaudit.tasks.model.hooks import hooked_forward


@pytest.fixture(scope="module")
def photos(photo_batch: torch.Tensor) -> torch.Tensor:
    return F.interpolate(photo_batch, size=(112, 112), mode="bilinear", align_corners=False)


@pytest.mark.parametrize("family,layer", [("resnet18", "layer4"), ("vgg11", "features.19")])
def test_guided_methods_equal_captum(photos: torch.Tensor, family: str, layer: str) -> None:
    torch.manual_seed(0)
    model = torchvision.models.get_model(family, weights=None).eval()
    forward = hooked_forward(model, photos, [layer], guided=True)
    # two targets for image 0, one for the others: exercises the rounds
    sample = torch.tensor([0, 0, 1, 2, 3])
    target = torch.tensor([3, 7, 5, 1, 9])
    maps = cam.explain(forward, sample, target, ("gradcam", "guided_backprop", "guided_gradcam"))
    module = dict(model.named_modules())[layer]

    backprop = GuidedBackprop(model).attribute(photos[sample], target=target)
    guided_gradcam = GuidedGradCam(model, module).attribute(photos[sample], target=target, interpolate_mode="bilinear")
    gradcam = LayerGradCam(model, module).attribute(photos[sample], target=target, relu_attributions=True)[:, 0]

    ours_backprop = maps[("guided_backprop", INPUT_LAYER)]
    assert ours_backprop.shape == photos[sample].shape
    scale = backprop.abs().max()
    torch.testing.assert_close(ours_backprop / scale, backprop / scale, atol=1e-5, rtol=0)
    scale = guided_gradcam.abs().max()
    torch.testing.assert_close(maps[("guided_gradcam", INPUT_LAYER)] / scale, guided_gradcam / scale, atol=1e-5, rtol=0)
    # the shared forward leaves Grad-CAM's plain gradients untouched by the guided gates
    scale = gradcam.abs().max()
    torch.testing.assert_close(maps[("gradcam", layer)] / scale, gradcam / scale, atol=1e-5, rtol=0)


def test_guided_backprop_differs_from_plain_gradient(resnet18: torch.nn.Module, photo_batch: torch.Tensor) -> None:
    """The gates really change the backward: guided gradients are not the vanilla ones."""
    forward = hooked_forward(resnet18, photo_batch[:1], ["layer4"], guided=True)
    target = torch.tensor([1])
    guided = cam.explain(forward, torch.tensor([0]), target, ("guided_backprop",))[("guided_backprop", INPUT_LAYER)]
    x = photo_batch[:1].clone().requires_grad_(True)
    (plain,) = torch.autograd.grad(resnet18(x)[0, 1], x)
    assert not torch.allclose(guided, plain, atol=1e-6)


def test_guided_only_without_gradcam_in_result(resnet18: torch.nn.Module, photo_batch: torch.Tensor) -> None:
    forward = hooked_forward(resnet18, photo_batch[:2], ["layer4"], guided=True)
    maps = cam.explain(forward, torch.tensor([0, 1]), torch.tensor([0, 1]), ("guided_gradcam",))
    assert list(maps) == [("guided_gradcam", INPUT_LAYER)]


def test_guided_model_state_restored_even_on_error(resnet18: torch.nn.Module, photo_batch: torch.Tensor) -> None:
    before = {k: v.clone() for k, v in resnet18.state_dict().items()}
    forward = hooked_forward(resnet18, photo_batch[:1], ["layer4"], guided=True)
    cam.explain(forward, torch.tensor([0]), torch.tensor([2]), ("guided_backprop",))
    with pytest.raises(ValueError):
        hooked_forward(resnet18, photo_batch[:1], ["layer4", "no.such.layer"], guided=True)
    for module in resnet18.modules():
        assert not module._forward_hooks and not module._backward_hooks
    assert all(p.requires_grad for p in resnet18.parameters())
    assert all(torch.equal(before[k], v) for k, v in resnet18.state_dict().items())
    assert not resnet18.training


def test_guided_needs_relu_modules(photo_batch: torch.Tensor) -> None:
    class FunctionalRelu(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(F.relu(self.conv(x)).mean(dim=(2, 3)))

    with pytest.raises(ValueError, match="nn.ReLU"):
        hooked_forward(FunctionalRelu(), photo_batch[:1], ["conv"], guided=True)


def test_guided_methods_need_a_guided_forward(resnet18: torch.nn.Module, photo_batch: torch.Tensor) -> None:
    forward = hooked_forward(resnet18, photo_batch[:1], ["layer4"])
    with pytest.raises(ValueError, match="guided=True"):
        cam.explain(forward, torch.tensor([0]), torch.tensor([0]), ("guided_backprop",))
