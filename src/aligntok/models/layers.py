"""Building blocks shared by every model: norms, attention, RoPE, MLPs, adaLN, embedders (transformers), and
the LDM autoencoder's convolutional blocks (GroupNorm, residual block, self-attention over a feature map).

This module is the ONE home of these pieces (see docs/design.md section 2); model files import from here.
Shape letters: B batch, N tokens, D width, H heads, K head dim, C channels, p patch size.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

# ---------------------------------------------------------------------------------------------------------
# Normalisation and modulation


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019) over the last axis, computed in float32.

    The result is cast back to the input dtype so that, under bf16 autocast, q/k/v stay in one dtype.
    """

    def __init__(self, dim: int, *, eps: float = 1e-6, affine: bool = True) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else self.weight.float()
        return F.rms_norm(x.float(), (self.dim,), weight, self.eps).to(x.dtype)  # one fused kernel

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, affine={self.weight is not None}"


def make_norm(dim: int, *, rms: bool, eps: float = 1e-6) -> nn.Module:
    """The pre-norm of a transformer block: RMSNorm (with a gain) or DiT's affine-free LayerNorm."""
    return RMSNorm(dim, eps=eps) if rms else nn.LayerNorm(dim, eps=eps, elementwise_affine=False)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation x * (1 + scale) + shift (DiT, Peebles & Xie 2023, sec. 3.2).

    `shift` and `scale` must broadcast against `x`, e.g. (B, 1, D) against (B, N, D); the `1 +` makes a
    zero-initialised modulation the identity.
    """
    return torch.addcmul(shift, x, 1 + scale)  # one fused kernel instead of a multiply and an add


# ---------------------------------------------------------------------------------------------------------
# Positions: 2-D rotary embedding and fixed 2-D sin-cos embedding


def grid_coords(
    grid_h: int, grid_w: int, *, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """Row and column index of every token of an (h, w) grid in row-major order: two (N,) float tensors."""
    rows = torch.arange(grid_h, device=device, dtype=torch.float32).repeat_interleave(grid_w)
    cols = torch.arange(grid_w, device=device, dtype=torch.float32).repeat(grid_h)
    return rows, cols


def rope_2d_tables(
    rows: Tensor, cols: Tensor, head_dim: int, *, theta: float = 10000.0
) -> tuple[Tensor, Tensor]:
    """cos and sin tables, each (N, head_dim // 2) float32, of a 2-D rotary embedding.

    The head dim is split into head_dim // 2 pairs of channels; the first half of the pairs rotates by
    row * f_k and the second half by col * f_k, with f_k = theta ** (-k / (head_dim / 4)),
    k = 0 .. head_dim / 4 - 1 (1-D RoPE of Su et al. 2021 applied per axis, as in EVA-02/LightningDiT).
    """
    if head_dim % 4:
        raise ValueError(
            f"2-D RoPE needs a head dim divisible by 4, got {head_dim}; change hidden_size/num_heads"
        )
    quarter = head_dim // 4
    freqs = theta ** (-torch.arange(quarter, device=rows.device, dtype=torch.float32) / quarter)  # (K/4,)
    angles = torch.cat([rows.float()[:, None] * freqs, cols.float()[:, None] * freqs], dim=-1)  # (N, K/2)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs (2i, 2i+1) of x (..., N, K) by the angles behind cos/sin (N, K/2).

    Computed in float32 and cast back to x's dtype; a rotation, so per-token norms are preserved.
    """
    # Pair (2i, 2i+1) as the complex number x_2i + j x_2i+1: the rotation is one complex multiply.
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())  # (..., N, K/2)
    out = torch.view_as_real(pairs * torch.complex(cos.float(), sin.float()))
    return out.flatten(-2).to(x.dtype)


def sincos_pos_embed_2d(rows: Tensor, cols: Tensor, dim: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding (N, dim) float32, half the width per axis (MAE/DiT style)."""
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, device=rows.device, dtype=torch.float32) / quarter)
    parts = []
    for pos in (rows.float(), cols.float()):
        arg = pos[:, None] * omega  # (N, D/4)
        parts += [arg.sin(), arg.cos()]
    return torch.cat(parts, dim=-1)


# ---------------------------------------------------------------------------------------------------------
# Attention and MLPs


def attend(
    q: Tensor, k: Tensor, v: Tensor, *, rope: tuple[Tensor, Tensor] | None = None, mask: Tensor | None = None
) -> Tensor:
    """Scaled dot-product attention of heads q, k, v (B, H, N, K) -> (B, H, N, K).

    rope = (cos, sin), each (N, K/2), rotates q and k (`apply_rope`). mask (B, N) bool marks the tokens
    that may be attended to (True = a real key); every query sees every True key, so each row needs at
    least one. Self-attention and the joint text-image attention of the MMDiT (over concatenated heads)
    both end here.
    """
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    if mask is not None:
        if mask.dtype != torch.bool or mask.shape != (k.shape[0], k.shape[2]):
            raise ValueError(
                f"attention mask must be bool (B, N) = {(k.shape[0], k.shape[2])}, "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
        mask = mask[:, None, None, :]  # (B, 1, 1, N): broadcast over heads and queries
    with _sdpa_backend(q):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# On a CPU the fused (flash) kernel's BACKWARD is slow for short bf16 sequences. Forward + backward of 64
# batches x 4 heads of 64 dims at 64 tokens: 14 ms through `attend` against 24 ms for the plain SDPA call, 2
# threads (the `attention` row of benchmarks/peers.py, docs/results.md). Timed the same way on one thread of
# a shared core at other lengths (4096 / N batches): flash 89 / 111 / 97 ms against unfused ("math") 51 /
# 81 / 114 ms at 64 / 128 / 192 tokens. Forward alone flash was twice as fast, and in fp32 as fast or faster
# at every length, so only bf16 training steps take the unfused path. The demo's DiTs have 64 image tokens,
# 96 with the text.
MATH_ATTENTION_MAX_TOKENS = 128


def _sdpa_backend(q: Tensor) -> contextlib.AbstractContextManager:
    """The unfused SDPA kernel for a bf16 training step on a short sequence on a CPU, else PyTorch's."""
    short_bf16_cpu = (
        q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.shape[-2] <= MATH_ATTENTION_MAX_TOKENS
    )
    if short_bf16_cpu and q.requires_grad and torch.is_grad_enabled():
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


class Attention(nn.Module):
    """Multi-head attention with optional QK-norm and 2-D RoPE, via scaled_dot_product_attention.

    QK-norm (an RMSNorm over each head's q and k, Dehghani et al. 2023) bounds the attention logits;
    the AlignTok paper needed it to keep long LightningDiT runs from diverging. `forward` is
    self-attention; `heads` and `out` are its two ends, so that a joint attention (MMDiT) can concatenate
    the heads of several streams, `attend` once, and split the result back.
    """

    def __init__(
        self, dim: int, num_heads: int, *, qk_norm: bool = False, qkv_bias: bool = True, eps: float = 1e-6
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = RMSNorm(self.head_dim, eps=eps) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim, eps=eps) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, N, D) -> q, k, v, each (B, H, N, K), q and k after QK-norm (RoPE is `attend`'s job)."""
        b, n, _ = x.shape
        qkv = (
            self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        )  # (3, B, H, N, K)
        q, k, v = qkv.unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def out(self, o: Tensor) -> Tensor:
        """Attention output o (B, H, N, K) -> (B, N, D) through the output projection."""
        b, h, n, k = o.shape
        return self.proj(o.transpose(1, 2).reshape(b, n, h * k))

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None, mask: Tensor | None = None
    ) -> Tensor:
        """x (B, N, D), rope = (cos, sin) each (N, K/2) or None, mask (B, N) bool or None -> (B, N, D)."""
        return self.out(attend(*self.heads(x), rope=rope, mask=mask))


def swiglu_hidden(dim: int, mlp_ratio: float, *, multiple_of: int = 8) -> int:
    """SwiGLU hidden width: 2/3 of the GELU MLP's width (so the parameter count matches), rounded UP to a
    multiple of `multiple_of` for kernel-friendly shapes. 1152 x 4 -> 3072, 1024 x 4 -> 2736."""
    hidden = int(round(2 * mlp_ratio * dim / 3, 6))
    return -(-hidden // multiple_of) * multiple_of


class SwiGLU(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): w3(silu(x W1) * (x W2)), hidden width from `swiglu_hidden`."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.hidden = swiglu_hidden(dim, mlp_ratio)
        self.w12 = nn.Linear(dim, 2 * self.hidden)
        self.w3 = nn.Linear(self.hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class GeluMLP(nn.Module):
    """The ViT/DiT MLP: Linear -> GELU (tanh approximation) -> Linear, hidden width int(dim * mlp_ratio)."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, self.hidden)
        self.fc2 = nn.Linear(self.hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


# ---------------------------------------------------------------------------------------------------------
# Conditioning embedders


def timestep_frequencies(t: Tensor, dim: int, *, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features (B, dim) float32 of (already scaled) times t (B,), [cos | sin] as in DiT."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]  # (B, dim/2)
    emb = torch.cat([args.cos(), args.sin()], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def embed_mlp(in_dim: int, dim: int) -> nn.Sequential:
    """Linear(in_dim, dim) -> SiLU -> Linear(dim, dim): the MLP that embeds a conditioning vector (the
    timestep features; the MMDiT's pooled text vector)."""
    return nn.Sequential(nn.Linear(in_dim, dim), nn.SiLU(), nn.Linear(dim, dim))


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> (B, D): sinusoidal features of 1000 t (DiT's integer-step scale) then a 2-layer MLP."""

    def __init__(self, dim: int, *, frequency_dim: int = 256, time_scale: float = 1000.0) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.time_scale = time_scale
        self.mlp = embed_mlp(frequency_dim, dim)

    def reset_parameters(self) -> None:
        for layer in (self.mlp[0], self.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def forward(self, t: Tensor) -> Tensor:
        # Features in float32 (1000 t in bf16 would round to steps of ~4), then the MLP's own dtype so
        # that bf16 parameters (FSDP mixed precision) work without autocast.
        freq = timestep_frequencies(t.float() * self.time_scale, self.frequency_dim)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label -> (B, D) with one extra row, `null_class` (= num_classes), for classifier-free guidance.

    Label dropout is the training loop's job: it replaces labels by `null_class`; the model never drops.
    """

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.null_class = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, y: Tensor) -> Tensor:
        return self.table(y)


# ---------------------------------------------------------------------------------------------------------
# Patches


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, N, D) tokens in row-major order, N = (H / p) (W / p): a stride-p convolution."""

    def __init__(self, in_channels: int, dim: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def reset_parameters(self) -> None:
        # DiT: initialise like a Linear on the flattened patch (xavier on (D, C p p)).
        nn.init.xavier_uniform_(self.proj.weight.view(self.proj.weight.shape[0], -1))
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def unpatchify(x: Tensor, patch_size: int, grid_h: int, grid_w: int) -> Tensor:
    """(B, N, p * p * C) tokens, channels ordered (p_row, p_col, C) -> (B, C, grid_h * p, grid_w * p)."""
    b, n, f = x.shape
    p = patch_size
    assert n == grid_h * grid_w and f % (p * p) == 0, (x.shape, patch_size, grid_h, grid_w)
    c = f // (p * p)
    x = x.reshape(b, grid_h, grid_w, p, p, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, c, grid_h * p, grid_w * p)


# ---------------------------------------------------------------------------------------------------------
# Convolutional blocks of the LDM autoencoder (the decoder and the from-scratch CNN encoder)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm(32) as in the LDM autoencoder; shared by the decoder and the from-scratch CNN encoder."""
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: (GroupNorm, SiLU, conv3x3) twice, 1x1 shortcut when widths differ."""

    def __init__(self, in_ch: int, out_ch: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions of a feature map, with a residual connection."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, 1, C, H * W).transpose(-1, -2)  # (B, 3, 1, N, C)
        out = F.scaled_dot_product_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2])  # (B, 1, N, C)
        return x + self.proj(out.transpose(-1, -2).reshape(B, C, H, W))
