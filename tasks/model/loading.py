"""Model loading: torchvision architecture, timm or Hugging Face model + weights, a TorchScript
archive, or a user factory.

A model is described by a :class:`ModelSpec` (plain strings, so it can travel between
Prefect tasks and processes) and built once per process by :func:`load_model`.
Checkpoints load with ``torch.load(weights_only=True)``; a full pickle is refused unless
the user says they trust it. ``timm:NAME``, ``hf:PATH_OR_ID`` and ``torchscript:FILE`` are built by
:mod:`visaudit.tasks.model.sources`; a TorchScript model has no explained layer (its modules
refuse hooks): ``layers`` is empty and ``layer_reason`` says so. Which layer is explained, and why, is chosen by
:mod:`visaudit.tasks.model.layers`.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib
import importlib.util
import inspect
import pickle
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from visaudit.tasks.data.images import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from visaudit.tasks.model.errors import ModelError
from visaudit.tasks.model.layers import check_layer, choose_layer, probe
from visaudit.tasks.model.layout import Layout
from visaudit.tasks.model.sources import (
    HF_PREFIX,
    NO_LAYER,
    TIMM_PREFIX,
    TORCHSCRIPT_PREFIX,
    build_hf,
    build_timm,
    build_torchscript,
    is_torchscript,
    read_torchscript,
)
from visaudit.tasks.model.spec import ModelSpec


@dataclass
class LoadedModel:
    """A model ready to audit: in eval mode on its device, with the layers to explain."""

    model: nn.Module
    device: torch.device
    num_classes: int
    layers: list[str]  # empty for a TorchScript model: no layer can be hooked
    preprocess: Preprocess | None  # known from torchvision weights, else None
    categories: list[str] | None  # class names shipped with torchvision weights
    fingerprint: str
    layer_shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    layouts: dict[str, Layout] = field(default_factory=dict)  # how each map-like output is read
    layer_reason: str = ""  # why the explained layer was chosen ("named with --layer" when it was)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present; an explicit device that is not there is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {name!r} requested but CUDA is not available here; use --device cpu")
    return device


@functools.lru_cache(maxsize=4)
def load_model(spec: ModelSpec, device_name: str = "auto", input_size: int = 224) -> LoadedModel:
    """Build, load and prepare the model once per process (cached by spec and device)."""
    device = resolve_device(device_name)
    state, fingerprint = _read_weights(spec)
    if spec.arch is not None and spec.arch.startswith(HF_PREFIX):
        if spec.weights is not None:
            raise ModelError(f"--arch {spec.arch}: a Hugging Face model loads its weights from its folder or hub id; "
                             "drop --weights")
        built = build_hf(spec.arch)
        model, preprocess, categories = built.model, built.preprocess, built.categories
        fingerprint = built.fingerprint or fingerprint
    elif spec.arch is not None and spec.arch.startswith(TORCHSCRIPT_PREFIX):
        for flag, given in (("--weights", spec.weights), ("--layer", spec.layer)):
            if given is not None:
                raise ModelError(f"--arch {spec.arch}: a TorchScript archive holds its own weights and its modules "
                                 f"refuse the hooks a layer needs; drop {flag}")
        built = build_torchscript(spec.arch)
        model, preprocess, categories = built.model, None, None
        fingerprint = built.fingerprint or fingerprint
    elif spec.arch is not None and spec.arch.startswith(TIMM_PREFIX):
        size = classifier_size(state) if isinstance(state, dict) else None
        built = build_timm(spec.arch, None if state is not None else spec.weights, size)
        model, preprocess, categories = built.model, built.preprocess, built.categories
    elif spec.arch is not None:
        model, preprocess, categories = _build_torchvision(spec, state)
    else:
        model, preprocess, categories = _build_factory(spec, state), None, None
    if state is not None:
        _load_state(model, state, spec)
    model.eval().to(device)
    if device.type == "cuda":  # NHWC: the layout tensor cores want for convolutions
        model.to(memory_format=torch.channels_last)
    size = preprocess.crop if preprocess is not None else input_size
    found = probe(model, device, size)
    if isinstance(model, torch.jit.ScriptModule):
        layers, reason = [], NO_LAYER
    elif spec.layer is not None:
        check_layer(model, spec.layer, found.shapes)
        layers, reason = [spec.layer], "named with --layer"
    else:
        choice = choose_layer(model, found, device, size)
        layers, reason = [choice.name], choice.reason
    return LoadedModel(model, device, found.num_classes, layers, preprocess, categories, fingerprint,
                       found.shapes, found.layouts, reason)


def _read_weights(spec: ModelSpec) -> tuple[dict[str, torch.Tensor] | nn.Module | None, str]:
    """Read a weights file (state_dict) if the spec names one; returns it and its sha256."""
    if spec.weights is None or not _is_file_spec(spec.weights):
        return None, hashlib.sha256(f"{spec.name}:{spec.weights}".encode()).hexdigest()
    path = Path(spec.weights).expanduser()
    if not path.is_file():
        raise ModelError(f"{path}: weights file not found")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if is_torchscript(path):  # its weights, into the Python architecture named (every method applies then)
        return dict(read_torchscript(path).state_dict()), digest
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not spec.trust_checkpoint:
            raise ModelError(
                f"{path}: the checkpoint holds pickled Python objects, which can run code when loaded; "
                "re-save it with torch.save(model.state_dict(), path), or pass --trust-checkpoint "
                "if you trust where it came from"
            ) from exc
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ModelError(f"{path}: cannot read the weights ({type(exc).__name__}: {exc})") from exc
    if isinstance(obj, nn.Module):
        return obj, digest
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        tensors = {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors, digest
    raise ModelError(f"{path}: not a state_dict (a dict of tensors); save it with torch.save(model.state_dict(), path)")


def _is_file_spec(weights: str) -> bool:
    """Whether ``weights`` names a file (rather than a torchvision weights name such as ``IMAGENET1K_V1``)."""
    return weights.endswith((".pt", ".pth", ".bin", ".ckpt")) or "/" in weights or Path(weights).exists()


def classifier_size(state: dict[str, torch.Tensor]) -> int | None:
    """Number of classes: the output size of the last classifier weight in the state_dict, a
    2-D linear weight or a 1x1 conv's (SqueezeNet's classifier is ``Conv2d(512, K, 1)``)."""
    for key in reversed(list(state)):
        value = state[key]
        if key.endswith("weight") and (value.dim() == 2 or (value.dim() == 4 and value.shape[2:] == (1, 1))):
            return int(value.shape[0])
    return None


_AUX_PREFIXES = {"inception_v3": ("AuxLogits.",), "googlenet": ("aux1.", "aux2.")}


def _build_torchvision(
    spec: ModelSpec, state: dict[str, torch.Tensor] | nn.Module | None
) -> tuple[nn.Module, Preprocess | None, list[str] | None]:
    """A torchvision architecture, with its preprocessing and class names when built from named weights."""
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if spec.arch not in names:
        close = difflib.get_close_matches(spec.arch or "", names, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see torchvision.models.list_models()"
        raise ModelError(f"unknown architecture {spec.arch!r}{hint}")
    if isinstance(state, nn.Module):
        return state, None, None
    if spec.weights is not None and not _is_file_spec(spec.weights):
        enum = torchvision.models.get_model_weights(spec.arch)
        try:
            weights = enum[spec.weights]
        except KeyError:
            raise ModelError(
                f"unknown weights {spec.weights!r} for {spec.arch}; known: {', '.join(enum.__members__)}"
            ) from None
        model = torchvision.models.get_model(spec.arch, weights=weights)
        transforms = weights.transforms()
        preprocess = Preprocess(
            resize=int(transforms.resize_size[0]),
            crop=int(transforms.crop_size[0]),
            mean=tuple(transforms.mean),
            std=tuple(transforms.std),
        )
        return model, preprocess, list(weights.meta.get("categories") or []) or None
    kwargs: dict[str, Any] = {}
    if state is not None and (size := classifier_size(state)) is not None:
        kwargs["num_classes"] = size
    if spec.arch in _AUX_PREFIXES:  # auxiliary heads only when the weights carry them (they never run in eval)
        kwargs["aux_logits"] = state is not None and any(k.startswith(_AUX_PREFIXES[spec.arch]) for k in state)
        kwargs["init_weights"] = True
    return torchvision.models.get_model(spec.arch, weights=None, **kwargs), None, None


def _build_factory(spec: ModelSpec, state: dict[str, torch.Tensor] | nn.Module | None) -> nn.Module:
    """The user's factory's model (given ``num_classes`` from the weights when it takes it)."""
    if isinstance(state, nn.Module):
        return state
    function = import_factory(spec.factory or "")
    kwargs: dict[str, Any] = {}
    size = classifier_size(state) if state is not None else None
    if size is not None and "num_classes" in inspect.signature(function).parameters:
        kwargs["num_classes"] = size
    try:
        model = function(**kwargs)
    except Exception as exc:
        raise ModelError(f"model factory {spec.factory} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"model factory {spec.factory} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def import_factory(reference: str) -> Callable[..., Any]:
    """Import ``package.module:function`` or ``path/to/file.py:function``."""
    module_ref, sep, attr = reference.rpartition(":")
    if Path(reference).expanduser().is_file() and is_torchscript(Path(reference).expanduser()):
        raise ModelError(
            f"--model {reference}: a TorchScript archive; audit it as the whole model with --arch "
            f"torchscript:{reference} (model-agnostic methods only: its modules refuse hooks), or name its "
            f"architecture (--arch NAME, or --model path/to/file.py:function) with --weights {reference} "
            "for every method"
        )
    if not sep or not module_ref or not attr:
        raise ModelError(f"--model {reference!r}: expected 'package.module:function' or 'path/to/file.py:function'")
    if module_ref.endswith(".py"):
        path = Path(module_ref).expanduser().resolve()
        if not path.is_file():
            raise ModelError(f"{path}: model factory file not found")
        module_spec = importlib.util.spec_from_file_location(f"visaudit_user_model_{path.stem}", path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_spec.name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            raise ModelError(f"{path}: importing the model file raised {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(module_ref)
        except ImportError as exc:
            raise ModelError(f"--model {reference!r}: cannot import {module_ref!r} ({exc})") from exc
    function = getattr(module, attr, None)
    if not callable(function):
        raise ModelError(f"--model {reference!r}: {module_ref} has no callable {attr!r}")
    return function


def _load_state(model: nn.Module, state: dict[str, torch.Tensor] | nn.Module, spec: ModelSpec) -> None:
    """Load a state_dict strictly; on mismatch, list the offending keys."""
    if isinstance(state, nn.Module):
        return
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if keys:
                more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
                parts.append(f"{label}: {', '.join(keys[:5])}{more}")
        raise ModelError(
            f"{spec.weights}: weights do not fit {spec.name} ({'; '.join(parts)}); "
            "check --arch/--model matches the architecture the weights were saved from"
        )
    model.load_state_dict(state)


def default_preprocess(loaded: LoadedModel, resize: int | None, crop: int | None) -> Preprocess:
    """Preprocessing from the weights' transforms when known, overridden by flags, else ImageNet defaults."""
    base = loaded.preprocess or Preprocess(resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    crop = crop or base.crop
    resize = resize or (base.resize if base.crop == crop else crop)
    return Preprocess(resize=resize, crop=crop, mean=base.mean, std=base.std)
