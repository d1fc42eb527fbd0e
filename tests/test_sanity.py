"""Model-randomisation sanity check (Adebayo et al. 2018)."""

from __future__ import annotations

import pytest
import torch

from visaudit.tasks.explain import sanity


def test_cascade_goes_from_the_classifier_down(resnet18: torch.nn.Module) -> None:
    steps = sanity.cascade(resnet18, ["layer1", "layer2", "layer3", "layer4"])
    assert steps == [["fc"], ["fc", "layer4"], ["fc", "layer4", "layer3"], ["fc", "layer4", "layer3", "layer2"],
                     ["fc", "layer4", "layer3", "layer2", "layer1"]]


def test_randomised_copy_changes_only_the_named_modules(resnet18: torch.nn.Module) -> None:
    before = {k: v.clone() for k, v in resnet18.state_dict().items()}
    copy = sanity.randomised_copy(resnet18, ["fc", "layer4"], seed=1)
    after = copy.state_dict()
    for name, value in before.items():
        changed = not torch.equal(value, after[name])
        if name.startswith(("fc.", "layer4.")) and value.dim() > 1:  # conv and linear weights
            assert changed, name
        elif not name.startswith(("fc.", "layer4.")):
            assert not changed, name
    assert all(torch.equal(v, resnet18.state_dict()[k]) for k, v in before.items()), "the user's model is untouched"
    again = sanity.randomised_copy(resnet18, ["fc", "layer4"], seed=1)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in after.items()), "seeded"


def test_gradcam_depends_on_the_weights_guided_backprop_barely(resnet18, photo_batch) -> None:
    """Adebayo et al.'s finding: randomising the top layers scrambles Grad-CAM, while guided
    backprop keeps most of its ranking (it mostly reflects the input's edges)."""
    rows = sanity.sanity_check(resnet18, photo_batch, "layer4", ["layer3", "layer4"], ("gradcam", "guided_backprop"))
    assert list(rows["step"].unique()) == [1, 2, 3]
    top = rows[rows["step"] == 2].set_index("method")["spearman_mean"]  # fc + layer4 randomised
    assert top["gradcam"] < 0.3
    assert top["guided_backprop"] > 0.8
    assert rows["images"].eq(4).all()


def test_needs_two_images(resnet18, photo_batch) -> None:
    with pytest.raises(ValueError, match="at least 2"):
        sanity.sanity_check(resnet18, photo_batch[:1], "layer4", ["layer4"], ("gradcam",))
