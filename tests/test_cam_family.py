"""The CAM family against independent implementations, on three model families.

pytorch-grad-cam (test-only dependency) min-max scales each map at the layer's resolution
resizes it with OpenCV and scales it again; our maps go through the same steps before comparing.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from captum.attr import LayerGradCam
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from visaudit.tasks.explain import cam
from visaudit.tasks.explain.cam_family import class_activation_maps, linear_head
from visaudit.tasks.model.hooks import hooked_forward

PEERS = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "xgradcam": XGradCAM, "layercam": LayerCAM,
         "hirescam": HiResCAM}
FAMILIES = {"resnet18": "layer4", "vgg11": "features.19", "mobilenet_v3_small": "features"}


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {name: torchvision.models.get_model(name, weights=None).eval() for name in FAMILIES}


@pytest.fixture(scope="module")
def small_photos(photo_batch: torch.Tensor) -> torch.Tensor:
    return F.interpolate(photo_batch, size=(128, 128), mode="bilinear", align_corners=False)


def _minmax(m: np.ndarray) -> np.ndarray:
    m = m - m.min()
    return m / (1e-7 + m.max())


def _peer_pipeline(maps: np.ndarray, size: int) -> np.ndarray:
    """pytorch-grad-cam's post-processing: min-max, OpenCV resize, min-max again."""
    return np.stack([_minmax(cv2.resize(_minmax(m).astype(np.float32), (size, size))) for m in maps])


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", list(PEERS))
def test_methods_equal_pytorch_grad_cam(models, small_photos, family: str, method: str) -> None:
    model, layer = models[family], FAMILIES[family]
    forward = hooked_forward(model, small_photos, [layer])
    target = forward.scores.detach().argmax(dim=1)
    n = small_photos.shape[0]
    ours = cam.explain(forward, torch.arange(n), target, (method,))[(method, layer)].detach().numpy()
    module = dict(model.named_modules())[layer]
    with PEERS[method](model=model, target_layers=[module]) as peer:
        theirs = peer(input_tensor=small_photos, targets=[ClassifierOutputTarget(int(t)) for t in target])
    # maps scaled to [0, 1]: float32 summation order differs between CPUs' kernels by ~1e-5 (XGrad-CAM on
    # mobilenet_v3_small: 1.03e-5 on one machine); a wrong weighting differs by far more
    np.testing.assert_allclose(_peer_pipeline(ours, small_photos.shape[-1]), theirs, atol=1e-4)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gradcam_equals_captum_on_each_family(models, small_photos, family: str) -> None:
    model, layer = models[family], FAMILIES[family]
    forward = hooked_forward(model, small_photos, [layer])
    target = forward.scores.detach().argmax(dim=1)
    ours = cam.grad_cam(forward, torch.arange(small_photos.shape[0]), target)[layer]
    theirs = LayerGradCam(model, dict(model.named_modules())[layer]).attribute(
        small_photos, target=target, relu_attributions=True)[:, 0].detach()
    scale = lambda m: m / m.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]  # noqa: E731
    torch.testing.assert_close(scale(ours), scale(theirs), atol=1e-5, rtol=1e-4)


def test_counterfactual_is_gradcam_of_negated_gradients(resnet18, photo_batch) -> None:
    forward = hooked_forward(resnet18, photo_batch, ["layer4"])
    target = forward.scores.detach().argmax(dim=1)
    maps = cam.explain(forward, torch.arange(4), target, ("gradcam", "counterfactual"))
    fresh = hooked_forward(resnet18, photo_batch, ["layer4"])
    acts = fresh.activations["layer4"].detach()
    grads = torch.autograd.grad(fresh.scores[torch.arange(4), target].sum(), fresh.activations["layer4"])[0]
    expected = F.relu((-grads.mean(dim=(2, 3), keepdim=True) * acts).sum(1))
    torch.testing.assert_close(maps[("counterfactual", "layer4")], expected)
    # Grad-CAM and its counterfactual split the signed map: where one is positive the other is zero
    assert ((maps[("gradcam", "layer4")] > 0) & (maps[("counterfactual", "layer4")] > 0)).sum() == 0


def test_cam_equals_gradcam_up_to_scale_for_gap_linear_heads(resnet18, photo_batch) -> None:
    forward = hooked_forward(resnet18, photo_batch, ["layer4"])
    weights = linear_head(resnet18, forward, "layer4")
    assert weights is not None and weights.shape == (1000, 512)
    target = forward.scores.detach().argmax(dim=1)
    cams = class_activation_maps(forward.activations["layer4"], weights, torch.arange(4), target)
    grad = cam.grad_cam(forward, torch.arange(4), target)["layer4"]
    # for GAP + linear, d y^c / d A^k_ij = w_k^c / (h w): Grad-CAM = CAM / (h w)
    torch.testing.assert_close(grad * 49, cams, rtol=1e-4, atol=1e-5)


def test_cam_does_not_apply_to_other_heads(models, small_photos) -> None:
    model = models["vgg11"]
    forward = hooked_forward(model, small_photos, ["features"])
    assert linear_head(model, forward, "features") is None


def test_layer_by_layer_from_one_backward(resnet18, photo_batch) -> None:
    layers = ["layer1", "layer2", "layer3", "layer4"]
    forward = hooked_forward(resnet18, photo_batch, layers)
    target = forward.scores.detach().argmax(dim=1)
    calls = []
    original = torch.autograd.grad
    try:
        torch.autograd.grad = lambda *a, **k: calls.append(1) or original(*a, **k)
        maps = cam.explain(forward, torch.arange(4), target, ("gradcam",))
    finally:
        torch.autograd.grad = original
    assert len(calls) == 1, "all stages from one autograd.grad call"
    assert [maps[("gradcam", l)].shape[-1] for l in layers] == [56, 28, 14, 7]
    for layer in layers:  # each equals a single-layer run
        single = hooked_forward(resnet18, photo_batch, [layer])
        torch.testing.assert_close(maps[("gradcam", layer)], cam.grad_cam(single, torch.arange(4), target)[layer])
