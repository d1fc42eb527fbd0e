"""Feature views: first-layer filter grid and the most active channels."""

from __future__ import annotations

import numpy as np
import torch

from visaudit.tasks.explain import features


def test_first_conv_of_resnet(resnet18) -> None:
    name, module = features.first_conv(resnet18)
    assert name == "conv1" and module.out_channels == 64


def test_filter_grid_scales_each_kernel_on_its_own() -> None:
    weight = torch.zeros(5, 3, 3, 3)
    weight[0, 0, 0, 0] = 10.0  # one kernel with a huge range must not wash out the others
    weight[1, 1, 1, 1] = 0.01
    grid = features.filter_grid(weight, columns=4)
    cell = features.FILTER_PATCH_PX + 2
    assert grid.shape == (2 * cell + 2, 4 * cell + 2, 3) and grid.dtype == np.uint8
    second = grid[2 : 2 + features.FILTER_PATCH_PX, 2 + cell : 2 + cell + features.FILTER_PATCH_PX]
    assert second.max() == 255 and second.min() == 0


def test_top_channels_and_hook_removed(resnet18, photo_batch) -> None:
    acts = features.layer_activations(resnet18, photo_batch[:2], "layer3")
    assert acts.shape == (2, 256, 14, 14)
    assert all(not m._forward_hooks for m in resnet18.modules())
    indices, values = features.top_channels(acts, 6)
    means = acts.mean(dim=(2, 3))
    assert torch.equal(values, means.gather(1, indices))
    assert (values[:, :1] >= means.max(dim=1, keepdim=True).values).all()


def test_write_feature_views(tmp_path, resnet18, photo_batch) -> None:
    pixels = [np.zeros((224, 224, 3), dtype=np.uint8)] * 2
    index = features.write_feature_views(resnet18, photo_batch[:2], pixels, ["a", "b"], "layer4", tmp_path, k=3)
    assert index["filters"]["count"] == 64 and (tmp_path / "filters.png").is_file()
    assert [e["image_id"] for e in index["images"]] == ["a", "b"]
    assert all(len(e["channels"]) == 3 for e in index["images"])
    assert (tmp_path / features.INDEX_NAME).is_file()
