"""Text-conditioned diffusion transformer on latent grids: an MMDiT in the FLUX.1 layout (architecture only).

SD3's multimodal DiT (Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image
Synthesis", sec. 4) as FLUX.1 arranges it: first `double_depth` double-stream blocks, in which text and
image tokens keep separate weights (norms, attention projections, MLPs, adaLN modulation) but share one
joint attention over [text, image]; then `single_depth` single-stream blocks over the concatenated
sequence. Our single-stream block is the class DiT's `DiTBlock` (attention, then MLP); FLUX's single blocks
run attention and MLP in parallel from one fused projection, which we do not copy so that both models
share one block. The adaLN condition c is the timestep embedding plus an MLP of the pooled text vector;
only the image tokens carry 2-D RoPE (text tokens get the identity rotation) and there is no absolute
position embedding. Padding text tokens (mask False) are never attended to. The network predicts the
flow-matching velocity v = eps - z_0 (see aligntok.flow).

Text comes as a dict (shapes for a batch of B, L text tokens of width T = text_dim):
    {"tokens": (B, L, T) float, "mask": (B, L) bool (True = a real token), "pooled": (B, T) float,
     "null": (B,) bool}
A row with null=True uses the LEARNED null text (`null_tokens` (null_length, T), `null_pooled` (T,))
instead of its own: the empty prompt, caption dropout in training and the unconditional branch of guidance
are all this one embedding. `drop_text` sets null on chosen rows.

No losses, EMA, sampling or parallelism here. For FSDP2 / activation checkpointing the blocks are the two
outermost nn.ModuleLists `double_blocks` (called as `block(img, txt, c, rope, mask)`) and `single_blocks`
(`block(x, c, rope, mask)`). Meta-device construction as for the DiT: build under `torch.device("meta")`,
`to_empty(device=...)`, then `init_weights()` or load a state dict and call `init_buffers()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aligntok.models.dit import DiTBlock, FinalLayer, preset_kwargs
from aligntok.models.layers import (
    PatchEmbed,
    RMSNorm,
    TimestepEmbedder,
    attend,
    embed_mlp,
    grid_coords,
    rope_2d_tables,
    unpatchify,
)

TEXT_KEYS = ("tokens", "mask", "pooled", "null")


@dataclass(kw_only=True)
class MMDiTConfig:
    """Shape and flags of an MMDiT; `mmdit_preset` builds one from a named size."""

    in_channels: int  # latent channels C
    input_size: int  # latent grid side h = w (other grids divisible by the patch work too)
    patch_size: int = 1
    hidden_size: int
    double_depth: int  # double-stream blocks (separate text / image weights, joint attention)
    single_depth: int  # single-stream blocks (DiTBlock) over [text, image]
    num_heads: int
    mlp_ratio: float = 4.0
    text_dim: int  # width T of the text encoder's tokens and pooled vector
    null_length: int = 1  # tokens of the learned null text
    qk_norm: bool = True  # RMSNorm on q and k (SD3 sec. 5.3.2: needed for stable large-scale training)
    use_swiglu: bool = True  # SwiGLU MLP, else DiT's GELU MLP
    use_rmsnorm: bool = True  # RMSNorm pre-norms, else DiT's affine-free LayerNorm
    qkv_bias: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    frequency_dim: int = 256  # sinusoidal timestep features
    time_scale: float = 1000.0  # t in [0, 1] is embedded as time_scale * t

    def __post_init__(self) -> None:
        positive = ("in_channels", "input_size", "patch_size", "hidden_size", "num_heads", "text_dim")
        for name in (*positive, "null_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"MMDiTConfig.{name}={getattr(self, name)} must be a positive integer")
        for name in ("double_depth", "single_depth"):
            if getattr(self, name) < 0:
                raise ValueError(f"MMDiTConfig.{name}={getattr(self, name)} must be >= 0")
        if self.double_depth + self.single_depth < 1:
            raise ValueError(
                "MMDiTConfig: double_depth + single_depth is 0; give the model at least one block"
            )
        if self.input_size % self.patch_size:
            raise ValueError(
                f"MMDiTConfig.input_size={self.input_size} is not divisible by patch_size={self.patch_size}; "
                "use a patch size that divides the latent grid"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"MMDiTConfig.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )
        if self.head_dim % 4:
            raise ValueError(
                f"MMDiTConfig: 2-D RoPE needs hidden_size / num_heads = {self.head_dim} divisible by 4; "
                "change hidden_size or num_heads"
            )
        if self.mlp_ratio <= 0:
            raise ValueError(f"MMDiTConfig.mlp_ratio={self.mlp_ratio} must be positive")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_size(self) -> int:
        """Tokens per side, input_size / patch_size."""
        return self.input_size // self.patch_size


# size -> (hidden_size, double_depth, single_depth, num_heads). All these numbers are ours. "S", "B", "L" keep
# the class DiT's width and heads and split its depth 1 : 2 into double : single blocks, as FLUX.1 does
# (19 : 38): per image token a double block costs about one DiT block, so the compute matches that DiT while
# the parameters are those of (double + depth) DiT blocks. "T" is the CPU size for 32 px emoji on 8x8
# latents (the class DiT "T": width 256, 4 blocks). "t2i-paper" is our reading of the paper's "2B FLUX-style
# model" (docs/method.md): FLUX.1's head dim 128 at width 2048 with 6 double + 14 single blocks, which gives
# 1,983,368,320 parameters on 32 latent channels, patch 1, text_dim 384 (a 4096-d text encoder adds 15.2M),
# counted on the meta device in tests/models/test_mmdit.py.
MMDIT_PRESETS: dict[str, dict[str, int]] = {
    "debug": {"hidden_size": 64, "double_depth": 1, "single_depth": 1, "num_heads": 4},
    "T": {"hidden_size": 256, "double_depth": 2, "single_depth": 2, "num_heads": 4},
    "S": {"hidden_size": 384, "double_depth": 4, "single_depth": 8, "num_heads": 6},
    "B": {"hidden_size": 768, "double_depth": 4, "single_depth": 8, "num_heads": 12},
    "L": {"hidden_size": 1024, "double_depth": 8, "single_depth": 16, "num_heads": 16},
    "t2i-paper": {"hidden_size": 2048, "double_depth": 6, "single_depth": 14, "num_heads": 16},
}


def mmdit_preset(
    name: str,
    *,
    in_channels: int,
    input_size: int,
    text_dim: int,
    patch_size: int | None = None,
    **overrides: Any,
) -> MMDiTConfig:
    """MMDiTConfig for a preset such as "B/1" (or "B" with `patch_size`), on a latent of `in_channels`
    channels, an `input_size` grid and a text encoder of width `text_dim`; `overrides` set any other
    MMDiTConfig field (e.g. null_length=4)."""
    sizes = {"in_channels": in_channels, "input_size": input_size, "text_dim": text_dim}
    kw = preset_kwargs(
        name, MMDIT_PRESETS, MMDiTConfig, patch_size=patch_size, overrides={**sizes, **overrides}, example="B"
    )
    return MMDiTConfig(**kw)


def drop_text(text: dict[str, Tensor], drop: Tensor) -> dict[str, Tensor]:
    """A copy of `text` whose rows where `drop` (B,) bool is True use the null text (null |= drop): caption
    dropout in training, the unconditional branch of guidance. The tensors themselves are shared."""
    null = text["null"]
    if drop.dtype != torch.bool or drop.shape != null.shape:
        raise ValueError(
            f"drop_text needs a bool mask of shape {tuple(null.shape)}, got {drop.dtype} {tuple(drop.shape)}"
        )
    return {**text, "null": null | drop.to(null.device)}


class DoubleStreamBlock(nn.Module):
    """One double-stream block: a `DiTBlock`'s weights per stream (image, text), one joint attention.

    Each stream modulates and normalises its own tokens and makes its own q, k, v; the heads are
    concatenated as [text, image], attended together, split back, and each stream finishes (output
    projection, gated residual, MLP) with its own weights (SD3 fig. 2b).
    """

    def __init__(self, cfg: MMDiTConfig) -> None:
        super().__init__()
        self.img = DiTBlock(cfg)
        self.txt = DiTBlock(cfg)

    def forward(
        self, img: Tensor, txt: Tensor, c: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """img (B, N, D), txt (B, L, D), c (B, D), rope (cos, sin) each (L + N, K/2), mask (B, L + N) bool
        -> (img (B, N, D), txt (B, L, D))."""
        (qi, ki, vi), img_mods = self.img.attention_heads(img, c)  # each (B, H, N, K)
        (qt, kt, vt), txt_mods = self.txt.attention_heads(txt, c)  # each (B, H, L, K)
        q, k, v = (torch.cat(pair, dim=2) for pair in ((qt, qi), (kt, ki), (vt, vi)))  # (B, H, L + N, K)
        o_txt, o_img = attend(q, k, v, rope=rope, mask=mask).split([txt.shape[1], img.shape[1]], dim=2)
        return self.img.finish(img, o_img, img_mods), self.txt.finish(txt, o_txt, txt_mods)


class MMDiT(nn.Module):
    """Text-conditioned velocity network: (x (B, C, H, W), t (B,) in [0, 1], text dict) -> (B, C, H, W)."""

    def __init__(self, config: MMDiTConfig) -> None:
        super().__init__()
        self.config = cfg = config
        d, td = cfg.hidden_size, cfg.text_dim
        self.x_embedder = PatchEmbed(cfg.in_channels, d, cfg.patch_size)
        self.t_embedder = TimestepEmbedder(d, frequency_dim=cfg.frequency_dim, time_scale=cfg.time_scale)
        self.pooled_embedder = embed_mlp(td, d)
        self.txt_in = nn.Sequential(RMSNorm(td, eps=cfg.norm_eps), nn.Linear(td, d))
        self.null_tokens = nn.Parameter(torch.empty(cfg.null_length, td))
        self.null_pooled = nn.Parameter(torch.empty(td))
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(cfg) for _ in range(cfg.double_depth))
        self.single_blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.single_depth))
        self.final_layer = FinalLayer(cfg)
        # RoPE tables of the configured image grid; text rows are prepended in forward (their length varies).
        rope_shape = (cfg.grid_size**2, cfg.head_dim // 2)
        self.register_buffer("rope_cos", torch.empty(rope_shape), persistent=False)
        self.register_buffer("rope_sin", torch.empty(rope_shape), persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """(Re)compute the non-persistent RoPE tables, e.g. after `to_empty` or loading weights."""
        g = self.config.grid_size
        cos, sin = self._image_rope(g, g, self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    @torch.no_grad()
    def init_weights(self) -> None:
        """DiT initialisation: xavier-uniform linears with zero bias, N(0, 0.02) for the conditioning
        embedders (timestep, pooled text) and the null text, adaLN-Zero (every modulation layer and the final
        projection start at zero, so each block starts as the identity and the network outputs exactly 0)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()
        self.x_embedder.reset_parameters()
        self.t_embedder.reset_parameters()
        for layer in (self.pooled_embedder[0], self.pooled_embedder[2]):
            nn.init.normal_(layer.weight, std=0.02)
        nn.init.normal_(self.null_tokens, std=0.02)
        nn.init.normal_(self.null_pooled, std=0.02)
        zero = [m.adaLN_modulation[-1] for m in self.modules() if isinstance(m, (DiTBlock, FinalLayer))]
        for layer in [*zero, self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.init_buffers()

    def _image_rope(self, grid_h: int, grid_w: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """RoPE cos, sin (N, K/2) float32 of an image grid."""
        rows, cols = grid_coords(grid_h, grid_w, device=device)
        return rope_2d_tables(rows, cols, self.config.head_dim, theta=self.config.rope_theta)

    def _text_inputs(
        self, text: dict[str, Tensor] | None, b: int, device: torch.device
    ) -> tuple[Tensor, ...]:
        """The text dict (None = the null text for every row) with null rows replaced by the learned null
        text -> tokens (B, L', T), mask (B, L') bool, pooled (B, T), with L' = max(L, null_length)."""
        td, m = self.config.text_dim, self.config.null_length
        if text is None:
            text = {
                "tokens": torch.zeros(b, 0, td, device=device),
                "mask": torch.zeros(b, 0, dtype=torch.bool, device=device),
                "pooled": torch.zeros(b, td, device=device),
                "null": torch.ones(b, dtype=torch.bool, device=device),
            }
        _check_text(text, b, td)
        dtype = self.null_tokens.dtype
        tokens, mask, null = text["tokens"].to(dtype), text["mask"], text["null"][:, None]
        length = max(tokens.shape[1], m)
        tokens = F.pad(tokens, (0, 0, 0, length - tokens.shape[1]))  # (B, L', T)
        mask = F.pad(mask, (0, length - mask.shape[1]), value=False)  # (B, L')
        null_mask = torch.arange(length, device=mask.device) < m  # (L',)
        tokens = torch.where(null[..., None], F.pad(self.null_tokens, (0, 0, 0, length - m)), tokens)
        mask = torch.where(null, null_mask, mask)
        pooled = torch.where(null, self.null_pooled, text["pooled"].to(dtype))  # (B, T)
        # Padding is never a key, yet a NaN there would still leak through 0 * NaN in the attention sum.
        tokens = tokens.masked_fill(~mask[..., None], 0.0)
        return tokens, mask, pooled

    def forward(self, x: Tensor, t: Tensor, text: dict[str, Tensor] | None = None) -> Tensor:
        """Velocity for latents x (B, C, H, W) at times t ((B,) or a scalar, in [0, 1], noise at 1) given
        `text` (the dict in the module docstring; None = the null text for every row). Returns x's shape
        and dtype."""
        cfg = self.config
        b, c, h, w = x.shape
        p = cfg.patch_size
        if c != cfg.in_channels or h % p or w % p:
            raise ValueError(
                f"MMDiT got input {tuple(x.shape)}; expected {cfg.in_channels} channels and H, W divisible "
                f"by patch_size={p} (check the latent cache matches the MMDiT config)"
            )
        gh, gw = h // p, w // p
        if gh == gw == cfg.grid_size:
            cos, sin = self.rope_cos, self.rope_sin
        else:
            cos, sin = self._image_rope(gh, gw, x.device)
        if t.ndim == 0:
            t = t.expand(b)
        tokens, txt_mask, pooled = self._text_inputs(text, b, x.device)
        n_txt = tokens.shape[1]

        img = self.x_embedder(x)  # (B, N, D)
        txt = self.txt_in(tokens)  # (B, L, D)
        cond = self.t_embedder(t) + self.pooled_embedder(pooled)  # (B, D)
        # Text rows rotate by angle 0 (cos 1, sin 0); the tables stay float32 (FSDP does not cast inputs).
        rope = (
            torch.cat([cos.new_ones(n_txt, cos.shape[1]), cos]),  # (L + N, K/2)
            torch.cat([sin.new_zeros(n_txt, sin.shape[1]), sin]),
        )
        mask = torch.cat([txt_mask, txt_mask.new_ones(b, img.shape[1])], dim=1)  # (B, L + N), image always
        for block in self.double_blocks:
            img, txt = block(img, txt, cond, rope, mask)
        seq = torch.cat([txt, img], dim=1)  # (B, L + N, D)
        for block in self.single_blocks:
            seq = block(seq, cond, rope, mask)
        out = self.final_layer(seq[:, n_txt:], cond)  # (B, N, p * p * C), image tokens only
        return unpatchify(out, p, gh, gw).to(x.dtype)


def _check_text(text: dict[str, Tensor], b: int, td: int) -> None:
    """Raise a ValueError naming the entry of a text dict whose key, shape or dtype is wrong."""
    missing = [k for k in TEXT_KEYS if k not in text]
    if missing:
        raise ValueError(
            f"MMDiT text dict lacks {missing}; it needs {list(TEXT_KEYS)} (see aligntok.models.mmdit)"
        )
    tokens, mask, pooled, null = (text[k] for k in TEXT_KEYS)
    if tokens.ndim != 3 or tokens.shape[0] != b or tokens.shape[2] != td:
        raise ValueError(f"text tokens have shape {tuple(tokens.shape)}; expected (B={b}, L, text_dim={td})")
    if mask.dtype != torch.bool or mask.shape != tokens.shape[:2]:
        raise ValueError(
            f"text mask is {mask.dtype} {tuple(mask.shape)}; expected bool {tuple(tokens.shape[:2])} "
            "(True = a real token)"
        )
    if pooled.shape != (b, td):
        raise ValueError(f"text pooled has shape {tuple(pooled.shape)}; expected (B={b}, text_dim={td})")
    if null.dtype != torch.bool or null.shape != (b,):
        raise ValueError(f"text null is {null.dtype} {tuple(null.shape)}; expected bool ({b},)")
