"""The demo's model: a small CNN (global-average-pool + linear head) and its CPU trainer.

``build_model`` is the factory the demo audits (``--model visaudit.tasks.demo.network:build_model``);
``train_model`` trains it on the generated shapes, deterministically, and caches the weights
beside a sidecar holding the recipe's fingerprint.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn

from visaudit.tasks.data.images import IMAGENET_MEAN, IMAGENET_STD
from visaudit.tasks.demo.recipe import DemoRecipe, recipe_fingerprint


def _stage(in_channels: int, out_channels: int) -> nn.Sequential:
    """Max-pool by 2, then two conv-bn-relu blocks."""
    return nn.Sequential(
        OrderedDict(
            pool=nn.MaxPool2d(2),
            conv1=nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            bn1=nn.BatchNorm2d(out_channels),
            relu1=nn.ReLU(inplace=True),
            conv2=nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            bn2=nn.BatchNorm2d(out_channels),
            relu2=nn.ReLU(inplace=True),
        )
    )


class DemoNet(nn.Module):
    """Small CNN for 96x96 input: a stem at full resolution and three max-pool stages
    (96 -> 48 -> 24 -> 12 pixels), global average pooling and one linear layer, so CAM
    and Grad-CAM apply to ``features.stage3`` (12x12) and layer-by-layer views find four stages."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            OrderedDict(
                stem=nn.Sequential(
                    OrderedDict(
                        conv=nn.Conv2d(3, 16, 3, padding=1, bias=False),
                        bn=nn.BatchNorm2d(16),
                        relu=nn.ReLU(inplace=True),
                    )
                ),
                stage1=_stage(16, 32),
                stage2=_stage(32, 64),
                stage3=_stage(64, 128),
            )
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.features(x))))


def build_model(num_classes: int = 4) -> nn.Module:
    """Factory for the demo CNN (importable as 'visaudit.tasks.demo.network:build_model')."""
    return DemoNet(num_classes)


# --------------------------------------------------------------------------- training


def load_split(data_dir: Path, split: str, classes: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of a split as one (N, 3, H, W) uint8 tensor, and their class indices."""
    frame = pd.read_csv(Path(data_dir) / f"{split}.csv")
    if unknown := sorted(set(frame["label"]) - set(classes)):
        raise ValueError(f"{data_dir}/{split}.csv: labels {unknown} are not among the recipe classes")
    arrays = []
    for relative in frame["path"]:
        with Image.open(Path(data_dir) / relative) as image:
            arrays.append(np.asarray(image.convert("RGB")))
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([classes.index(label) for label in frame["label"]], dtype=torch.long)
    return images, labels


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float in [0, 1] normalised with ImageNet mean/std."""
    return normalise(images.float() / 255.0)


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1] -> model input (ImageNet mean/std)."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


def fgsm_adversarial(model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor, epsilon: float,
                     loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """FGSM with a random start (see ``train_model``): the batch moved by at most ``epsilon``
    per pixel (in [0, 1] units) to raise the loss; the parameters' gradients are not touched."""
    delta = ((torch.rand_like(pixels) * 2 - 1) * epsilon).requires_grad_(True)
    loss = loss_fn(model(normalise((pixels + delta).clamp(0, 1))), labels)
    (grad,) = torch.autograd.grad(loss, delta)
    delta = (delta.detach() + 1.25 * epsilon * grad.sign()).clamp(-epsilon, epsilon)
    return (pixels + delta).clamp(0, 1)


@torch.inference_mode()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Predicted class indices for uint8 images, in eval mode."""
    model.eval()
    return torch.cat([model(to_input(images[i : i + batch_size])).argmax(1) for i in range(0, len(images), batch_size)])


def train_model(
    data_dir: Path, recipe: DemoRecipe, weights_path: Path, *, log: Callable[[str], None] = print
) -> dict:
    """Train build_model(len(recipe.classes)) on data_dir/train.csv and save its state_dict.

    No flips or crops: the corner mark must stay where it is for the bias to be learnt.
    With ``recipe.adversarial_epsilon`` > 0 each batch is replaced by its FGSM adversarial
    (random start; Wong, Rice & Kolter 2020)::

        delta_0 ~ U[-eps, eps],  delta = clip( delta_0 + 1.25 eps sign( grad_delta L(x + delta_0) ), -eps, eps )

    with epsilon ramped up linearly from 0 over the first half of the steps (a constant 4/255
    from the start left the model at 0.66-0.80 held-out accuracy, confusing squares and stars;
    ramped: 0.92, against 0.87 for plain training). A lightly robust model: the gradients of
    robust models are perceptually aligned (Santurkar et al. 2019), so its class impressions
    show discs, squares, wedges and spikes where a plain CNN's are textures. It costs one more
    forward+backward per batch.
    If weights_path exists and its JSON sidecar holds the recipe fingerprint, training is
    skipped and the stored metrics are returned. Returns (and stores in the sidecar)
    train_accuracy, test_accuracy, epochs and seconds.
    """
    weights_path = Path(weights_path)
    sidecar = weights_path.with_suffix(".json")
    fingerprint = recipe_fingerprint(recipe)
    if weights_path.is_file() and sidecar.is_file():
        stored = json.loads(sidecar.read_text())
        if stored.pop("fingerprint", None) == fingerprint:
            log(f"reusing {weights_path} (recipe {fingerprint})")
            return stored

    started = time.perf_counter()
    torch.manual_seed(recipe.seed)
    train_x, train_y = load_split(data_dir, "train", recipe.classes)
    test_x, test_y = load_split(data_dir, "test", recipe.classes)
    model = build_model(len(recipe.classes))
    optimiser = torch.optim.Adam(model.parameters(), lr=recipe.learning_rate)
    steps = math.ceil(len(train_x) / recipe.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=recipe.learning_rate, total_steps=recipe.epochs * steps
    )
    shuffle = torch.Generator().manual_seed(recipe.seed)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(1, recipe.epochs + 1):
        model.train()
        order = torch.randperm(len(train_x), generator=shuffle)
        total_loss, correct = 0.0, 0
        for start in range(0, len(order), recipe.batch_size):
            batch = order[start : start + recipe.batch_size]
            pixels = train_x[batch].float() / 255.0
            if recipe.adversarial_epsilon:  # ramped up linearly over the first half of training
                ramp = min(1.0, (schedule.last_epoch + 1) / (0.5 * recipe.epochs * steps))
                pixels = fgsm_adversarial(model, pixels, train_y[batch], ramp * recipe.adversarial_epsilon / 255.0,
                                          loss_fn)
            logits = model(normalise(pixels))
            loss = loss_fn(logits, train_y[batch])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            total_loss += float(loss.detach()) * len(batch)
            correct += int((logits.argmax(1) == train_y[batch]).sum())
        log(
            f"epoch {epoch}/{recipe.epochs}: loss {total_loss / len(order):.4f}, "
            f"train accuracy {correct / len(order):.3f} ({time.perf_counter() - started:.0f}s)"
        )

    metrics = {
        "train_accuracy": float((predict(model, train_x) == train_y).float().mean()),
        "test_accuracy": float((predict(model, test_x) == test_y).float().mean()),
        "epochs": recipe.epochs,
        "seconds": round(time.perf_counter() - started, 1),
    }
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    staging = weights_path.with_suffix(".tmp")
    torch.save(model.state_dict(), staging)
    os.replace(staging, weights_path)
    staging = weights_path.with_suffix(".json.tmp")
    staging.write_text(json.dumps({**metrics, "fingerprint": fingerprint}, indent=2) + "\n")
    os.replace(staging, sidecar)
    log(f"test accuracy {metrics['test_accuracy']:.3f}; weights saved to {weights_path}")
    return metrics
