"""Class impressions of a BGR model (``--channels bgr``) are optimised in the model's channel
order and saved in RGB: a model that calls "blue" what has much of its FIRST input channel
(blue, in BGR) gets a blue colour impression and a blue-dominated impression, not a red one."""

from __future__ import annotations

import numpy as np
import torch
from conftest import make_shapes
from PIL import Image

from visaudit.tasks.audit import steps
from visaudit.tasks.audit.plan import prepare_run
from visaudit.tasks.audit.request import AuditRequest
from visaudit.tasks.data import storage
from visaudit.tasks.model.channels import rgb_view

BGR_MODEL = '''
import torch
from torch import nn


def build(num_classes: int = 2) -> nn.Module:
    conv = nn.Conv2d(3, 2, 1, bias=False)  # output 0: the first input channel, output 1: the third
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0] = 1.0
        conv.weight[1, 2] = 1.0
    return nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
'''


def test_rgb_view_feeds_the_model_what_the_audit_feeds_it() -> None:
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 4, 3)
    x = torch.rand(2, 3, 8, 8)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    wrapped, m, s = rgb_view(model, mean, std, "bgr")
    expected = model((x.flip(1) - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    got = wrapped((x - torch.tensor(m).view(1, 3, 1, 1)) / torch.tensor(s).view(1, 3, 1, 1))
    torch.testing.assert_close(got, expected)
    assert rgb_view(model, mean, std, "rgb") == (model, mean, std)


def test_bgr_model_impressions_are_optimised_in_its_channel_order(tmp_path) -> None:
    manifest = make_shapes(tmp_path / "data", {"blue": 3, "red": 3})
    (tmp_path / "bgr.py").write_text(BGR_MODEL)
    out = tmp_path / "out"
    request = AuditRequest(source=str(manifest), out_dir=str(out), model=f"{tmp_path / 'bgr.py'}:build",
                           classes=None, resize=32, crop=32, channels="bgr", normalise="unit",
                           methods="gradcam,impressions", impression_iterations=30, setup_checks=False)
    plan = prepare_run(request)
    assert steps.impressions(plan) == 2
    table = storage.read_staged("impressions", out, plan.run_id).set_index("class_name")
    blue = table.loc["blue"]
    assert blue["colour_b"] > 200 and blue["colour_r"] < 55, blue[["colour_r", "colour_g", "colour_b"]]
    assert table.loc["red", "colour_r"] > 200 and table.loc["red", "colour_b"] < 55
    pixels = np.asarray(Image.open(plan.folder / blue["image_path"]), dtype=np.float64)
    assert pixels[..., 2].mean() > pixels[..., 0].mean() + 50  # the saved (RGB) impression of "blue" is blue
