"""Foundation encoders: shapes, token layouts, parity with the wrapped models, BN freezing, gradients."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aligntok import assets
from aligntok.config import from_dict, to_dict
from aligntok.models.encoders import CNN_ARCH_DEFAULTS, ENCODERS, EncoderConfig, build_encoder
from aligntok.models.layers import AttnBlock

TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=32,
    patch_size=8,
)
# hf_config per case: (registry name, config, tokens before the patches, the model's last LayerNorm attribute)
VIT_CASES = {
    "dinov2": ("dinov2", TINY, 1, "layernorm"),
    "dinov2-registers": (
        "dinov2",
        {**TINY, "model_type": "dinov2_with_registers", "num_register_tokens": 4},
        1 + 4,
        "layernorm",
    ),
    "siglip": ("siglip", {**TINY, "patch_size": 4}, 0, "post_layernorm"),
    "clip": ("clip", TINY, 1, "post_layernorm"),
    "mae": ("mae", TINY, 1, "layernorm"),
}
# Normalisations the checkpoints were trained with, written out here independently of the module.
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
FAMILY_NORM = {
    "dinov2": IMAGENET,
    "siglip": ((0.5,) * 3, (0.5,) * 3),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "mae": IMAGENET,
}


def _normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    """Equal up to float32 rounding, relative to the scale of b."""
    return a.shape == b.shape and bool((a - b).abs().max() <= tol * (1 + b.abs().max()))


def _images(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _need(asset: str) -> None:
    if not assets.is_present(asset):
        pytest.skip(f"asset {asset} not fetched; run `aligntok assets fetch {asset}`")


def _vit(case: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    name, hf, _, _ = VIT_CASES[case]
    return build_encoder(EncoderConfig(name=name, hf_config=dict(hf), pretrained=False, **kw))


# ---------------------------------------------------------------------------------------------------------
# Registry and errors


def test_registry_and_unknown_name() -> None:
    assert set(ENCODERS) == {"efficientnet-lite0", "vgg16", "dinov2", "siglip", "clip", "mae", "cnn"}
    with pytest.raises(ValueError, match=r"unknown encoder 'resnet'.*efficientnet-lite0.*mae"):
        build_encoder(EncoderConfig(name="resnet"))


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        (EncoderConfig(block=16, pretrained=False), r"block 16 is out of range; choose 0\.\.15"),
        (EncoderConfig(block=-1, pretrained=False), r"block -1 is out of range"),
        (EncoderConfig(name="vgg16", block=0, pretrained=False), r"block 0 is out of range; choose 1\.\.5"),
        (EncoderConfig(name="vgg16", block=6, pretrained=False), r"block 6 is out of range"),
        (EncoderConfig(path="/x", pretrained=False), r"built-in CNN: path, hf_config and layer"),
        (EncoderConfig(name="dinov2"), r"needs `path`.*or `hf_config`"),
        # No silent random ViT: an architecture without weights must say so with pretrained=False.
        (
            EncoderConfig(name="dinov2", hf_config=TINY),
            r"^encoder 'dinov2' has pretrained=True but no `path`.*offline.*"
            r"--set encoder\.path=/local/transformers/folder.*--set encoder\.pretrained=false[^\n]*$",
        ),
        (EncoderConfig(name="dinov2", hf_config=TINY, block=3, pretrained=False), r"`layer`, not `block`"),
        (
            EncoderConfig(name="dinov2", hf_config=TINY, layer=3, pretrained=False),
            r"layer 3 is out of range for 2",
        ),
        (
            EncoderConfig(name="dinov2", hf_config=TINY, input_size=36, pretrained=False),
            r"not a multiple of the patch size 8; use 32",
        ),
        (
            EncoderConfig(name="clip", hf_config={**TINY, "model_type": "dinov2"}, pretrained=False),
            r"model_type 'dinov2'",
        ),
        (EncoderConfig(mean=(0.5, 0.5), pretrained=False), r"mean/std need 3 values"),
        (EncoderConfig(name="vgg16", std=(0.5, 0.0, 0.5), pretrained=False), r"std positive"),
    ],
)
def test_config_errors(cfg: EncoderConfig, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_encoder(cfg)


def test_bad_path_errors(tmp_path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match=rf"encoder path {missing}: no such folder; .*config\.json"):
        build_encoder(EncoderConfig(name="dinov2", path=str(missing)))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"config\.json is missing"):
        build_encoder(EncoderConfig(name="dinov2", path=str(empty)))
    (empty / "config.json").write_text(json.dumps({"model_type": "dinov2", **TINY}))
    with pytest.raises(ValueError, match=r"no weights file"):
        build_encoder(EncoderConfig(name="dinov2", path=str(empty)))
    with pytest.raises(ValueError, match=r"model_type 'dinov2'; this encoder takes clip"):
        build_encoder(EncoderConfig(name="clip", path=str(empty)))
    # Architecture-only builds need no weights file.
    assert build_encoder(EncoderConfig(name="dinov2", path=str(empty), pretrained=False)).dim == 32
    (empty / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=rf"encoder path {empty}: transformers could not load it"):
        build_encoder(EncoderConfig(name="dinov2", path=str(empty)))


# ---------------------------------------------------------------------------------------------------------
# EfficientNet-Lite0


@pytest.mark.parametrize(("block", "dim", "side"), [(4, 40, 8), (10, 112, 4), (15, 320, 2)])
def test_efficientnet_shapes_at_64px(block: int, dim: int, side: int) -> None:
    # docs/design.md's measurements of the package model at 64 px input.
    enc = build_encoder(EncoderConfig(block=block, pretrained=False))
    feats = enc(_images(2, 64))
    assert feats.shape == (2, dim, side, side) and enc.dim == dim
    assert enc.stride == 64 // side and enc.grid(64) == side


@pytest.mark.parametrize("block", [0, 3, 5, 11])
def test_efficientnet_grid_at_odd_sizes(block: int) -> None:
    enc = build_encoder(EncoderConfig(block=block, pretrained=False))
    for size in (37, 50, 75):  # "SAME" padding rounds up at every stride-2 conv
        assert enc(_images(1, size)).shape[-2:] == (enc.grid(size), enc.grid(size))


def test_input_size_resizes_before_the_network() -> None:
    enc = build_encoder(EncoderConfig(block=10, input_size=128, pretrained=False))
    plain = build_encoder(EncoderConfig(block=10, pretrained=False))
    plain.load_state_dict(enc.state_dict())
    x = _images(2, 64)
    up = F.interpolate(x, size=(128, 128), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        feats = enc(x)
        assert feats.shape == (2, 112, 8, 8) and enc.grid(64) == enc.grid(32) == 8
        assert _close(feats, plain(up))


@pytest.fixture(scope="module")
def lite0() -> tuple[dict[int, nn.Module], nn.Module]:
    """({block: pretrained wrapper} for blocks 4, 10, 15; the package's model, same weights), eval mode."""
    _need("efficientnet-lite0")
    from efficientnet_lite_pytorch import EfficientNet
    from safetensors.torch import load_file

    ref = EfficientNet.from_name("efficientnet-lite0")
    ref.load_state_dict(load_file(assets.require("efficientnet-lite0") / "model.safetensors"))
    return {b: build_encoder(EncoderConfig(block=b)) for b in (4, 10, 15)}, ref.eval()


def _lite_norm(x: torch.Tensor) -> torch.Tensor:
    return (x * 255 - 127) / 128  # the TF EfficientNet-Lite input scaling


@pytest.mark.parametrize(("size", "batch"), [(64, 2), (224, 1)])
def test_efficientnet_parity_with_package(lite0, size: int, batch: int) -> None:
    encs, ref = lite0
    x = _images(batch, size, seed=1)
    taps: dict[int, torch.Tensor] = {}
    hooks = [
        ref._blocks[i].register_forward_hook(lambda m, a, out, i=i: taps.__setitem__(i, out)) for i in encs
    ]
    try:
        with torch.no_grad():
            ref_logits = ref(_lite_norm(x))
            ours = {b: enc.features(x) for b, enc in encs.items()}
            logits = encs[10].logits(x)
    finally:
        for h in hooks:
            h.remove()
    for b in encs:
        assert _close(ours[b], taps[b]), b
    assert _close(logits, ref_logits)


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """scikit-learn's two sample photos (china.jpg, flower.jpg), center-cropped and resized to 224 px."""
    import importlib.util
    from pathlib import Path

    import numpy as np
    from PIL import Image

    # The files behind `sklearn.datasets.load_sample_image`, read without importing scikit-learn (slow).
    spec = importlib.util.find_spec("sklearn")
    assert spec is not None and spec.submodule_search_locations
    folder = Path(spec.submodule_search_locations[0]) / "datasets" / "images"
    out = []
    for name in ("china.jpg", "flower.jpg"):
        img = torch.from_numpy(np.asarray(Image.open(folder / name).convert("RGB")).copy())
        img = img.permute(2, 0, 1).float() / 255  # (3, H, W)
        s = min(img.shape[1:])
        top, left = (img.shape[1] - s) // 2, (img.shape[2] - s) // 2
        img = img[None, :, top : top + s, left : left + s]
        out.append(F.interpolate(img, size=(224, 224), mode="bilinear", antialias=True, align_corners=False))
    return torch.cat(out)  # (2, 3, 224, 224)


def test_efficientnet_classifies_real_photos(lite0, photos) -> None:
    encs, _ = lite0
    with torch.no_grad():
        temple, flower = encs[4].logits(photos).topk(5).indices.tolist()
    # china.jpg is a Chinese temple. ImageNet-1k: 442 bell cote, 483 castle, 497 church, 538 dome,
    # 663 monastery, 668 mosque, 698 palace, 832 stupa.
    buildings = {442, 483, 497, 538, 663, 668, 698, 832}
    assert len(buildings & set(temple)) >= 2, temple
    # flower.jpg is a single flower head. ImageNet-1k: 985 daisy.
    assert 985 in flower[:2], flower


def test_efficientnet_normalisation_matches_its_batchnorm_statistics(lite0, photos) -> None:
    # The stem BatchNorm's running variance records the input scale the weights were trained on: the
    # encoder's mean/std must reproduce it on natural photos better than ImageNet statistics do.
    enc = lite0[0][10]
    bn = enc.net._bn0

    def mismatch(xn: torch.Tensor) -> float:
        with torch.no_grad():
            var = enc.net._conv_stem(xn).var(dim=(0, 2, 3))
        live = bn.running_var > 1e-4
        return (var / bn.running_var)[live].log().abs().mean().item()

    ours = mismatch(_normalize(photos, enc.mean, enc.std))
    assert ours < 0.6 and ours < mismatch(_normalize(photos, *IMAGENET)) / 2


def test_efficientnet_batchnorm_frozen_in_train_mode() -> None:
    _need("efficientnet-lite0")
    enc = build_encoder(EncoderConfig(block=10))
    before = {k: v.clone() for k, v in enc.state_dict().items() if "running" in k or "num_batches" in k}
    enc.train()
    bns = [m for m in enc.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert enc.training and enc.net._blocks[0]._depthwise_conv.training
    enc(_images(4, 64) * 3)  # far from the training distribution: live BN would move its statistics
    after = enc.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def _check_gradients(enc: nn.Module, x: torch.Tensor) -> None:
    """Every trainable parameter receives a nonzero gradient; the frozen ones are exactly those without."""
    enc.requires_grad_(True).train()
    enc.zero_grad(set_to_none=True)
    enc(x).square().mean().backward()
    assert {id(p) for p in enc.feature_parameters()} == {id(p) for p in enc.parameters() if p.requires_grad}
    for name, p in enc.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_efficientnet_gradients_and_unused_tail_frozen() -> None:
    enc = build_encoder(EncoderConfig(block=4, pretrained=False))
    _check_gradients(enc, _images(2, 64))
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert any(n.startswith("net._blocks.4.") for n in trainable)
    assert not any(n.startswith(("net._blocks.5.", "net._fc", "net._conv_head")) for n in trainable)


# ---------------------------------------------------------------------------------------------------------
# VGG16


def test_vgg16_shapes() -> None:
    for block, dim, side in [(1, 64, 32), (2, 128, 16), (4, 512, 4), (5, 512, 2)]:
        enc = build_encoder(EncoderConfig(name="vgg16", block=block, pretrained=False))
        assert enc(_images(1, 32)).shape == (1, dim, side, side) and enc.dim == dim
        assert enc.grid(32) == side and enc.stride == 32 // side
    assert build_encoder(EncoderConfig(name="vgg16", pretrained=False)).dim == 512  # default stage 4
    assert build_encoder(EncoderConfig(name="vgg16", pretrained=False)).grid(37) == 4  # pools floor


def test_vgg16_parity_with_lpips_trunk() -> None:
    _need("lpips-vgg16")
    from aligntok.models.lpips import load_vgg16_trunk, lpips_normalize

    x = _images(2, 32)
    enc = build_encoder(EncoderConfig(name="vgg16", block=3))
    with torch.no_grad():
        ref = load_vgg16_trunk().eval()(lpips_normalize(x))[2]
        assert _close(enc(x), ref)
    _check_gradients(enc, x)


# ---------------------------------------------------------------------------------------------------------
# transformers ViTs (tiny random configs)


def _reference_tokens(enc: nn.Module, case: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(last hidden state, hidden state 1) of the wrapped model called directly, CLS/registers included."""
    mean, std = FAMILY_NORM[VIT_CASES[case][0]]
    kw = {}
    if case == "mae":
        kw["noise"] = torch.rand(x.shape[0], (x.shape[-1] // 8) ** 2)
    out = enc.model(pixel_values=_normalize(x, mean, std), output_hidden_states=True, **kw)
    last, first = out.last_hidden_state, out.hidden_states[1]
    if case == "mae":  # MAE shuffles its tokens by the noise: restore raster order with its ids_restore
        idx = out.ids_restore[..., None].expand(-1, -1, last.shape[-1])
        last = torch.cat([last[:, :1], last[:, 1:].gather(1, idx)], dim=1)
        first = torch.cat([first[:, :1], first[:, 1:].gather(1, idx)], dim=1)
    return last, first


def _as_grid(tokens: torch.Tensor, side: int) -> torch.Tensor:
    B, N, D = tokens.shape
    assert side * side == N
    return tokens.reshape(B, side, side, D).permute(0, 3, 1, 2)


@pytest.mark.parametrize("case", list(VIT_CASES))
def test_vit_shapes_and_dropped_tokens(case: str) -> None:
    _, _, prefix, norm_name = VIT_CASES[case]
    enc = _vit(case)
    side = 32 // enc.stride
    assert (enc.dim, enc.input_size, enc.grid(32), enc.grid(64)) == (32, 32, side, side)
    x = _images(2, 32)
    with torch.no_grad():
        feats = enc(x)
        last, first = _reference_tokens(enc, case, x)
        norm = getattr(enc.model, norm_name)
        if case == "clip":  # CLIP's last_hidden_state is before its post_layernorm
            last = norm(last)
        assert feats.shape == (2, 32, side, side)
        assert _close(feats, _as_grid(last[:, prefix:], side))
        # hidden state 1 without the final norm: the first block's output, same token layout
        early = build_encoder(
            EncoderConfig(
                name=VIT_CASES[case][0],
                hf_config=dict(VIT_CASES[case][1]),
                layer=1,
                final_norm=False,
                pretrained=False,
            )
        )
        early.load_state_dict(enc.state_dict())
        assert _close(early(x), _as_grid(first[:, prefix:], side))
        assert torch.equal(enc(x), feats)  # deterministic (MAE: no random masking or shuffling)


@pytest.mark.parametrize("case", ["dinov2-registers", "siglip", "clip", "mae"])
def test_vit_gradients_reach_every_used_parameter(case: str) -> None:
    enc = _vit(case)
    _check_gradients(enc, _images(2, 32))
    frozen = {n for n, p in enc.named_parameters() if not p.requires_grad}
    if case == "dinov2-registers":
        assert "model.embeddings.mask_token" in frozen
    early = _vit(case, layer=1, final_norm=False)
    _check_gradients(early, _images(2, 32))
    frozen = {n for n, p in early.named_parameters() if not p.requires_grad}
    assert any(".1." in n for n in frozen)  # the second transformer block does not feed layer 1


# ---------------------------------------------------------------------------------------------------------
# Normalisation overrides

CUSTOM_NORM = ((0.3, 0.4, 0.5), (0.2, 0.25, 0.3))


@pytest.mark.parametrize("case", ["efficientnet-lite0", "vgg16", *VIT_CASES])
def test_mean_std_override_reaches_the_network(case: str) -> None:
    def build(**kw) -> nn.Module:
        if case in VIT_CASES:
            return _vit(case, **kw)
        return build_encoder(EncoderConfig(name=case, block=3, pretrained=False, **kw))

    default, custom = build(), build(mean=CUSTOM_NORM[0], std=CUSTOM_NORM[1])
    custom.load_state_dict(default.state_dict())
    assert (custom.mean, custom.std) == CUSTOM_NORM and (default.mean, default.std) != CUSTOM_NORM
    x = _images(2, 32)
    assert _close(custom.prepare(x), _normalize(x, *CUSTOM_NORM))
    # The image whose default normalisation equals x's custom one must give the same features.
    m0, s0 = torch.tensor(default.mean).view(1, 3, 1, 1), torch.tensor(default.std).view(1, 3, 1, 1)
    with torch.no_grad():
        assert _close(custom(x), default(_normalize(x, *CUSTOM_NORM) * s0 + m0), tol=1e-4)


@pytest.mark.parametrize("case", ["dinov2", "clip", "siglip", "mae"])
def test_vit_position_interpolation(case: str) -> None:
    enc = _vit(case, input_size=48)
    assert enc(_images(1, 32)).shape == (1, 32, 48 // enc.stride, 48 // enc.stride)
    assert enc.grid(256) == 48 // enc.stride


def test_siglip2_naflex_matches_its_image_processor_patches() -> None:
    from transformers.models.siglip2.image_processing_pil_siglip2 import convert_image_to_patches

    hf = {k: v for k, v in TINY.items() if k != "image_size"} | {
        "model_type": "siglip2_vision_model",
        "num_patches": 16,
    }
    torch.manual_seed(0)
    enc = build_encoder(EncoderConfig(name="siglip", hf_config=hf, pretrained=False))
    assert enc.input_size == 32 and enc.grid(32) == 4
    x = _images(2, 32)
    xn = _normalize(x, (0.5,) * 3, (0.5,) * 3)
    patches = torch.stack(
        [torch.from_numpy(convert_image_to_patches(img.numpy(), 8)) for img in xn]
    )  # (B, 16, 8*8*3)
    with torch.no_grad():
        out = enc.model(
            pixel_values=patches,
            pixel_attention_mask=torch.ones(2, 16, dtype=torch.long),
            spatial_shapes=torch.tensor([[4, 4], [4, 4]]),
        )
        assert _close(enc(x), _as_grid(out.last_hidden_state, 4))


# ---------------------------------------------------------------------------------------------------------
# Loading from a local folder


def test_load_from_folder_with_preprocessor(tmp_path) -> None:
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(0)
    cfg = Dinov2WithRegistersConfig(**{**TINY, "image_size": 64}, num_register_tokens=2)
    model = Dinov2WithRegistersModel(cfg).eval()
    model.save_pretrained(tmp_path)
    pre = {
        "image_mean": [0.1, 0.2, 0.3],
        "image_std": [0.4, 0.5, 0.6],
        "crop_size": {"height": 48, "width": 48},
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(pre))
    enc = build_encoder(EncoderConfig(name="dinov2", path=str(tmp_path), hf_config={"ignored": True}))
    assert enc.mean == (0.1, 0.2, 0.3) and enc.std == (0.4, 0.5, 0.6) and enc.input_size == 48
    x = _images(1, 48)
    with torch.no_grad():
        ref = model(pixel_values=_normalize(x, pre["image_mean"], pre["image_std"])).last_hidden_state
        assert _close(enc(x), _as_grid(ref[:, 3:], 6))
    # Weights that do not cover the architecture are an error, not a silent random init.
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in state.items() if "layer.1." not in k}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"its weights lack \d+ tensors of the dinov2_with_registers model"):
        build_encoder(EncoderConfig(name="dinov2", path=str(tmp_path)))


def test_load_vision_tower_from_full_clip_folder(tmp_path) -> None:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    vision = {k: v for k, v in TINY.items()}
    text = dict(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=99
    )
    full = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=16)).eval()
    full.save_pretrained(tmp_path)
    enc = build_encoder(EncoderConfig(name="clip", path=str(tmp_path), final_norm=False))
    mean, std = FAMILY_NORM["clip"]
    x = _images(1, 32)
    with torch.no_grad():
        ref = full.vision_model(pixel_values=_normalize(x, mean, std)).last_hidden_state
        assert _close(enc(x), _as_grid(ref[:, 1:], 4))


def test_bf16_folder_loads_in_the_default_dtype(tmp_path) -> None:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(**TINY)).to(torch.bfloat16).save_pretrained(tmp_path)
    enc = build_encoder(EncoderConfig(name="dinov2", path=str(tmp_path)))
    assert {p.dtype for p in enc.parameters()} == {torch.get_default_dtype()}
    assert enc(_images(1, 32)).dtype == torch.get_default_dtype()


# ---------------------------------------------------------------------------------------------------------
# Resolved (self-contained) configs

# A checkpoint preprocessing that differs from every family default: mean/std and a 48 px crop.
PREPROCESSOR = {"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6], "crop_size": 48}


def _save_vit_folder(folder: Path, case: str) -> tuple[str, str]:
    """Save a tiny random transformers model of `case` into `folder` (+ PREPROCESSOR); return (encoder
    name, the vision model type the resolved config must carry)."""
    import transformers as T

    torch.manual_seed(0)
    hf = {**TINY, "image_size": 64}  # pretraining size 64, fed at 48: position tables are interpolated
    if case == "dinov2-registers":
        model = T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(**hf, num_register_tokens=2))
        name, model_type = "dinov2", "dinov2_with_registers"
    elif case == "clip-full":  # the dual encoder: the folder says "clip", the vision tower is loaded
        text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
        model = T.CLIPModel(T.CLIPConfig(vision_config=hf, text_config={**text, "vocab_size": 99}))
        name, model_type = "clip", "clip_vision_model"
    elif case == "siglip":
        model = T.SiglipVisionModel(T.SiglipVisionConfig(**hf))
        name, model_type = "siglip", "siglip_vision_model"
    else:
        model = T.ViTMAEModel(T.ViTMAEConfig(**hf))
        name, model_type = "mae", "vit_mae"
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    return name, model_type


@pytest.mark.parametrize("case", ["dinov2-registers", "clip-full", "siglip", "mae"])
def test_resolved_config_rebuilds_a_folder_encoder_without_the_folder(tmp_path, case: str) -> None:
    folder = tmp_path / "model"
    name, model_type = _save_vit_folder(folder, case)
    cfg = EncoderConfig(name=name, path=str(folder), layer=-1)
    enc = build_encoder(cfg)
    resolved = enc.resolved_config(cfg)
    assert cfg.path == str(folder) and cfg.pretrained  # the given config is not changed
    assert resolved.path is None and resolved.pretrained is False and resolved.layer == -1
    assert resolved.input_size == 48 and resolved.hf_config is not None
    assert resolved.mean == (0.1, 0.2, 0.3) and resolved.std == (0.4, 0.5, 0.6)
    assert resolved.hf_config["model_type"] == model_type and resolved.hf_config["image_size"] == 64
    assert not {"_name_or_path", "transformers_version", "dtype"} & set(resolved.hf_config)

    shutil.rmtree(folder)
    again = from_dict(EncoderConfig, json.loads(json.dumps(to_dict(resolved))))  # as an export stores it
    rebuilt = build_encoder(again)
    rebuilt.load_state_dict(enc.state_dict())  # strict: the same architecture
    x = _images(2, 40)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), enc(x))
    assert rebuilt.resolved_config(again) == resolved  # a second export writes the same config


def test_resolved_config_override_wins_over_the_preprocessor(tmp_path) -> None:
    name, _ = _save_vit_folder(tmp_path, "dinov2-registers")
    cfg = EncoderConfig(name=name, path=str(tmp_path), mean=CUSTOM_NORM[0], std=CUSTOM_NORM[1], input_size=32)
    enc = build_encoder(cfg)
    assert (enc.mean, enc.std, enc.input_size) == (*CUSTOM_NORM, 32)
    resolved = enc.resolved_config(cfg)
    assert (resolved.mean, resolved.std, resolved.input_size) == (*CUSTOM_NORM, 32)


@pytest.mark.parametrize("name", ["efficientnet-lite0", "vgg16"])
def test_cnn_resolved_config_only_drops_pretrained(name: str) -> None:
    cfg = EncoderConfig(name=name, block=3, pretrained=False, input_size=48)
    enc = build_encoder(cfg)
    assert enc.resolved_config(cfg) == cfg
    # The export carries the weights: the resolved config never asks for the asset.
    assert enc.resolved_config(dataclasses.replace(cfg, pretrained=True)) == cfg


# ---------------------------------------------------------------------------------------------------------
# CNN trained from scratch (the VAE baselines' encoder)

CNN_ARCH = {"ch": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 2, "attn_resolutions": [8], "out_dim": 24}


def _cnn(**kw) -> nn.Module:
    torch.manual_seed(0)
    return build_encoder(EncoderConfig(name="cnn", pretrained=False, **{"arch": dict(CNN_ARCH), **kw}))


def test_cnn_encoder_shapes_stride_and_attention() -> None:
    enc = _cnn(input_size=16)  # levels at 16, 8, 4 px: attention at the middle one only
    assert (enc.dim, enc.stride, enc.grid(16), enc.grid(40)) == (24, 4, 4, 4)
    feats = enc.features(_images(2, 16))
    assert feats.shape == (2, 24, 4, 4) and torch.isfinite(feats).all()
    attn_levels = [sum(isinstance(m, AttnBlock) for m in level.modules()) for level in enc.down]
    assert attn_levels == [0, 2, 0]  # after each of the 2 res blocks of the 8 px level (LDM), + 1 in mid
    assert sum(isinstance(m, AttnBlock) for m in enc.mid) == 1
    # [0, 1] -> [-1, 1] by default
    assert enc.mean == (0.5,) * 3 and enc.std == (0.5,) * 3
    torch.testing.assert_close(enc.prepare(torch.zeros(1, 3, 16, 16)), -torch.ones(1, 3, 16, 16))
    # Without attention the network is fully convolutional; strided convs give ceil(n / 2).
    free = _cnn(arch={**CNN_ARCH, "attn_resolutions": []})
    for size in (16, 18, 21):
        assert free.features(_images(1, size)).shape[-1] == free.grid(size) == math.ceil(size / 4)


def test_cnn_encoder_gradients_reach_every_parameter() -> None:
    enc = _cnn(input_size=16)
    _check_gradients(enc, _images(2, 16))
    assert all(p.requires_grad for p in enc.parameters())


def test_cnn_encoder_config_errors() -> None:
    with pytest.raises(
        ValueError, match=r"trained from scratch and has no pretrained weights.*pretrained=false"
    ):
        build_encoder(EncoderConfig(name="cnn", arch=dict(CNN_ARCH), input_size=16))
    cases = [
        (dict(block=3), r"remove block"),
        (dict(input_size=None), r"depend on the input size; set encoder\.input_size"),
        (dict(input_size=64), r"match none of the level sizes \[64, 32, 16\]"),
        (dict(arch={**CNN_ARCH, "ch": 48}), r"widths \[48\] \(ch \* ch_mult\) must be multiples of 32"),
        (dict(arch={**CNN_ARCH, "depth": 3}), r"keys among"),
        (dict(arch={**CNN_ARCH, "ch_mult": []}), r"non-empty ch_mult"),
        (dict(arch={**CNN_ARCH, "out_dim": 0}), r"positive ints"),
    ]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            _cnn(**{"input_size": 16, **kw})
    with pytest.raises(ValueError, match=r"'vgg16': `arch` applies to the from-scratch 'cnn' encoder only"):
        build_encoder(EncoderConfig(name="vgg16", arch=dict(CNN_ARCH), pretrained=False))


def test_cnn_resolved_config_writes_out_the_architecture() -> None:
    cfg = EncoderConfig(name="cnn", arch={"ch": 32, "ch_mult": (1, 1)}, pretrained=False)
    enc = build_encoder(cfg)
    resolved = enc.resolved_config(cfg)
    assert resolved.arch == {**CNN_ARCH_DEFAULTS, "ch": 32, "ch_mult": [1, 1]}
    assert dataclasses.replace(resolved, arch=cfg.arch) == cfg
    # A JSON round trip of the resolved config rebuilds the same network, which resolves to itself.
    again = from_dict(EncoderConfig, json.loads(json.dumps(to_dict(resolved))))
    assert again == resolved and build_encoder(again).resolved_config(again) == resolved
    full = EncoderConfig(name="cnn", arch=dict(CNN_ARCH), input_size=16, pretrained=False)
    assert build_encoder(full).resolved_config(full) == full
