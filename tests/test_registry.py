"""The method registry, the model's head and the hook helpers: one place for each choice."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from visaudit.tasks.explain import cam, cam_family, catalogue, registry
from visaudit.tasks.explain.guided import GUIDED_STORED_SIZE, guided_saliency
from visaudit.tasks.model.errors import ModelError
from visaudit.tasks.model.head import Head
from visaudit.tasks.model.hooks import eval_mode, forward_hooks, frozen_parameters, hooked_forward
from visaudit.tasks.model.loading import LoadedModel


def loaded(model: nn.Module, layer: str) -> LoadedModel:
    return LoadedModel(model.eval(), torch.device("cpu"), 3, [layer], None, None, "test")


def gap_linear() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


class Detached(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).detach().mean(dim=(2, 3)))


def test_names_titles_and_kinds() -> None:
    assert catalogue.method_names() == (
        "gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "counterfactual", "cam",
        "guided_backprop", "guided_gradcam", "attention_rollout", "gradient_rollout", "occlusion", "mil_patches",
        "impressions",
    )
    assert [catalogue.method_title(m) for m in ("gradcam", "gradcam++", "guided_gradcam", "impressions")] == [
        "Grad-CAM", "Grad-CAM++", "Guided Grad-CAM", "Class impressions"]
    assert catalogue.method_title("from_another_version") == "from_another_version"
    assert list(registry.GRADIENT_METHODS) == ["gradcam", "gradcam++", "xgradcam", "layercam", "hirescam",
                                               "counterfactual"]
    assert catalogue.GUIDED_METHODS == ("guided_backprop", "guided_gradcam")
    assert registry.METHODS["guided_backprop"].stored_layer("layer4") == catalogue.INPUT_LAYER
    assert registry.METHODS["cam"].stored_layer("layer4") == "layer4"
    assert registry.METHODS["mil_patches"].stored_layer("layer4") == catalogue.INPUT_LAYER
    assert catalogue.ATTENTION_METHODS == ("attention_rollout", "gradient_rollout")
    assert registry.METHODS["gradient_rollout"].stored_layer("blocks.11.norm1") == catalogue.ATTENTION_LAYER
    assert [m.name for m in registry.REGISTRY] == list(catalogue.method_names())  # every catalogued method computed
    with pytest.raises(ValueError, match="weight function goes with the 'gradient' kind"):
        registry.Method("broken", "Broken", "gradient")


def test_a_new_gradient_entry_is_all_explain_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry.GRADIENT_METHODS, "doubled", lambda a, g: 2 * cam_family.gradcam(a, g))
    model = gap_linear()
    forward = hooked_forward(model, torch.randn(2, 3, 8, 8), ["0"])
    maps = cam.explain(forward, torch.arange(2), torch.tensor([0, 1]), ("gradcam", "doubled"))
    torch.testing.assert_close(maps[("doubled", "0")], 2 * maps[("gradcam", "0")])


def test_check_methods_messages() -> None:
    good = loaded(gap_linear(), "1")
    assert registry.check_methods(good, ["gradcam", "cam", "guided_backprop", "occlusion"], ["0", "1"], 16) == {}
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['magic'\]; available: gradcam, gradcam\+\+"):
        registry.check_methods(good, ["gradcam", "magic"], ["1"], 16)
    vgg_like = loaded(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 3)), "0")
    skipped = registry.check_methods(vgg_like, ["gradcam", "cam", "occlusion"], ["0"], 16)
    assert list(skipped) == ["cam"] and "CAM does not apply to this model: its head on '0'" in skipped["cam"]
    with pytest.raises(ModelError, match="none of the requested methods applies to this model: CAM does not apply"):
        registry.check_methods(vgg_like, ["cam"], ["0"], 16)
    no_relu = loaded(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)), "0")
    skipped = registry.check_methods(no_relu, ["gradcam", "guided_backprop", "guided_gradcam"], ["0"], 16)
    assert list(skipped) == ["guided_backprop", "guided_gradcam"], "one note per skipped method"
    assert skipped["guided_gradcam"].startswith("guided backprop needs nn.ReLU modules and this model has none")
    detached = loaded(Detached(), "conv")
    with pytest.raises(ModelError, match="do not depend on this layer through autograd"):
        registry.check_methods(detached, ["gradcam"], ["conv"], 16)
    registry.check_methods(detached, ["occlusion"], ["conv"], 16)  # no gradients needed


def test_head() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    assert Head(multi_label=False).name == "softmax" and Head(multi_label=True).name == "sigmoid"
    softmax = Head(multi_label=False).probabilities(logits)
    assert softmax.dtype == torch.float32
    torch.testing.assert_close(softmax, torch.softmax(logits.float(), dim=1))
    torch.testing.assert_close(Head(multi_label=True).probabilities(logits), torch.sigmoid(logits.float()))
    with pytest.raises(TypeError, match="multi_label must be a bool"):
        Head(multi_label="sigmoid")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\(N, K\) class scores"):
        Head(multi_label=False).probabilities(torch.zeros(3))


def test_hooks_and_flags_restored_when_the_forward_raises() -> None:
    model = gap_linear().train()
    model[0].eval()
    seen: list[torch.Size] = []
    with pytest.raises(RuntimeError):
        with forward_hooks([(model[0], lambda _m, _i, out: seen.append(out.shape))]), eval_mode(model), \
                frozen_parameters(model):
            assert not model.training and not any(p.requires_grad for p in model.parameters())
            model(torch.zeros(1, 5, 8, 8))  # wrong channel count
    assert model.training and not model[0].training and all(p.requires_grad for p in model.parameters())
    assert not model[0]._forward_hooks
    model(torch.zeros(1, 3, 8, 8))
    assert seen == []


def test_guided_saliency_pools_to_the_stored_size() -> None:
    gradients = torch.randn(2, 3, 224, 224)
    stored = guided_saliency(gradients)
    assert stored.shape == (2, GUIDED_STORED_SIZE, GUIDED_STORED_SIZE)
    torch.testing.assert_close(stored[:, 0, 0], gradients.abs().amax(dim=1)[:, :4, :4].mean(dim=(1, 2)))
    assert guided_saliency(torch.randn(1, 3, 32, 32)).shape == (1, 32, 32)
