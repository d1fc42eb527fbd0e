"""Every torchvision classification family, timm and Hugging Face models: the layer choice,
Grad-CAM against pytorch-grad-cam with ITS reshape_transform on the same layer, and the
user's model left untouched. Random weights, the smallest input each family takes."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from pytorch_grad_cam.utils.reshape_transforms import vit_reshape_transform
from test_cam_family import _peer_pipeline
from torchvision.models import resnet18 as torchvision_resnet18

from visaudit.tasks.explain import cam
from visaudit.tasks.model.hooks import hooked_forward
from visaudit.tasks.model.layers import stage_layers
from visaudit.tasks.model.loading import LoadedModel, ModelSpec, load_model

# one architecture per torchvision family: (input size, the layer it must get). ResNeXt and
# Wide ResNet are the ResNet class; MaxViT (blocks.3) needs 224 px and takes ~40 s here, so it
# is checked in benchmarks/bench_transformers.py's layer table instead.
TORCHVISION = {
    "alexnet": (64, "features.11"), "convnext_tiny": (64, "features"), "densenet121": (64, "features"),
    "efficientnet_b0": (64, "features"), "efficientnet_v2_s": (64, "features"), "googlenet": (64, "inception5b"),
    "inception_v3": (139, "Mixed_7c"), "mnasnet0_5": (64, "layers"),
    "mobilenet_v2": (64, "features"), "mobilenet_v3_small": (64, "features"), "regnet_x_400mf": (64, "trunk_output"),
    "resnet18": (64, "layer4"),
    "shufflenet_v2_x0_5": (64, "conv5"), "squeezenet1_1": (64, "classifier.2"), "swin_t": (64, "norm"),
    "swin_v2_t": (64, "norm"), "vgg11": (64, "features"), "vit_b_32": (224, "encoder.layers.encoder_layer_11.ln_1"),
}
ZOO = {"timm:vit_tiny_patch16_224": "blocks.11.norm1", "timm:convnext_atto": "stages",
       "timm:efficientnet_b0": "bn2"}


@functools.lru_cache(maxsize=None)
def _hf_folder(root: str) -> str:
    """A tiny transformers ViT built from a config (no download), saved like save_pretrained does."""
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64, num_labels=3,
                                    id2label={0: "cat", 1: "dog", 2: "fox"}, label2id={"cat": 0, "dog": 1, "fox": 2})
    torch.manual_seed(0)
    transformers.ViTForImageClassification(config).eval().save_pretrained(root)
    return root


def _load(name: str, size: int) -> LoadedModel:
    torch.manual_seed(0)
    loaded = load_model(ModelSpec(arch=name), "cpu", size)
    if name.startswith("vit_"):  # torchvision initialises the ViT head to zero: no gradient anywhere
        torch.nn.init.normal_(loaded.model.heads.head.weight, std=0.02)
    return loaded


def _reshape(loaded: LoadedModel, layer: str):
    """pytorch-grad-cam's reshape_transform for the layer: its documented ViT transform for
    class-token outputs, a permute for channels-last (N, H, W, C), none for CNN maps."""
    layout = loaded.layouts[layer]
    if layout.kind == "tokens":
        assert layout.prefix == 1
        return functools.partial(vit_reshape_transform, height=layout.grid[0], width=layout.grid[1])
    if layout.kind == "nhwc":
        return lambda tensor: tensor.permute(0, 3, 1, 2)
    return None


def _check(loaded: LoadedModel, photos: torch.Tensor, expected: str) -> None:
    """The chosen layer, Grad-CAM == pytorch-grad-cam on it (1e-5), and the model untouched."""
    model, layer = loaded.model, loaded.layers[-1]
    assert layer == expected, loaded.layer_reason
    assert loaded.layer_reason
    size = photos.shape[-1]
    flags = [p.requires_grad for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    before = model(photos).detach()
    forward = hooked_forward(model, photos, [layer])
    target = before.argmax(dim=1)
    ours = cam.grad_cam(forward, torch.arange(photos.shape[0]), target)[layer].detach()
    assert ours.shape[1:] == loaded.layer_shapes[layer] and ours.flatten(1).amax(1).gt(0).all(), "non-empty maps"
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags and [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(model(photos).detach(), before)
    module = dict(model.named_modules())[layer]
    with GradCAM(model=model, target_layers=[module], reshape_transform=_reshape(loaded, layer)) as peer:
        theirs = peer(input_tensor=photos, targets=[ClassifierOutputTarget(int(t)) for t in target])
    if not PEER_READS_INPLACE_RELU.get(type(model).__name__):
        np.testing.assert_allclose(_peer_pipeline(ours.numpy(), size), theirs, atol=1e-5)


# DenseNet's forward applies F.relu(inplace=True) to the hooked output: pytorch-grad-cam's
# activations are then the ReLU'd tensor, ours the layer's own output (see test_cam.py).
PEER_READS_INPLACE_RELU = {"DenseNet": True}


@pytest.fixture(scope="module")
def photos(photo_batch: torch.Tensor) -> dict[int, torch.Tensor]:
    """Two of the real photos at each input size used."""
    sizes = {size for size, _ in TORCHVISION.values()} | {32}
    return {s: F.interpolate(photo_batch[:2], size=(s, s), mode="bilinear", align_corners=False) for s in sizes}


@pytest.mark.parametrize("arch", list(TORCHVISION))
def test_torchvision_family(arch: str, photos) -> None:
    size, expected = TORCHVISION[arch]
    _check(_load(arch, size), photos[size], expected)


@pytest.mark.parametrize("arch", list(ZOO))
def test_timm_models(arch: str, photos) -> None:
    pytest.importorskip("timm")
    loaded = _load(arch, 224)
    assert loaded.preprocess is not None and loaded.preprocess.crop == 224, "timm's data config"
    _check(loaded, photos[224], ZOO[arch])


def test_hugging_face_vit(tmp_path_factory, photos) -> None:
    folder = _hf_folder(str(tmp_path_factory.mktemp("hf") / "tiny-vit"))
    loaded = _load(f"hf:{folder}", 32)
    assert loaded.categories == ["cat", "dog", "fox"], "class names from id2label"
    assert loaded.num_classes == 3, ".logits unwrapped"
    _check(loaded, photos[32], "model.vit.layers.1.layernorm_before")


def test_layer_by_layer_on_a_vit_is_one_layer_per_block() -> None:
    loaded = _load("vit_b_32", 224)
    stages = stage_layers(loaded.layer_shapes, loaded.model, layer=loaded.layers[-1])
    assert stages == [f"encoder.layers.encoder_layer_{i}.ln_1" for i in range(8, 12)]


def test_inception_and_googlenet_weights_with_or_without_aux_heads(tmp_path) -> None:
    import torchvision

    for arch, aux, cases in (("googlenet", "aux1.", (True, False)), ("inception_v3", "AuxLogits.", (False,))):
        for with_aux in cases:
            model = torchvision.models.get_model(arch, weights=None, num_classes=5, aux_logits=with_aux,
                                                 init_weights=True)
            path = tmp_path / f"{arch}-{with_aux}.pt"
            torch.save(model.state_dict(), path)
            loaded = load_model(ModelSpec(arch=arch, weights=str(path)), "cpu", 139 if arch == "inception_v3" else 64)
            assert loaded.num_classes == 5
            assert any(k.startswith(aux) for k in loaded.model.state_dict()) == with_aux


def test_squeezenet_class_count_from_its_conv_classifier(tmp_path) -> None:
    import torchvision

    path = tmp_path / "squeeze.pt"
    torch.save(torchvision.models.squeezenet1_1(num_classes=7).state_dict(), path)
    assert load_model(ModelSpec(arch="squeezenet1_1", weights=str(path)), "cpu", 64).num_classes == 7


@pytest.fixture(scope="module")
def resnet18_archives(tmp_path_factory, photos) -> tuple[torch.nn.Module, Path, Path]:
    """A random-weight resnet18 (3 classes) and its scripted and traced TorchScript archives."""
    import warnings

    torch.manual_seed(1)
    original = torchvision_resnet18(num_classes=3).eval()
    folder = tmp_path_factory.mktemp("torchscript")
    scripted, traced = folder / "scripted.pt", folder / "traced.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of torch.export
        torch.jit.script(original).save(str(scripted))
        torch.jit.trace(original, photos[64]).save(str(traced))
    return original, scripted, traced


def test_torchscript_archive_weights_into_the_named_architecture(resnet18_archives, photos) -> None:
    """A TorchScript file (scripted or traced) gives its weights to the Python architecture
    named with --arch, read with torch.jit.load (no pickle); alone it is refused in one line,
    because ScriptModules refuse the forward hooks every map method needs."""
    import warnings

    from visaudit.tasks.model.errors import ModelError

    original, scripted, traced = resnet18_archives
    x = photos[64]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of torch.export
        for path in (scripted, traced):
            loaded = load_model(ModelSpec(arch="resnet18", weights=str(path)), "cpu", 64)
            assert loaded.num_classes == 3 and loaded.layers == ["layer4"]
            torch.testing.assert_close(loaded.model(x), original(x), atol=1e-5, rtol=1e-5)
        with pytest.raises(ModelError, match="a TorchScript archive; audit it as the whole model with --arch torchscript:"):
            load_model(ModelSpec(factory=str(scripted)), "cpu", 64)
    with pytest.raises(RuntimeError, match="not supported on ScriptModules"):  # why: the premise, checked
        torch.jit.load(str(scripted)).layer4.register_forward_hook(lambda *_: None)


def test_torchscript_archive_as_the_whole_model(tmp_path, resnet18_archives, photos) -> None:
    """``--arch torchscript:FILE``: the archive is the model, with no layer; every method that
    hooks a layer is skipped with its note, the model-agnostic ones stay; a run of hooked methods
    only is the none-applies error; --weights / --layer are refused. The chunk size's activation
    measure (saved tensors: a ScriptModule refuses hooks) equals the hooks' on the eager model."""
    import warnings

    from visaudit.tasks.explain.catalogue import method_names
    from visaudit.tasks.explain.perturb import probe_activation
    from visaudit.tasks.explain.registry import check_methods
    from visaudit.tasks.model.errors import ModelError
    from visaudit.tasks.model.sources import NO_LAYER

    original, scripted, traced = resnet18_archives
    x = photos[64]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of torch.export
        for path in (scripted, traced):
            loaded = load_model(ModelSpec(arch=f"torchscript:{path}"), "cpu", 64)
            assert loaded.num_classes == 3 and loaded.layers == [] and loaded.layer_reason == NO_LAYER
            torch.testing.assert_close(loaded.model(x), original(x), atol=1e-5, rtol=1e-5)
            skipped = check_methods(loaded, method_names(), [], 64)
            assert set(method_names()) - set(skipped) == {"occlusion", "mil_patches", "impressions"} & set(method_names())
            assert skipped["gradcam"] == f"Grad-CAM needs hooks on the model's layers; {NO_LAYER}"
            logits, largest = probe_activation(loaded.model, x[:1])
            eager_logits, eager_largest = probe_activation(original, x[:1])
            assert largest == eager_largest > 0
            torch.testing.assert_close(logits, eager_logits, atol=1e-5, rtol=1e-5)
        with pytest.raises(ModelError, match="none of the requested methods applies to this model: no layer: TorchScript"):
            check_methods(loaded, ["gradcam", "cam", "guided_backprop"], [], 64)
        for extra in ({"weights": str(traced)}, {"layer": "layer4"}):
            with pytest.raises(ModelError, match="a TorchScript archive holds its own weights"):
                load_model(ModelSpec(arch=f"torchscript:{scripted}", **extra), "cpu", 64)
        with pytest.raises(ModelError, match="not found; give the file torch.jit.save wrote"):
            load_model(ModelSpec(arch=f"torchscript:{tmp_path / 'missing.pt'}"), "cpu", 64)
        torch.save(original.state_dict(), tmp_path / "state.pt")
        with pytest.raises(ModelError, match="is not a TorchScript archive .* --arch NAME --weights FILE"):
            load_model(ModelSpec(arch=f"torchscript:{tmp_path / 'state.pt'}"), "cpu", 64)
