"""Benchmark: the explanation bundle against one forward and against the peers, in one run.

Bundle = predictions + Grad-CAM + Grad-CAM++ + counterfactual Grad-CAM for the top-1 class
at the last stage. Contenders, same model, batch and device:
  forward   one plain ``torch.no_grad()`` forward of the batch (the limit)
  ours      one hooked forward + one ``autograd.grad`` -> all three maps
  pgc       pytorch-grad-cam: GradCAM, GradCAMPlusPlus, and GradCAM on the negated score
  captum    Captum: a forward for predictions, LayerGradCam, LayerGradCam on the negated score
            (Captum has no Grad-CAM++, so it computes one map less)
Then layer-by-layer Grad-CAM at 4 stages (ours, one backward) against one forward, and the
guided bundle (Grad-CAM + Guided Backprop + Guided Grad-CAM) against Captum and pytorch-grad-cam.

Usage: python benchmarks/bench_cam.py [--models resnet18,resnet50] [--batch 16] [--reps 5] [--device cpu]
Warm-up twice, contenders alternate within each repetition, medians and ratios reported.
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch
import torchvision

from benchmarks.timing import time_all
from visaudit.tasks.explain import cam
from visaudit.tasks.model.hooks import hooked_forward


def contenders(model: torch.nn.Module, x: torch.Tensor, layer: str) -> dict[str, Callable[[], object]]:
    from captum.attr import LayerGradCam
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    module = dict(model.named_modules())[layer]
    n = x.shape[0]

    def forward() -> object:
        with torch.no_grad():
            return model(x)

    def ours() -> object:
        fwd = hooked_forward(model, x, [layer])
        target = fwd.scores.detach().argmax(dim=1)
        probs = torch.softmax(fwd.scores.detach(), dim=1)
        maps = cam.explain(fwd, torch.arange(n, device=x.device), target, ("gradcam", "gradcam++", "counterfactual"))
        return probs, maps

    grad_cam = GradCAM(model=model, target_layers=[module])
    grad_cam_pp = GradCAMPlusPlus(model=model, target_layers=[module])

    def pgc() -> object:
        targets = [ClassifierOutputTarget(int(t)) for t in forward().argmax(dim=1)]
        negated = [lambda out, t=t: -out[t.category] for t in targets]
        return grad_cam(x, targets), grad_cam_pp(x, targets), grad_cam(x, negated), grad_cam.outputs

    layer_grad_cam = LayerGradCam(model, module)
    negated_cam = LayerGradCam(lambda inp: -model(inp), module)

    def captum() -> object:
        scores = forward()
        target = scores.argmax(dim=1)
        return (
            torch.softmax(scores, 1),
            layer_grad_cam.attribute(x, target=target, relu_attributions=True),
            negated_cam.attribute(x, target=target, relu_attributions=True),
        )

    return {"forward": forward, "ours": ours, "pytorch-grad-cam": pgc, "captum": captum}


def guided_contenders(model: torch.nn.Module, x: torch.Tensor, layer: str) -> dict[str, Callable[[], object]]:
    """Predictions + Grad-CAM + Guided Backprop + Guided Grad-CAM for the top-1 class."""
    from captum.attr import GuidedBackprop, GuidedGradCam
    from pytorch_grad_cam import GradCAM, GuidedBackpropReLUModel
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    module = dict(model.named_modules())[layer]
    n = x.shape[0]

    def ours() -> object:
        fwd = hooked_forward(model, x, [layer], guided=True)
        target = fwd.scores.detach().argmax(dim=1)
        return cam.explain(fwd, torch.arange(n, device=x.device), target, ("gradcam", "guided_backprop", "guided_gradcam"))

    backprop, guided_gradcam = GuidedBackprop(model), GuidedGradCam(model, module)

    def captum() -> object:
        with torch.no_grad():
            target = model(x).argmax(dim=1)
        return backprop.attribute(x, target=target), guided_gradcam.attribute(x, target=target)

    grad_cam = GradCAM(model=model, target_layers=[module])
    guided_model = GuidedBackpropReLUModel(model=model, device=x.device)

    def pgc() -> object:
        with torch.no_grad():
            target = model(x).argmax(dim=1)
        maps = grad_cam(x, [ClassifierOutputTarget(int(t)) for t in target])
        # pytorch-grad-cam's guided backprop takes one image and one class per call
        guided = [guided_model(x[i : i + 1], target_category=int(target[i])) for i in range(n)]
        return maps, guided

    return {"ours": ours, "captum": captum, "pytorch-grad-cam": pgc}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,resnet50")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"device={device} batch={args.batch} size={args.size} reps={args.reps} threads={torch.get_num_threads()}")
    print("| model | forward (s) | ours (s) | pytorch-grad-cam (s) | captum (s) | ours/forward | pgc/ours | captum/ours "
          "| layer-by-layer 4 stages (s) | lbl/forward |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        model = torchvision.models.get_model(name, weights=None).eval().to(device)
        x = torch.randn(args.batch, 3, args.size, args.size, device=device)
        fns = contenders(model, x, "layer4")
        stages = ["layer1", "layer2", "layer3", "layer4"]

        def layer_by_layer() -> object:
            fwd = hooked_forward(model, x, stages)
            return cam.explain(fwd, torch.arange(args.batch, device=device), fwd.scores.detach().argmax(1), ("gradcam",))

        fns["layer-by-layer"] = layer_by_layer
        t = time_all(fns, args.reps, device)
        print(
            f"| {name} | {t['forward']:.3f} | {t['ours']:.3f} | {t['pytorch-grad-cam']:.3f} | {t['captum']:.3f} "
            f"| {t['ours'] / t['forward']:.2f}x | {t['pytorch-grad-cam'] / t['ours']:.2f}x "
            f"| {t['captum'] / t['ours']:.2f}x | {t['layer-by-layer']:.3f} | {t['layer-by-layer'] / t['forward']:.2f}x |",
            flush=True,
        )
    print()
    print("Guided bundle (predictions + Grad-CAM + Guided Backprop + Guided Grad-CAM):")
    print("| model | ours (s) | captum (s) | pytorch-grad-cam (s) | captum/ours | pgc/ours |")
    print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        model = torchvision.models.get_model(name, weights=None).eval().to(device)
        x = torch.randn(args.batch, 3, args.size, args.size, device=device)
        t = time_all(guided_contenders(model, x, "layer4"), args.reps, device)
        print(
            f"| {name} | {t['ours']:.3f} | {t['captum']:.3f} | {t['pytorch-grad-cam']:.3f} "
            f"| {t['captum'] / t['ours']:.2f}x | {t['pytorch-grad-cam'] / t['ours']:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
