"""Model sources beyond torchvision: ``timm:NAME``, ``hf:PATH_OR_ID`` and ``torchscript:FILE``.

timm and transformers are optional extras (``pip install 'visaudit[timm]'``,
``'visaudit[hf]'``); a missing one is a one-line error naming the extra. A Hugging Face
image classifier returns an output object; :class:`LogitsOnly` unwraps its ``.logits`` so
the rest of visaudit sees (N, K) class scores, and its class names come from the config's
``id2label``. A TorchScript archive (``torch.jit.save``) is read with ``torch.jit.load``:
no pickle, but the archive's own TorchScript code runs whenever the model does; its
modules refuse forward hooks, so it is audited without a layer (:data:`NO_LAYER`).
"""

from __future__ import annotations

import hashlib
import importlib
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from visaudit.tasks.data.images import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from visaudit.tasks.model.errors import ModelError

TIMM_PREFIX = "timm:"
HF_PREFIX = "hf:"
TORCHSCRIPT_PREFIX = "torchscript:"
NO_LAYER = "no layer: TorchScript model, model-agnostic methods only"


@dataclass
class Built:
    """A model from a zoo, with the preprocessing and class names it ships with (None when unknown)."""

    model: nn.Module
    preprocess: Preprocess | None = None
    categories: list[str] | None = None
    fingerprint: str | None = None  # sha256 of a local model folder's files


def _extra(module: str, extra: str, arch: str) -> ModuleType:
    """Import an optional dependency, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ModelError(f"--arch {arch}: needs {module}, which is not installed; pip install 'visaudit[{extra}]'") from None


def build_timm(arch: str, weights: str | None, num_classes: int | None) -> Built:
    """``timm:NAME``: random weights (a ``--weights`` state_dict is loaded afterwards), or
    with ``--weights pretrained`` / ``--weights TAG`` timm's pretrained weights (network).
    The preprocessing is timm's data config for the model (input size, crop_pct, mean/std)."""
    timm = _extra("timm", "timm", arch)
    name = arch.removeprefix(TIMM_PREFIX)
    if not timm.list_models(name.split(".")[0]) and not timm.list_models(name):
        raise ModelError(f"--arch {arch}: timm has no model {name!r}; see timm.list_models('*vit*')")
    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    pretrained = weights is not None
    if pretrained and weights != "pretrained":
        name = f"{name}.{weights}"
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as exc:
        raise ModelError(f"--arch {arch}: timm could not build {name!r} ({type(exc).__name__}: {exc})") from exc
    config = timm.data.resolve_data_config({}, model=model)
    crop = int(config["input_size"][-1])
    preprocess = Preprocess(resize=int(round(crop / config.get("crop_pct", 0.875))), crop=crop,
                            mean=tuple(config["mean"]), std=tuple(config["std"]))
    return Built(model, preprocess)


class LogitsOnly(nn.Module):
    """A Hugging Face image classifier seen as ``x -> logits``: ``model(pixel_values=x).logits``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def build_hf(arch: str) -> Built:
    """``hf:PATH_OR_ID``: a ``save_pretrained`` folder or a hub id (network), its class names
    from ``config.id2label`` and its preprocessing from the image processor when one is saved,
    else the config's ``image_size`` with ImageNet mean/std."""
    transformers = _extra("transformers", "hf", arch)
    source = arch.removeprefix(HF_PREFIX)
    try:
        model = transformers.AutoModelForImageClassification.from_pretrained(source)
    except Exception as exc:
        raise ModelError(f"--arch {arch}: cannot load a Hugging Face image classifier from {source!r} "
                         f"({type(exc).__name__}: {exc}); give a save_pretrained folder or a hub id") from exc
    config = model.config
    labels = getattr(config, "id2label", None) or {}
    categories = [str(labels[i]) for i in sorted(labels)] if len(labels) == config.num_labels else None
    size = getattr(config, "image_size", 224)
    size = int(size if isinstance(size, int) else size[0])
    preprocess = Preprocess(resize=size, crop=size, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(source)
        preprocess = Preprocess(resize=size, crop=size, mean=tuple(processor.image_mean), std=tuple(processor.image_std))
    except Exception:  # no preprocessor_config.json saved: the config's size and ImageNet statistics
        pass
    folder = Path(source).expanduser()
    digest = None
    if folder.is_dir():
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        digest = hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in files)).hexdigest()
    return Built(LogitsOnly(model), preprocess, categories, digest)


def is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive (``torch.jit.save``): a zip holding ``constants.pkl``."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def read_torchscript(path: Path) -> torch.jit.ScriptModule:
    """A TorchScript archive, loaded on the CPU with ``torch.jit.load`` (the TorchScript loader
    builds it from the archive's code and constants; no Python pickle is run)."""
    try:
        with warnings.catch_warnings():  # torch.jit's deprecation notice is not the user's concern here
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise ModelError(f"{path}: cannot read the TorchScript archive ({type(exc).__name__}: {exc})") from exc


def build_torchscript(arch: str) -> Built:
    """``torchscript:FILE``: the archive as the whole model, fingerprinted by the file's sha256.
    Its modules refuse forward hooks, so no layer is explained: only the methods that need
    none apply (occlusion, class impressions); the others are skipped with their note."""
    path = Path(arch.removeprefix(TORCHSCRIPT_PREFIX)).expanduser()
    if not path.is_file():
        raise ModelError(f"--arch {arch}: {path} not found; give the file torch.jit.save wrote")
    if not is_torchscript(path):
        raise ModelError(f"--arch {arch}: {path} is not a TorchScript archive (torch.jit.save writes one); "
                         "a state_dict goes with its architecture: --arch NAME --weights FILE")
    return Built(read_torchscript(path), fingerprint=hashlib.sha256(path.read_bytes()).hexdigest())
