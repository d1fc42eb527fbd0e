"""Decoding and preprocessing: bytes -> RGB -> resize shorter side -> centre crop -> uint8 batch.

Decoding runs in a thread pool (PIL releases the GIL); batches, decoding on a GPU and
normalisation on the device are :mod:`visaudit.tasks.data.batches` (torch). Each decoded image keeps the affine map from original
pixels to model-input pixels so that boxes can be compared with heatmaps.
"""

from __future__ import annotations

import io
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from visaudit.tasks.data.reads import ReadPolicy, read_bytes

if TYPE_CHECKING:  # decoding on the CPU needs no torch (the report decodes its figures' images)
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALISATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),  # (x - mean) / std
    "unit": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),  # x in [0, 1]
    "symmetric": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # 2x - 1 in [-1, 1]
}  # the names --normalise takes


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to ``resize`` pixels, centre-crop ``crop`` x ``crop``, normalise;
    ``channels = "bgr"`` feeds the model the colour channels reversed (mean/std in that order)."""

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    channels: str = "rgb"

    def __post_init__(self) -> None:
        if self.crop < 8:
            raise ValueError(f"crop size must be at least 8 pixels, got {self.crop}")
        if self.resize < self.crop:
            raise ValueError(f"resize ({self.resize}) must be at least the crop size ({self.crop})")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need three values each, std positive")
        if self.channels not in ("rgb", "bgr"):
            raise ValueError(f"channels must be rgb or bgr, got {self.channels!r}")


@dataclass(frozen=True)
class Decoded:
    """One decoded image: the model-input pixels and how original pixels map onto them."""

    pixels: np.ndarray  # (crop, crop, 3) uint8; or, decoded on a GPU, a (3, crop, crop) uint8 tensor there
    height: int  # original size
    width: int
    scale: float  # input = original * scale - offset
    left: int
    top: int


class ImageError(ValueError):
    """Image bytes that are not decoded; the message names the file and what it is."""


def open_rgb(data: bytes, name: str = "image", pre: Preprocess | None = None,
             max_aspect_ratio: float = 100.0) -> Image.Image:
    """Decode image bytes to RGB, applying EXIF orientation and flattening transparency on white.

    The header is checked before any pixel is decoded: a 0-pixel side, an aspect ratio over
    ``max_aspect_ratio`` (a 1 x 100,000 image passes PIL's pixel-count bomb check, then
    resizing its shorter side to ``pre.resize`` would ask for 2.6e9 pixels), or a resized size
    over PIL's ``MAX_IMAGE_PIXELS`` is an :class:`ImageError` naming ``name``; so is a file
    PIL cannot identify, with what it is (HEIC, SVG, HTML, text ...).
    """
    with _open_checked(data, name, pre, max_aspect_ratio) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")


def _open_checked(data: bytes, name: str, pre: Preprocess | None, max_aspect_ratio: float) -> Image.Image:
    """The image opened lazily (its header read, no pixel decoded) and its geometry checked."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
        raise ImageError(f"{name}: {describe(data)}") from None
    try:
        check_geometry(image.size, name, pre, max_aspect_ratio)
    except ImageError:
        image.close()
        raise
    return image


def check_geometry(size: tuple[int, int], name: str, pre: Preprocess | None, max_aspect_ratio: float) -> None:
    """Refuse, before decoding, an image with an empty side, an aspect ratio
    ``max(w, h) / min(w, h)`` over ``max_aspect_ratio``, or whose resized size
    ``resize^2 * max(w, h) / min(w, h)`` passes PIL's ``MAX_IMAGE_PIXELS``."""
    width, height = size
    if min(width, height) <= 0:
        raise ImageError(f"{name}: {width} x {height} pixels, an image with no pixels")
    ratio = max(width, height) / min(width, height)
    if ratio > max_aspect_ratio:
        raise ImageError(f"{name}: {width:,} x {height:,} pixels, an aspect ratio of {ratio:,.0f}:1, over the limit "
                         f"of {max_aspect_ratio:g}:1 (--max-aspect-ratio); not decoded")
    if pre is not None and Image.MAX_IMAGE_PIXELS and pre.resize**2 * ratio > Image.MAX_IMAGE_PIXELS:
        raise ImageError(f"{name}: {width:,} x {height:,} pixels would be resized to {pre.resize**2 * ratio:,.0f} "
                         f"pixels, over the limit of {Image.MAX_IMAGE_PIXELS:,}; not decoded")


_FTYP_BRANDS = {b"heic": "a HEIC image", b"heix": "a HEIC image", b"hevc": "a HEIC image", b"heif": "a HEIF image",
                b"mif1": "a HEIF image", b"msf1": "a HEIF image", b"avif": "an AVIF image", b"avis": "an AVIF image"}


def describe(data: bytes) -> str:
    """What bytes PIL cannot identify are, and the fix: the format their signature names
    (HEIC/HEIF/AVIF, a PNG with no pixels or a corrupt header, SVG, HTML, PDF, text) or
    their first bytes."""
    if not data:
        return "an empty file (0 bytes), not an image"
    if data[4:8] == b"ftyp" and data[8:12] in _FTYP_BRANDS:
        return f"{_FTYP_BRANDS[data[8:12]]}, a format this install cannot decode; convert it to JPEG or PNG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return _describe_png(data)
    if data.startswith(b"%PDF"):
        return "a PDF document, not an image"
    head = data[:1024].decode("utf-8", "replace").lstrip("\ufeff \t\r\n").lower()
    if head.startswith("<svg") or (head.startswith("<?xml") and "<svg" in head):
        return "an SVG (vector) image, which is not rasterised; render it to PNG"
    if head.startswith(("<!doctype html", "<html")):
        return "an HTML page, not an image (a web server's error page?)"
    if data[:1024].isascii() and all(c >= 32 or c in (9, 10, 13) for c in data[:1024]):
        return "text, not an image"
    return f"not an image format this install can decode (first bytes {data[:8].hex(' ')})"


def _describe_png(data: bytes) -> str:
    if len(data) < 33 or data[12:16] != b"IHDR":
        return "a truncated PNG (no complete IHDR header)"
    width, height = struct.unpack(">II", data[16:24])
    if zlib.crc32(data[12:29]) & 0xFFFFFFFF != struct.unpack(">I", data[29:33])[0]:
        return "a corrupt PNG (its IHDR header fails its CRC checksum)"
    if min(width, height) == 0:
        return f"a PNG of {width} x {height} pixels, an image with no pixels"
    return f"a PNG of {width} x {height} pixels that the decoder refuses (corrupt data)"


def fit(image: Image.Image, pre: Preprocess) -> tuple[Image.Image, float, int, int]:
    """Resize the shorter side to ``pre.resize`` and centre-crop; returns the crop and its affine map."""
    width, height = image.size
    scale = pre.resize / min(width, height)
    new_w, new_h = max(pre.resize, round(width * scale)), max(pre.resize, round(height * scale))
    resized = image.resize((new_w, new_h), Image.Resampling.BILINEAR) if (new_w, new_h) != image.size else image
    left = int(round((new_w - pre.crop) / 2.0))
    top = int(round((new_h - pre.crop) / 2.0))
    return resized.crop((left, top, left + pre.crop, top + pre.crop)), scale, left, top


def decode(uri: str, pre: Preprocess, policy: ReadPolicy = ReadPolicy()) -> Decoded:
    """Read (under ``policy``) and preprocess one image; raises on unreadable input (the
    caller records why)."""
    image = open_rgb(read_bytes(uri, policy), uri, pre, policy.limits.max_aspect_ratio)
    width, height = image.size
    crop, scale, left, top = fit(image, pre)
    return Decoded(np.asarray(crop, dtype=np.uint8), height, width, scale, left, top)


def decode_many(
    uris: list[str], pre: Preprocess, workers: int = 4, device: torch.device | None = None,
    policy: ReadPolicy = ReadPolicy(),
) -> list[Decoded | str]:
    """Decode images in parallel; an unreadable image yields its error message instead.

    On a CUDA ``device`` JPEG files are decoded, resized and cropped on the GPU (nvJPEG via
    ``torchvision.io.decode_jpeg``, batched; their ``pixels`` are then (3, crop, crop) uint8
    tensors on the device): PIL on the CPU tops out near 1,300 images/s on 16 cores. Other
    formats, and any JPEG the GPU decoder refuses, go through PIL.
    """

    def safe(uri: str) -> Decoded | str:
        try:
            return decode(uri, pre, policy)
        except Exception as exc:  # any decoder failure is recorded, never fatal
            return f"{type(exc).__name__}: {exc}"

    if device is None or device.type != "cuda":
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            return list(pool.map(safe, uris))

    def fetch(uri: str) -> bytes | str:
        try:
            data = read_bytes(uri, policy)
            _open_checked(data, uri, pre, policy.limits.max_aspect_ratio).close()  # the header only
            return data
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        datas = list(pool.map(fetch, uris))
    out: list[Decoded | str | None] = [d if isinstance(d, str) else None for d in datas]
    jpegs = [i for i, d in enumerate(datas) if isinstance(d, bytes) and d[:3] == b"\xff\xd8\xff"]
    from visaudit.tasks.data.batches import decode_jpegs_on_gpu  # torch: only on a CUDA device

    decoded = decode_jpegs_on_gpu([datas[i] for i in jpegs], pre, device) if jpegs else []  # type: ignore[misc]
    for i, result in zip(jpegs, decoded):
        out[i] = result
    rest = [i for i, d in enumerate(out) if d is None]
    if rest:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for i, result in zip(rest, pool.map(safe, [uris[i] for i in rest])):
                out[i] = result
    return out  # type: ignore[return-value]


def boxes_to_input(boxes: np.ndarray, decoded: list[Decoded]) -> np.ndarray:
    """Map (N,4) boxes in original pixels to model-input pixels (NaN stays NaN)."""
    scale = np.array([d.scale for d in decoded], dtype=np.float64)[:, None]
    offset = np.array([[d.left, d.top, d.left, d.top] for d in decoded], dtype=np.float64)
    return boxes * scale - offset
