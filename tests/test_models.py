"""Model loading: torchvision names, factories, weights checks, layer discovery."""

from __future__ import annotations

import pytest
import torch
import torchvision

from visaudit.tasks.model.errors import ModelError
from visaudit.tasks.model.layers import default_layer, probe
from visaudit.tasks.model.loading import ModelSpec, classifier_size, load_model


def test_arch_with_weights_file_sets_num_classes(tmp_path) -> None:
    weights = tmp_path / "r18.pt"
    torch.save(torchvision.models.resnet18(num_classes=7).state_dict(), weights)
    loaded = load_model(ModelSpec(arch="resnet18", weights=str(weights)), "cpu", 64)
    assert loaded.num_classes == 7
    assert loaded.layers == ["layer4"]
    assert not loaded.model.training


@pytest.mark.parametrize(
    "arch, layer", [("resnet18", "layer4"), ("vgg11", "features"), ("mobilenet_v3_small", "features"),
                    ("densenet121", "features")]
)
def test_default_layer_is_last_spatial_stage(arch: str, layer: str) -> None:
    model = torchvision.models.get_model(arch, weights=None, num_classes=3).eval()
    found = probe(model, torch.device("cpu"), 64)
    assert found.num_classes == 3
    assert default_layer(found.shapes, model) == layer


def test_factory_file_and_module(tiny_model_file) -> None:
    path, weights = tiny_model_file
    loaded = load_model(ModelSpec(factory=f"{path}:build", weights=str(weights)), "cpu", 32)
    assert loaded.num_classes == 3 and loaded.layers == ["3"]
    with pytest.raises(ModelError, match="cannot import"):
        load_model(ModelSpec(factory="no_such_pkg.mod:build"), "cpu", 32)
    with pytest.raises(ModelError, match="has no callable 'nope'"):
        load_model(ModelSpec(factory=f"{path}:nope"), "cpu", 32)


def test_weights_that_do_not_fit_list_the_keys(tmp_path) -> None:
    weights = tmp_path / "r34.pt"
    torch.save(torchvision.models.resnet34(num_classes=3).state_dict(), weights)
    with pytest.raises(ModelError) as info:
        load_model(ModelSpec(arch="resnet18", weights=str(weights)), "cpu", 64)
    message = str(info.value)
    assert "do not fit resnet18" in message and "unexpected: layer1.2" in message


def test_unknown_arch_suggests_close_names() -> None:
    with pytest.raises(ModelError, match="did you mean resnet18"):
        load_model(ModelSpec(arch="resnet-18"), "cpu", 64)


def test_full_pickle_refused_unless_trusted(tmp_path) -> None:
    path = tmp_path / "full.pt"
    torch.save(torchvision.models.resnet18(num_classes=2), path)
    with pytest.raises(ModelError, match="--trust-checkpoint"):
        load_model(ModelSpec(arch="resnet18", weights=str(path)), "cpu", 64)
    loaded = load_model(ModelSpec(arch="resnet18", weights=str(path), trust_checkpoint=True), "cpu", 64)
    assert loaded.num_classes == 2


def test_named_layer_must_be_spatial(tiny_model_file) -> None:
    path, weights = tiny_model_file
    with pytest.raises(ModelError, match="not a spatial"):
        load_model(ModelSpec(factory=f"{path}:build", weights=str(weights), layer="6"), "cpu", 32)
    with pytest.raises(ModelError, match="no such module"):
        load_model(ModelSpec(factory=f"{path}:build", weights=str(weights), layer="layer9"), "cpu", 32)


def test_classifier_size() -> None:
    assert classifier_size(torchvision.models.resnet18(num_classes=5).state_dict()) == 5


def test_missing_device_is_an_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ModelError, match="CUDA is not available"):
        load_model(ModelSpec(arch="resnet18"), "cuda", 64)
