"""Transformer-native maps: the attention captured in the audit's forward equals the model's
own, attention rollout and gradient-weighted rollout equal direct implementations of the
papers' equations (written here from the model's parameters, in float64 numpy), for tiny
torchvision, timm and Hugging Face ViTs built from configs (no download); the methods are
skipped with a note where they cannot apply, and the sanity check runs on them per block."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from visaudit.tasks.explain import cam
from visaudit.tasks.explain.attention_maps import attention_maps
from visaudit.tasks.explain.catalogue import ATTENTION_LAYER
from visaudit.tasks.explain.registry import check_methods
from visaudit.tasks.explain.sanity import sanity_check
from visaudit.tasks.model.attention import captured_attention
from visaudit.tasks.model.hooks import hooked_forward
from visaudit.tasks.model.layers import sanity_stages
from visaudit.tasks.model.loading import LoadedModel
from visaudit.tasks.model.sources import LogitsOnly

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

SIZE, PATCH, GRID = 32, 8, (4, 4)
METHODS = ("attention_rollout", "gradient_rollout")
SAMPLE, TARGET = torch.tensor([0, 0, 1]), torch.tensor([0, 2, 1])  # image 0 explained for two classes


def _torchvision_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=SIZE, patch_size=PATCH, num_layers=3, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64, num_classes=3)
    torch.nn.init.normal_(model.heads.head.weight, std=0.2)  # torchvision's zero head gives no gradient
    return model.eval()


def _timm_vit(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(img_size=SIZE, patch_size=PATCH, embed_dim=32, depth=3,
                                                            num_heads=2, num_classes=3, **kwargs).eval()


def _hf_config(**kwargs):
    return transformers.ViTConfig(image_size=SIZE, patch_size=PATCH, hidden_size=32, num_hidden_layers=3,
                                  num_attention_heads=2, intermediate_size=64, num_labels=3, **kwargs)


def _hf_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return LogitsOnly(transformers.ViTForImageClassification(_hf_config()).eval())


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


def _softmax_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    probs = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(dim=-1)
    probs.retain_grad()
    return probs


def _reference_torchvision(model, x):
    """vit_b_16's forward written out from its parameters, with explicit attention probabilities."""
    t = model._process_input(x)
    t = torch.cat([model.class_token.expand(t.shape[0], -1, -1), t], dim=1) + model.encoder.pos_embedding
    attentions = []
    for layer in model.encoder.layers:
        mha = layer.self_attention
        q, k, v = (_heads(p, mha.num_heads) for p in F.linear(layer.ln_1(t), mha.in_proj_weight,
                                                               mha.in_proj_bias).chunk(3, dim=-1))
        attentions.append(probs := _softmax_attention(q, k))
        t = t + mha.out_proj((probs @ v).transpose(1, 2).flatten(2))
        t = t + layer.mlp(layer.ln_2(t))
    return model.heads(model.encoder.ln(t)[:, 0]), attentions


def _reference_timm(model, x):
    """timm's VisionTransformer forward written out, its attention's q/k norms and scale explicit."""
    t = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    attentions = []
    for block in model.blocks:
        a = block.attn
        qkv = a.qkv(block.norm1(t)).reshape(t.shape[0], t.shape[1], 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attentions.append(probs := _softmax_attention(a.q_norm(q), a.k_norm(k)))
        t = t + block.ls1(a.proj((probs @ v).transpose(1, 2).flatten(2)))
        t = t + block.ls2(block.mlp(block.norm2(t)))
    return model.forward_head(model.norm(t)), attentions


def _reference_hf(model, x):
    """The same weights in a Hugging Face model built with eager attention: its own
    ``output_attentions=True`` (the probabilities it multiplies with the values)."""
    eager = transformers.ViTForImageClassification(_hf_config(attn_implementation="eager")).eval()
    eager.load_state_dict(model.model.state_dict())
    out = eager(pixel_values=x, output_attentions=True)
    for probs in out.attentions:
        probs.retain_grad()
    return out.logits, list(out.attentions)


FAMILIES = {
    "torchvision": (_torchvision_vit, _reference_torchvision, "encoder.layers.encoder_layer_2.ln_1"),
    "timm": (lambda: _timm_vit(qk_norm=True), _reference_timm, "blocks.2.norm1"),
    "hf": (_hf_vit, _reference_hf, "model.vit.layers.2.layernorm_before"),
}


@pytest.fixture(scope="module")
def images(photo_batch: torch.Tensor) -> torch.Tensor:
    return F.interpolate(photo_batch[:2], size=(SIZE, SIZE), mode="bilinear", align_corners=False)


def _paper_rollout(attentions: list[np.ndarray]) -> np.ndarray:
    """Abnar & Zuidema 2020, eq. for rollout: A' = 0.5 W_att + 0.5 I per layer (heads averaged),
    rollout(l_i) = A'(l_i) rollout(l_(i-1)), rollout(l_1) = A'(l_1); class token's row over the patches."""
    maps = []
    for image in range(attentions[0].shape[0]):
        rollout = None
        for a in attentions:
            mixed = 0.5 * a[image].mean(axis=0) + 0.5 * np.eye(a.shape[-1])
            rollout = mixed if rollout is None else mixed @ rollout
        maps.append(rollout[0, 1:].reshape(GRID))
    return np.stack(maps)


def _chefer_reference(scores: torch.Tensor, attentions: list[torch.Tensor]) -> np.ndarray:
    """Chefer et al. 2021b's reference code (avg_heads, apply_self_attention_rules), one
    backward per (image, class) pair, in float64."""
    maps = []
    for image, cls in zip(SAMPLE.tolist(), TARGET.tolist()):
        for a in attentions:
            a.grad = None
        scores[image, cls].backward(retain_graph=True)
        relevance = np.eye(attentions[0].shape[-1])
        for a in attentions:
            weighted = np.clip(a.grad[image].double().numpy() * a[image].detach().double().numpy(), 0, None)
            relevance = relevance + weighted.mean(axis=0) @ relevance
        maps.append(relevance[0, 1:].reshape(GRID))
    return np.stack(maps)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_attention_maps_equal_direct_implementations(family: str, images: torch.Tensor) -> None:
    build, reference, layer = FAMILIES[family]
    model = build()
    ref_scores, ref_attentions = reference(model, images)
    assert torch.allclose(ref_scores, model(images), atol=1e-5), "the written-out forward is the model's"
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    settings = [(getattr(m, "fused_attn", None), getattr(getattr(m, "config", None), "_attn_implementation", None))
                for m in model.modules()]
    plain = cam.explain(hooked_forward(model, images, [layer]), SAMPLE, TARGET, ("gradcam", "layercam"))

    with captured_attention(model, gradients=True) as captured:
        forward = hooked_forward(model, images, [layer])
    maps = attention_maps(captured, forward.scores, SAMPLE, TARGET, METHODS, GRID)
    after = cam.explain(forward, SAMPLE, TARGET, ("gradcam", "layercam"))  # the same forward, afterwards

    assert len(captured.probabilities) == len(ref_attentions) == 3
    for mine, theirs in zip(captured.probabilities, ref_attentions):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)
    expected_rollout = _paper_rollout([a.detach().double().numpy() for a in ref_attentions])
    np.testing.assert_allclose(maps[("attention_rollout", ATTENTION_LAYER)].numpy(), expected_rollout[SAMPLE],
                               atol=1e-5)
    np.testing.assert_allclose(maps[("gradient_rollout", ATTENTION_LAYER)].numpy(),
                               _chefer_reference(ref_scores, ref_attentions), atol=1e-5)
    assert maps[("gradient_rollout", ATTENTION_LAYER)].abs().sum() > 0
    for key, value in plain.items():  # capturing the attention leaves the CAM family's maps as they were
        torch.testing.assert_close(after[key], value, atol=1e-5, rtol=1e-4)
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == hooks
    assert [(getattr(m, "fused_attn", None), getattr(getattr(m, "config", None), "_attn_implementation", None))
            for m in model.modules()] == settings, "fused_attn / the attention implementation restored"


def _loaded(model: torch.nn.Module, layer: str) -> LoadedModel:
    return LoadedModel(model, torch.device("cpu"), 3, [layer], None, None, "test")


def test_attention_methods_are_skipped_with_a_note_where_they_cannot_apply() -> None:
    cnn = torchvision.models.resnet18(num_classes=3).eval()
    skipped = check_methods(_loaded(cnn, "layer4"), ["gradcam", *METHODS], ["layer4"], 64)
    assert set(skipped) == set(METHODS) and "has none" in skipped["attention_rollout"]
    swin = torchvision.models.swin_t(num_classes=3).eval()  # windowed attention, no nn.MultiheadAttention
    assert set(check_methods(_loaded(swin, "norm"), ["gradcam", *METHODS], ["norm"], 64)) == set(METHODS)
    pooled = _timm_vit(class_token=False, global_pool="avg")  # no class token: no row to roll out
    note = check_methods(_loaded(pooled, "blocks.2.norm1"), ["gradcam", *METHODS], ["blocks.2.norm1"], SIZE)
    assert set(note) == set(METHODS) and "class token" in note["gradient_rollout"]
    assert check_methods(_loaded(_timm_vit(), "blocks.2.norm1"), list(METHODS), ["blocks.2.norm1"], SIZE) == {}
    with pytest.raises(Exception, match="none of the requested methods applies"):
        check_methods(_loaded(cnn, "layer4"), list(METHODS), ["layer4"], 64)


def test_sanity_check_cascades_per_block_and_judges_attention_maps(images: torch.Tensor) -> None:
    model = _timm_vit()
    shapes = {f"blocks.{i}.norm1": GRID for i in range(3)} | {"norm": GRID}
    stages = sanity_stages(shapes, model, "blocks.2.norm1")
    assert stages == ["blocks.0", "blocks.1", "blocks.2"]
    rows = sanity_check(model, images, "blocks.2.norm1", stages, ("gradcam", *METHODS))
    assert rows["randomised"].unique().tolist() == ["head", "head+blocks.2", "head+blocks.2+blocks.1",
                                                    "head+blocks.2+blocks.1+blocks.0"]
    first = rows[rows["step"] == 1].set_index("method")
    # rollout never reads the head: randomising the classifier alone leaves its maps exactly as they were
    assert first.loc["attention_rollout", "spearman_mean"] == pytest.approx(1.0)
    assert (rows.loc[rows["method"] == "attention_rollout", "layer"] == ATTENTION_LAYER).all()
    last = rows[rows["step"] == 4].set_index("method")
    assert last.loc["attention_rollout", "spearman_mean"] < 0.9
