"""LightningDiT-style diffusion transformer on latent grids (architecture only).

DiT (Peebles & Xie 2023) with the LightningDiT upgrades (Yao et al. 2025, "Reconstruction vs.
Generation: Taming Optimization Dilemma"): adaLN-Zero blocks, RMSNorm, SwiGLU, 2-D RoPE, optional
QK-norm. The network predicts the flow-matching velocity v = eps - z_0 (see aligntok.flow), so the output
has the input's shape and there is no learned variance.

No losses, EMA, sampling or parallelism here. For FSDP2 / activation checkpointing, the transformer
blocks are `DiT.blocks` (an nn.ModuleList); each is called as `block(x, c, rope)`. For meta-device
construction: build under `torch.device("meta")`, then `to_empty(device=...)`, then `init_weights()`
(fresh training) or load a state dict and call `init_buffers()` (the RoPE / position tables are
non-persistent buffers, recomputed, never saved).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from aligntok.models.layers import (
    Attention,
    GeluMLP,
    LabelEmbedder,
    PatchEmbed,
    RMSNorm,
    SwiGLU,
    TimestepEmbedder,
    attend,
    grid_coords,
    make_norm,
    modulate,
    rope_2d_tables,
    sincos_pos_embed_2d,
    unpatchify,
)


@dataclass(kw_only=True)
class DiTConfig:
    """Shape and flags of a DiT; `dit_preset` builds one from a named size."""

    in_channels: int  # latent channels C
    input_size: int  # latent grid side h = w
    patch_size: int = 1
    hidden_size: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    num_classes: int  # real classes; the embedding has one more row, the null class (CFG)
    qk_norm: bool = False
    use_rope: bool = True  # 2-D RoPE on q and k in every block
    use_abs_pos: bool = True  # fixed 2-D sin-cos embedding added to the tokens (DiT, LightningDiT)
    use_swiglu: bool = True  # SwiGLU MLP, else DiT's GELU MLP
    use_rmsnorm: bool = True  # RMSNorm pre-norms, else DiT's affine-free LayerNorm
    qkv_bias: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    frequency_dim: int = 256  # sinusoidal timestep features
    time_scale: float = 1000.0  # t in [0, 1] is embedded as time_scale * t (DiT's step scale)

    def __post_init__(self) -> None:
        for name in ("in_channels", "input_size", "patch_size", "hidden_size", "depth", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"DiTConfig.{name}={getattr(self, name)} must be a positive integer")
        if self.num_classes < 0:
            raise ValueError(f"DiTConfig.num_classes={self.num_classes} must be >= 0 (0 = unconditional)")
        if self.input_size % self.patch_size:
            raise ValueError(
                f"DiTConfig.input_size={self.input_size} is not divisible by patch_size={self.patch_size}; "
                "use a patch size that divides the latent grid"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"DiTConfig.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )
        if self.use_rope and self.head_dim % 4:
            raise ValueError(
                f"DiTConfig: 2-D RoPE needs hidden_size / num_heads = {self.head_dim} divisible by 4"
            )
        if self.use_abs_pos and self.hidden_size % 4:
            raise ValueError(f"DiTConfig: use_abs_pos needs hidden_size={self.hidden_size} divisible by 4")
        if not (self.use_rope or self.use_abs_pos):
            raise ValueError("DiTConfig: use_rope and use_abs_pos are both off, so tokens carry no position")
        if self.mlp_ratio <= 0:
            raise ValueError(f"DiTConfig.mlp_ratio={self.mlp_ratio} must be positive")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_size(self) -> int:
        """Tokens per side, input_size / patch_size."""
        return self.input_size // self.patch_size


# size -> (hidden_size, depth, num_heads); DiT table 1 (Peebles & Xie 2023), used unchanged by LightningDiT.
DIT_PRESETS: dict[str, dict[str, int]] = {
    "debug": {"hidden_size": 64, "depth": 2, "num_heads": 4},
    # Not a published size: the CPU-sized model of our small-data recipes (emoji, Fashion-MNIST).
    "T": {"hidden_size": 256, "depth": 4, "num_heads": 4},
    "S": {"hidden_size": 384, "depth": 12, "num_heads": 6},
    "B": {"hidden_size": 768, "depth": 12, "num_heads": 12},
    "L": {"hidden_size": 1024, "depth": 24, "num_heads": 16},
    "XL": {"hidden_size": 1152, "depth": 28, "num_heads": 16},
}


def preset_kwargs(
    name: str,
    presets: dict[str, dict[str, int]],
    config_cls: type,
    *,
    patch_size: int | None,
    overrides: dict[str, Any],
    example: str,
) -> dict[str, Any]:
    """The size fields of preset `name` ("SIZE/PATCH", or "SIZE" with `patch_size`) from `presets`, with
    `patch_size` and the `overrides` (checked to be fields of `config_cls`): what `dit_preset` and
    `mmdit_preset` complete with their latent (and text) sizes. `example` is a valid size for messages."""
    kind = config_cls.__name__.removesuffix("Config")
    size, sep, patch_text = name.partition("/")
    if size not in presets:
        raise ValueError(f"unknown {kind} size {size!r} in {name!r}; known: {sorted(presets)}")
    if sep:
        if not patch_text.isdigit():
            raise ValueError(
                f"{kind} preset {name!r}: the part after '/' must be a patch size, e.g. '{example}/1'"
            )
        if patch_size is not None and patch_size != int(patch_text):
            raise ValueError(
                f"{kind} preset {name!r} conflicts with patch_size={patch_size}; give one of them"
            )
        patch_size = int(patch_text)
    if patch_size is None:
        raise ValueError(
            f"{kind} preset {name!r} has no patch size; write e.g. '{size}/1' or pass patch_size="
        )
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(
            f"unknown {config_cls.__name__} field(s) {sorted(unknown)} for preset {name!r}; "
            f"known: {sorted(fields)}"
        )
    return {**presets[size], "patch_size": patch_size, **overrides}


def dit_preset(
    name: str,
    *,
    in_channels: int,
    input_size: int,
    num_classes: int,
    patch_size: int | None = None,
    **overrides: Any,
) -> DiTConfig:
    """DiTConfig for a preset such as "XL/1" (or "XL" with `patch_size`), on a latent of `in_channels`
    channels and an `input_size` grid; `overrides` set any other DiTConfig field (e.g. qk_norm=True)."""
    sizes = {"in_channels": in_channels, "input_size": input_size, "num_classes": num_classes}
    kw = preset_kwargs(
        name, DIT_PRESETS, DiTConfig, patch_size=patch_size, overrides={**sizes, **overrides}, example="XL"
    )
    return DiTConfig(**kw)


class BlockConfig(Protocol):
    """The fields a `DiTBlock` and a `FinalLayer` read: DiTConfig and the MMDiT's config both have them."""

    hidden_size: int
    num_heads: int
    mlp_ratio: float
    qk_norm: bool
    qkv_bias: bool
    use_swiglu: bool
    use_rmsnorm: bool
    norm_eps: float
    patch_size: int
    in_channels: int


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block: six modulation vectors from c gate a pre-norm attention and MLP.

    x + gate_a * attn(modulate(norm1(x), shift_a, scale_a)), then the same for the MLP (DiT fig. 3).
    `forward` is `attention_heads`, `attend`, `finish`; the MMDiT's double-stream block runs the two ends
    of one such block per stream around a joint attention.
    """

    def __init__(self, cfg: BlockConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.norm1 = make_norm(d, rms=cfg.use_rmsnorm, eps=cfg.norm_eps)
        self.attn = Attention(d, cfg.num_heads, qk_norm=cfg.qk_norm, qkv_bias=cfg.qkv_bias, eps=cfg.norm_eps)
        self.norm2 = make_norm(d, rms=cfg.use_rmsnorm, eps=cfg.norm_eps)
        self.mlp = SwiGLU(d, cfg.mlp_ratio) if cfg.use_swiglu else GeluMLP(d, cfg.mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def attention_heads(
        self, x: Tensor, c: Tensor
    ) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[Tensor, ...]]:
        """x (B, N, D), c (B, D) -> (q, k, v) each (B, H, N, K) of the modulated pre-norm x, and the six
        modulation vectors (B, 1, D) that `finish` needs."""
        mods = self.adaLN_modulation(c).unsqueeze(1).chunk(6, dim=-1)  # 6 x (B, 1, D)
        shift_a, scale_a = mods[0], mods[1]
        return self.attn.heads(modulate(self.norm1(x), shift_a, scale_a)), mods

    def finish(self, x: Tensor, o: Tensor, mods: tuple[Tensor, ...]) -> Tensor:
        """Add the gated attention output o (B, H, N, K), then the gated MLP, to x (B, N, D) -> (B, N, D)."""
        _, _, gate_a, shift_m, scale_m, gate_m = mods
        x = torch.addcmul(x, gate_a, self.attn.out(o))  # x + gate * out, fused
        return torch.addcmul(x, gate_m, self.mlp(modulate(self.norm2(x), shift_m, scale_m)))

    def forward(
        self, x: Tensor, c: Tensor, rope: tuple[Tensor, Tensor] | None = None, mask: Tensor | None = None
    ) -> Tensor:
        """x (B, N, D), c (B, D), rope (cos, sin) each (N, K/2), mask (B, N) bool (True = may be attended
        to; None = all) -> (B, N, D)."""
        (q, k, v), mods = self.attention_heads(x, c)
        return self.finish(x, attend(q, k, v, rope=rope, mask=mask), mods)


class FinalLayer(nn.Module):
    """adaLN (shift, scale; no gate) then a zero-initialised linear map to p * p * C per token."""

    def __init__(self, cfg: BlockConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.norm = make_norm(d, rms=cfg.use_rmsnorm, eps=cfg.norm_eps)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.linear = nn.Linear(d, cfg.patch_size**2 * cfg.in_channels)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """x (B, N, D), c (B, D) -> (B, N, p * p * C)."""
        shift, scale = self.adaLN_modulation(c).unsqueeze(1).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Class-conditioned velocity network: (x (B, C, H, W), t (B,) in [0, 1], y (B,)) -> (B, C, H, W)."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = cfg = config
        d = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.in_channels, d, cfg.patch_size)
        self.t_embedder = TimestepEmbedder(d, frequency_dim=cfg.frequency_dim, time_scale=cfg.time_scale)
        self.y_embedder = LabelEmbedder(cfg.num_classes, d)
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg)
        n = cfg.grid_size**2
        # Tables for the configured grid (None when the flag is off); other grids are built in forward.
        rope_shape = (n, cfg.head_dim // 2)
        self.register_buffer("rope_cos", torch.empty(rope_shape) if cfg.use_rope else None, persistent=False)
        self.register_buffer("rope_sin", torch.empty(rope_shape) if cfg.use_rope else None, persistent=False)
        self.register_buffer("pos_embed", torch.empty(n, d) if cfg.use_abs_pos else None, persistent=False)
        self.init_weights()

    @property
    def null_class(self) -> int:
        """Label id of the unconditional (CFG) embedding."""
        return self.y_embedder.null_class

    @torch.no_grad()
    def init_buffers(self) -> None:
        """(Re)compute the non-persistent position tables, e.g. after `to_empty` or loading weights."""
        g = self.config.grid_size
        device = next(self.buffers(), self.x_embedder.proj.weight).device
        cos, sin, pos = self._position_tables(g, g, device)
        for buf, value in ((self.rope_cos, cos), (self.rope_sin, sin), (self.pos_embed, pos)):
            if buf is not None:
                buf.copy_(value)

    @torch.no_grad()
    def init_weights(self) -> None:
        """DiT initialisation: xavier-uniform linears with zero bias, N(0, 0.02) embedders, adaLN-Zero
        (every modulation layer and the final projection start at zero, so each block starts as the
        identity and the network outputs exactly zero)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()
        # Embedders and the patch projection override the generic linear rule above.
        self.x_embedder.reset_parameters()
        self.t_embedder.reset_parameters()
        self.y_embedder.reset_parameters()
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [
            self.final_layer.adaLN_modulation[-1],
            self.final_layer.linear,
        ]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.init_buffers()

    def _position_tables(
        self, grid_h: int, grid_w: int, device: torch.device
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """RoPE cos, sin (N, K/2) and absolute embedding (N, D) of a grid; None for a disabled flag."""
        cfg = self.config
        rows, cols = grid_coords(grid_h, grid_w, device=device)
        cos = sin = pos = None
        if cfg.use_rope:
            cos, sin = rope_2d_tables(rows, cols, cfg.head_dim, theta=cfg.rope_theta)
        if cfg.use_abs_pos:
            pos = sincos_pos_embed_2d(rows, cols, cfg.hidden_size)
        return cos, sin, pos

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """Velocity for latents x (B, C, H, W) at times t ((B,) or a scalar, in [0, 1], noise at 1) and
        labels y ((B,) long; None or `null_class` entries mean unconditional). Returns x's shape and dtype.
        """
        cfg = self.config
        b, c, h, w = x.shape
        p = cfg.patch_size
        if c != cfg.in_channels or h % p or w % p:
            raise ValueError(
                f"DiT got input {tuple(x.shape)}; expected {cfg.in_channels} channels and H, W divisible by "
                f"patch_size={p} (check the latent cache matches the DiT config)"
            )
        gh, gw = h // p, w // p
        if gh == gw == cfg.grid_size:
            cos, sin, pos = self.rope_cos, self.rope_sin, self.pos_embed
        else:
            cos, sin, pos = self._position_tables(gh, gw, x.device)
        if t.ndim == 0:
            t = t.expand(b)
        if y is None:
            y = torch.full((b,), self.null_class, dtype=torch.long, device=x.device)

        tokens = self.x_embedder(x)  # (B, N, D)
        if cfg.use_abs_pos:
            tokens = tokens + pos.to(tokens.dtype)
        cond = self.t_embedder(t) + self.y_embedder(y)  # (B, D)
        rope = (cos, sin) if cfg.use_rope else None
        for block in self.blocks:
            tokens = block(tokens, cond, rope)
        out = self.final_layer(tokens, cond)  # (B, N, p * p * C)
        return unpatchify(out, p, gh, gw).to(x.dtype)
