"""Vision transformers through `transformers`: DINOv2 (with or without registers), SigLIP and SigLIP 2
(fixed-size or NaFlex), CLIP and MAE, loaded from a local folder or built from a config."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from aligntok.models.encoders.base import (
    HALF,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Encoder,
    EncoderConfig,
    as_int,
    norm_kwargs,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True, kw_only=True)
class _Family:
    """A registry entry's transformers model types, its default config type and default normalisation."""

    model_types: tuple[str, ...]
    default_type: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


_FAMILIES = {
    "dinov2": _Family(
        model_types=("dinov2", "dinov2_with_registers"),
        default_type="dinov2",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    ),
    "siglip": _Family(
        model_types=("siglip", "siglip_vision_model", "siglip2", "siglip2_vision_model"),
        default_type="siglip_vision_model",
        mean=HALF,
        std=HALF,
    ),
    "clip": _Family(
        model_types=("clip", "clip_vision_model"),
        default_type="clip_vision_model",
        mean=CLIP_MEAN,
        std=CLIP_STD,
    ),
    "mae": _Family(model_types=("vit_mae",), default_type="vit_mae", mean=IMAGENET_MEAN, std=IMAGENET_STD),
}


# transformers config keys that record where and how a checkpoint was stored, not what the network is.
_CONFIG_BOOKKEEPING = frozenset(
    {"_name_or_path", "architectures", "transformers_version", "dtype", "torch_dtype", "id2label", "label2id"}
)


def _vision_model_class(model_type: str) -> type[nn.Module]:
    import transformers as T

    return {
        "dinov2": T.Dinov2Model,
        "dinov2_with_registers": T.Dinov2WithRegistersModel,
        "siglip": T.SiglipVisionModel,
        "siglip_vision_model": T.SiglipVisionModel,
        "siglip2": T.Siglip2VisionModel,
        "siglip2_vision_model": T.Siglip2VisionModel,
        "clip": T.CLIPVisionModel,
        "clip_vision_model": T.CLIPVisionModel,
        "vit_mae": T.ViTMAEModel,
    }[model_type]


def _bad_path(path: str | Path, why: str) -> ValueError:
    return ValueError(
        f"encoder path {path}: {why}; it must be a local transformers model folder holding config.json and "
        "its weights (model.safetensors or pytorch_model.bin), e.g. from `save_pretrained`"
    )


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise _bad_path(path.parent, f"cannot read {path.name} ({e.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise _bad_path(path.parent, f"{path.name} is not a JSON object")
    return data


def _native_size(preprocessor: dict) -> int | None:
    """The square size a checkpoint's own preprocessing feeds it (center crop first, then resize target)."""
    specs = [preprocessor.get("crop_size") if preprocessor.get("do_center_crop", True) else None]
    specs.append(preprocessor.get("size"))
    for spec in specs:
        if isinstance(spec, int):
            return spec
        if isinstance(spec, dict):
            side = spec.get("height") or spec.get("shortest_edge")
            if isinstance(side, int):
                return side
    return None


def _load_vit(cfg: EncoderConfig, family: _Family) -> tuple[nn.Module, dict]:
    """The vision model (from `path`, or randomly initialised from `hf_config`) and its preprocessor dict."""
    from transformers import AutoConfig

    if cfg.path is not None:
        folder = Path(cfg.path).expanduser()
        if not folder.is_dir():
            raise _bad_path(cfg.path, "no such folder")
        if not (folder / "config.json").is_file():
            raise _bad_path(cfg.path, "config.json is missing")
        model_type = _read_json(folder / "config.json").get("model_type")
        _check_model_type(cfg.name, family, model_type, f"{folder / 'config.json'}")
        has_weights = any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))
        if cfg.pretrained and not has_weights:
            raise _bad_path(cfg.path, "no weights file (*.safetensors or *.bin) is there")
        pre_file = folder / "preprocessor_config.json"
        preprocessor = _read_json(pre_file) if pre_file.is_file() else {}
        cls = _vision_model_class(model_type)
        missing: list[str] = []
        try:
            if cfg.pretrained:
                model, missing = _from_pretrained_quietly(cls, folder)
            else:
                model = cls(cls.config_class.from_pretrained(str(folder), local_files_only=True))
        except Exception as e:  # a user's files: any failure to read them becomes one clear line
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            why = f"transformers could not load it ({type(e).__name__}: {first})"
            raise _bad_path(cfg.path, why) from None
        if missing:  # transformers would keep these randomly initialised, with only a logged warning
            why = f"its weights lack {len(missing)} tensors of the {model_type} model (e.g. {missing[0]})"
            raise _bad_path(cfg.path, why)
        return model, preprocessor

    assert cfg.hf_config is not None
    kwargs = dict(cfg.hf_config)
    model_type = kwargs.pop("model_type", family.default_type)
    _check_model_type(cfg.name, family, model_type, "hf_config")
    config = AutoConfig.for_model(model_type, **kwargs)
    # A full dual-encoder config (model_type clip/siglip/siglip2) carries the vision tower's config inside.
    config = getattr(config, "vision_config", config)
    return _vision_model_class(model_type)(config), {}


def _from_pretrained_quietly(cls: type, folder: Path) -> tuple[nn.Module, list[str]]:
    """Load `cls` from a local folder; return the model and the keys its weights did not provide.

    Full dual-encoder checkpoints (CLIP, SigLIP) also hold a text tower that the vision model drops by
    design; transformers' warning-level load report about it is silenced, and missing keys are returned.
    The weights are cast to torch's default dtype: transformers would otherwise keep a bf16 checkpoint in
    bf16, unlike the adapter after it (reduced precision is the autocast flag's job).
    """
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = cls.from_pretrained(
            str(folder), local_files_only=True, output_loading_info=True, dtype=torch.get_default_dtype()
        )
    finally:
        hf_logging.set_verbosity(level)
    return model, list(info.get("missing_keys", []))


def _check_model_type(name: str, family: _Family, model_type: object, where: str) -> None:
    if model_type not in family.model_types:
        raise ValueError(
            f"encoder {name!r}: {where} has model_type {model_type!r}; this encoder takes "
            f"{', '.join(family.model_types)}; pick the encoder name that matches the checkpoint"
        )


class HFViTEncoder(Encoder):
    """A `transformers` ViT's patch tokens from hidden state `layer`, as a (B, D, h, w) grid.

    CLS and register tokens are dropped (DINOv2: 1 + registers; CLIP, MAE: 1; SigLIP: none). With
    `final_norm` the model's closing LayerNorm is applied to the chosen tokens (for CLIP this is
    `post_layernorm`, which CLIP itself applies only to its pooled CLS token). MAE runs with mask_ratio 0
    and the identity token order (its embeddings shuffle tokens even when nothing is masked). The input
    is resized to `input_size` (default: the checkpoint's own preprocessing size, else the config's
    image_size) and normalised with the config's mean/std (default: the checkpoint's preprocessor, else the
    family's); `input_size` must be a multiple of the patch size; position embeddings are interpolated when it
    differs from the pretraining size (DINOv2 always interpolates).
    """

    def __init__(self, cfg: EncoderConfig) -> None:
        family = _FAMILIES[cfg.name]
        if cfg.block is not None:
            raise ValueError(
                f"encoder {cfg.name!r} is a transformer: choose the hidden state with `layer`, not `block`"
            )
        if cfg.path is None and cfg.hf_config is None:
            raise ValueError(
                f"encoder {cfg.name!r} needs `path` (a local transformers folder with config.json and "
                "weights; aligntok cannot fetch ViT weights offline) or `hf_config` (random init)"
            )
        if cfg.path is None and cfg.pretrained:
            raise ValueError(
                f"encoder {cfg.name!r} has pretrained=True but no `path`, and ViT weights cannot be fetched "
                "offline here: pass --set encoder.path=/local/transformers/folder (config.json + weights), "
                "or --set encoder.pretrained=false for a random init of hf_config"
            )
        model, preprocessor = _load_vit(cfg, family)
        config = model.config
        model_type = str(config.model_type)
        patch = as_int(config.patch_size)
        if model_type.startswith("siglip2"):  # NaFlex: a num_patches position table, resized to any grid
            trained = math.isqrt(config.num_patches) * patch
        else:
            trained = as_int(config.image_size)
        input_size = cfg.input_size or _native_size(preprocessor) or trained
        if input_size % patch:
            lo, hi = input_size // patch * patch, (input_size // patch + 1) * patch
            raise ValueError(
                f"encoder {cfg.name!r}: input_size {input_size} is not a multiple of the patch size "
                f"{patch}; use {lo} or {hi}"
            )
        mean = preprocessor.get("image_mean", family.mean)
        std = preprocessor.get("image_std", family.std)
        super().__init__(input_size=input_size, **norm_kwargs(cfg, mean, std))
        self.model = model
        self.model_type = model_type
        self.patch = patch
        self.naflex = model_type.startswith("siglip2")
        self.dim = int(config.hidden_size)
        self.stride = self.patch
        self.interpolate = input_size != trained
        if self.model_type == "vit_mae":
            config.mask_ratio = 0.0  # the embeddings read it from the shared config object at call time
        num_layers = int(config.num_hidden_layers)
        layer = num_layers if cfg.layer is None else cfg.layer
        if not -(num_layers + 1) <= layer <= num_layers:
            raise ValueError(
                f"encoder {cfg.name!r}: layer {layer} is out of range for {num_layers} transformer layers; "
                f"use 0 (embeddings) .. {num_layers} (last), or a negative index, or None"
            )
        self.layer = layer % (num_layers + 1)
        self.final_norm = cfg.final_norm
        self.prefix = 0 if self.model_type.startswith("siglip") else 1
        self.prefix += int(getattr(config, "num_register_tokens", 0) or 0)
        # Looked up by name at call time: a second reference would register the norm twice in state_dict.
        self._norm_name = "layernorm" if hasattr(model, "layernorm") else "post_layernorm"
        norm = getattr(model, self._norm_name)
        layers = _transformer_layers(model)
        assert len(layers) == num_layers, (type(model).__name__, len(layers), num_layers)
        self._freeze_unused(
            [
                *layers[self.layer :],
                None if self.final_norm else norm,
                getattr(model, "head", None),  # SigLIP's attention-pooling head
                # DINOv2's mask token serves masked-image pretraining only
                getattr(getattr(model, "embeddings", None), "mask_token", None),
            ]
        )

    def resolved_config(self, cfg: EncoderConfig) -> EncoderConfig:
        """`cfg` with everything the weights folder decided written out: `path=None`, `pretrained=False`,
        `hf_config` = the loaded vision model's config, and the resolved `input_size`, `mean` and `std`.

        The model type written is the vision tower's (e.g. clip_vision_model for a full CLIP folder), which
        the family accepts as `hf_config`. Provenance and storage-dtype keys are left out: they do not
        describe the architecture, and the dtype would differ between two exports of the same model.
        """
        assert self.model_type in _FAMILIES[cfg.name].model_types, (cfg.name, self.model_type)
        config = json.loads(self.model.config.to_json_string(use_diff=False))
        hf_config = {k: v for k, v in sorted(config.items()) if k not in _CONFIG_BOOKKEEPING}
        return dataclasses.replace(
            cfg,
            path=None,
            pretrained=False,
            hf_config=hf_config,
            input_size=self.input_size,
            mean=self.mean,
            std=self.std,
        )

    def _run(self, x: Tensor) -> Tensor:
        B, _, S, _ = x.shape
        side = S // self.patch
        kwargs: dict = {"output_hidden_states": True}
        if self.naflex:
            kwargs["spatial_shapes"] = torch.tensor([[side, side]] * B, device=x.device, dtype=torch.long)
            kwargs["pixel_attention_mask"] = torch.ones(B, side * side, device=x.device, dtype=torch.long)
            x = _patchify(x, self.patch)  # (B, N, p*p*3)
        elif self.model_type == "vit_mae":
            # argsort of 0..N-1 is the identity: MAE keeps every token in raster order.
            kwargs["noise"] = torch.arange(side * side, device=x.device, dtype=x.dtype).expand(B, -1)
            kwargs["interpolate_pos_encoding"] = self.interpolate
        elif not self.model_type.startswith("dinov2"):
            kwargs["interpolate_pos_encoding"] = self.interpolate
        out = self.model(pixel_values=x, **kwargs)
        tokens = out.hidden_states[self.layer]  # (B, prefix + N, D); index 0 is the embedding output
        if self.final_norm:
            tokens = getattr(self.model, self._norm_name)(tokens)
        tokens = tokens[:, self.prefix :]
        assert tokens.shape[1] == side * side, (tokens.shape, side, self.prefix)
        return tokens.transpose(1, 2).reshape(B, self.dim, side, side)  # (B, D, h, w), raster order

    def _grid(self, size: int) -> int:
        return size // self.patch


def _transformer_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks (named differently across model families)."""
    for owner in (getattr(model, "encoder", None), model):
        for attr in ("layer", "layers"):
            found = getattr(owner, attr, None)
            if isinstance(found, nn.ModuleList):
                return found
    raise AssertionError(f"no transformer layer list found in {type(model).__name__}")


def _patchify(x: Tensor, p: int) -> Tensor:
    """(B, C, H, W) -> (B, (H/p)(W/p), p*p*C): raster-ordered patches, each flattened (row, col, channel),
    the layout SigLIP 2 NaFlex's linear patch embedding was trained on."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, p, C)
    return x.reshape(B, (H // p) * (W // p), p * p * C)
