"""Decoding: the GPU path (nvJPEG, exercised here through torchvision's CPU decoder of the
same API) places images exactly as the PIL path does."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from conftest import sample_photos
from PIL import Image

from visaudit.tasks.data.batches import decode_jpegs_on_gpu, fit_on_device, to_batch
from visaudit.tasks.data.images import Preprocess, decode


@pytest.mark.parametrize("size", [(300, 200), (200, 400), (256, 256), (90, 60)])
def test_device_decode_matches_pil_geometry_and_pixels(tmp_path, size) -> None:
    photo = sample_photos()[1].resize(size)  # a real photo (chelsea the cat) at several aspect ratios
    path = tmp_path / "photo.jpg"
    photo.save(path, format="JPEG", quality=92)
    pre = Preprocess(resize=128, crop=112)
    reference = decode(str(path), pre)
    (device_decoded,) = decode_jpegs_on_gpu([path.read_bytes()], pre, torch.device("cpu"))
    assert device_decoded is not None
    assert (device_decoded.height, device_decoded.width) == (reference.height, reference.width)
    assert (device_decoded.scale, device_decoded.left, device_decoded.top) == (
        reference.scale, reference.left, reference.top)
    pixels = device_decoded.pixels.permute(1, 2, 0).numpy().astype(np.float64)
    assert pixels.shape == reference.pixels.shape
    assert np.abs(pixels - reference.pixels).mean() < 4.0  # resampling filters differ slightly


def test_to_batch_mixes_device_and_pil_decoded_images(tmp_path) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buffer, format="JPEG")
    pre = Preprocess(resize=32, crop=32)
    (on_device,) = decode_jpegs_on_gpu([buffer.getvalue()], pre, torch.device("cpu"))
    path = tmp_path / "x.png"
    Image.new("RGB", (64, 64), (10, 200, 10)).save(path)
    batch = to_batch([on_device, decode(str(path), pre)], torch.device("cpu"))
    assert batch.shape == (2, 3, 32, 32) and batch.dtype == torch.uint8
    assert batch[0, 0].float().mean() > 150 and batch[1, 1].float().mean() > 150


def test_device_fit_resizes_images_of_one_size_as_one_batch_exactly_as_one_by_one(monkeypatch) -> None:
    g = torch.Generator().manual_seed(0)
    shapes = [(60, 90), (80, 80), (60, 90), (60, 90), (80, 80), (48, 48)]
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in shapes]
    pre = Preprocess(resize=48, crop=40)
    calls = []
    real = torch.nn.functional.interpolate
    monkeypatch.setattr(torch.nn.functional, "interpolate", lambda x, **kw: calls.append(len(x)) or real(x, **kw))
    together = fit_on_device(images, pre)
    assert sorted(calls) == [2, 3], "one resize per image size (48 x 48 needs none)"
    for image, got in zip(images, together):
        (alone,) = fit_on_device([image], pre)
        assert torch.equal(got.pixels, alone.pixels)
        assert (got.height, got.width, got.scale, got.left, got.top) == (
            alone.height, alone.width, alone.scale, alone.left, alone.top)
        assert got.pixels.shape == (3, 40, 40)
