"""The explanation bundle on vision transformers against one plain forward and against
pytorch-grad-cam with its reshape_transform, in one run, as ratios.

Bundle = visaudit's ONE hooked forward + one backward giving Grad-CAM, Grad-CAM++ and
LayerCAM at the automatically chosen layer for the predicted class; pytorch-grad-cam
computes the same three maps on the same layer (one forward + backward each, its
reshape_transform doing the token / channels-last layout). On a ViT also the attention
bundle: the same forward with every block's attention captured, attention rollout and
gradient-weighted rollout (one backward to the first block) and the three CAM maps. Random weights (the ViT head is
re-initialised: torchvision zeroes it). Run: ``.venv/bin/python benchmarks/bench_transformers.py
--batch 16 --reps 5`` (on 2 CPU cores use ``--batch 4 --reps 3``).
"""

from __future__ import annotations

import argparse
import functools

import torch
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, LayerCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from pytorch_grad_cam.utils.reshape_transforms import vit_reshape_transform
from timing import time_all

from visaudit.tasks.explain import cam
from visaudit.tasks.explain.attention_maps import attention_maps
from visaudit.tasks.model.attention import captured_attention
from visaudit.tasks.model.hooks import hooked_forward
from visaudit.tasks.model.loading import ModelSpec, load_model

METHODS = ("gradcam", "gradcam++", "layercam")
PEERS = (GradCAM, GradCAMPlusPlus, LayerCAM)


def _permute(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.permute(0, 3, 1, 2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--archs", default="vit_b_16,swin_t")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device {device}, batch {args.batch}, 224 px, {args.reps} repetitions (medians)")
    for arch in args.archs.split(","):
        torch.manual_seed(0)
        loaded = load_model(ModelSpec(arch=arch), str(device), 224)
        model, layer = loaded.model, loaded.layers[-1]
        if hasattr(model, "heads"):
            torch.nn.init.normal_(model.heads.head.weight, std=0.02)
        layout = loaded.layouts[layer]
        reshape = (functools.partial(vit_reshape_transform, height=layout.grid[0], width=layout.grid[1])
                   if layout.kind == "tokens" else _permute if layout.kind == "nhwc" else None)
        x = torch.randn(args.batch, 3, 224, 224, device=device)
        with torch.no_grad():
            target = model(x).argmax(1)
        module = dict(model.named_modules())[layer]
        peers = [peer(model=model, target_layers=[module], reshape_transform=reshape) for peer in PEERS]
        targets = [ClassifierOutputTarget(int(t)) for t in target]

        def forward() -> object:
            with torch.no_grad():
                return model(x)

        def ours() -> object:
            hooked = hooked_forward(model, x, [layer])
            return cam.explain(hooked, torch.arange(args.batch, device=device), target, METHODS)

        def theirs() -> object:
            return [peer(input_tensor=x, targets=targets) for peer in peers]

        def attention() -> object:
            sample = torch.arange(args.batch, device=device)
            with captured_attention(model, gradients=True) as captured:
                hooked = hooked_forward(model, x, [layer])
            maps = attention_maps(captured, hooked.scores, sample, target,
                                  ("attention_rollout", "gradient_rollout"), layout.grid)
            return maps, cam.explain(hooked, sample, target, METHODS)

        contenders = {"forward": forward, "visaudit": ours, "pytorch-grad-cam": theirs}
        if layout.kind == "tokens":
            contenders["attention"] = attention
        times = time_all(contenders, args.reps, device)
        print(f"{arch}: layer {layer} ({layout.kind}); forward {times['forward']:.3f} s, visaudit bundle "
              f"{times['visaudit']:.3f} s = {times['visaudit'] / times['forward']:.2f}x the forward, "
              f"pytorch-grad-cam {times['pytorch-grad-cam']:.3f} s = "
              f"{times['pytorch-grad-cam'] / times['visaudit']:.2f}x slower than visaudit")
        if "attention" in times:
            print(f"{arch}: attention bundle (rollout, gradient rollout, the CAM maps) {times['attention']:.3f} s = "
                  f"{times['attention'] / times['forward']:.2f}x the forward")
        for peer in peers:
            peer.activations_and_grads.release()


if __name__ == "__main__":
    main()
