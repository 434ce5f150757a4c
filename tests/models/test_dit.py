"""DiT backbone: shapes, adaLN-Zero, RoPE algebra, flag combinations, presets, parameter counts, fitting."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from aligntok.flow import interpolate
from aligntok.models.dit import DIT_PRESETS, DiT, DiTConfig, dit_preset
from aligntok.models.layers import (
    MATH_ATTENTION_MAX_TOKENS,
    RMSNorm,
    apply_rope,
    attend,
    grid_coords,
    modulate,
    rope_2d_tables,
    swiglu_hidden,
    unpatchify,
)
from aligntok.train.dit import DiTTrainConfig, flow_matching_loss


def tiny(**overrides) -> DiTConfig:
    kw = {"in_channels": 4, "input_size": 8, "num_classes": 10, "patch_size": 1} | overrides
    name = kw.pop("name", "debug")
    return dit_preset(name, **kw)


def randomize_zero_layers(model: DiT, seed: int = 0) -> None:
    """Give the zero-initialised adaLN and final layers random weights so every parameter gets gradient."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------
# shapes and adaLN-Zero


@pytest.mark.parametrize("patch", [1, 2])
def test_output_shape_and_dtype(patch):
    torch.manual_seed(0)
    model = DiT(tiny(patch_size=patch))
    randomize_zero_layers(model)
    x = torch.randn(3, 4, 8, 8)
    out = model(x, torch.rand(3), torch.tensor([0, 5, 9]))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.abs().sum() > 0
    # A non-square grid (other than the configured one) uses position tables built on the fly.
    x = torch.randn(2, 4, 8, 4)
    assert model(x, torch.tensor(0.3)).shape == x.shape


def test_unpatchify_inverts_patch_order():
    x = torch.randn(2, 3, 4, 6)  # (B, C, H, W), p = 2 -> grid 2 x 3
    p = 2
    tokens = x.reshape(2, 3, 2, p, 3, p).permute(0, 2, 4, 3, 5, 1).reshape(2, 6, p * p * 3)  # (B, N, p p C)
    assert torch.equal(unpatchify(tokens, p, 2, 3), x)


def test_fresh_model_outputs_exact_zeros_and_blocks_are_identity():
    torch.manual_seed(0)
    model = DiT(tiny(patch_size=2))
    x = torch.randn(2, 4, 8, 8)
    seen = []
    hooks = [b.register_forward_hook(lambda m, args, out: seen.append((args[0], out))) for b in model.blocks]
    out = model(x, torch.rand(2), torch.tensor([1, 2]))
    for h in hooks:
        h.remove()
    assert torch.equal(out, torch.zeros_like(x))
    assert len(seen) == len(model.blocks) and all(torch.equal(a, b) for a, b in seen)
    # Zero output is not a dead start: the final projection receives gradient.
    ((out - torch.randn_like(out)) ** 2).mean().backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------
# layers


def test_rope_is_a_rotation():
    rows, cols = grid_coords(4, 5)
    cos, sin = rope_2d_tables(rows, cols, 16)
    assert cos.shape == sin.shape == (20, 8)
    q = torch.randn(2, 3, 20, 16)  # (B, H, N, K)
    rq = apply_rope(q, cos, sin)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))
    assert torch.equal(rq[..., 0, :], q[..., 0, :])  # position (0, 0): no rotation
    assert not torch.allclose(rq[..., 1:, :], q[..., 1:, :])


def test_rope_scores_depend_only_on_relative_position():
    side, k_dim = 12, 16
    rows, cols = grid_coords(side, side)
    cos, sin = rope_2d_tables(rows, cols, k_dim)
    q, k = torch.randn(k_dim, dtype=torch.float64), torch.randn(k_dim, dtype=torch.float64)

    def score(pq: tuple[int, int], pk: tuple[int, int]) -> torch.Tensor:
        iq, ik = pq[0] * side + pq[1], pk[0] * side + pk[1]
        return apply_rope(q, cos[iq], sin[iq]) @ apply_rope(k, cos[ik], sin[ik])

    base = score((1, 2), (4, 0))
    for dr, dc in [(3, 1), (0, 5), (6, 7)]:
        torch.testing.assert_close(score((1 + dr, 2 + dc), (4 + dr, 0 + dc)), base)
    # ... and do depend on it, along rows and along columns separately.
    assert not torch.isclose(score((1, 2), (5, 0)), base)
    assert not torch.isclose(score((1, 2), (4, 1)), base)


def test_rmsnorm_and_modulate():
    x = torch.randn(3, 7, 16) * 5
    y = RMSNorm(16, affine=False)(x)
    torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(3, 7), atol=1e-4, rtol=1e-4)
    assert RMSNorm(16)(x.bfloat16()).dtype == torch.bfloat16
    shift, scale = torch.randn(3, 1, 16), torch.randn(3, 1, 16)
    torch.testing.assert_close(modulate(x, shift, scale), x + x * scale + shift)


def _attention_step(kernel: SDPBackend | None, n: int) -> tuple[torch.Tensor, ...]:
    """The bf16 attention output and q, k, v gradients for n tokens: `attend`'s (kernel None) or PyTorch's
    SDPA under `kernel`."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g).bfloat16().requires_grad_() for _ in range(3))
    if kernel is None:
        out = attend(q, k, v)
    else:
        with sdpa_kernel(kernel):
            out = F.scaled_dot_product_attention(q, k, v)
    out.float().square().sum().backward()
    return out, q.grad, k.grad, v.grad


@pytest.mark.parametrize("n", [MATH_ATTENTION_MAX_TOKENS, MATH_ATTENTION_MAX_TOKENS + 1])
def test_attention_kernel_choice_keeps_outputs_and_gradients(n):
    """A short bf16 training step takes the unfused kernel (faster backward on a CPU), a longer one the
    fused: either way the output and gradients are the fused kernel's, to bf16 rounding."""
    chosen = _attention_step(None, n)
    math = SDPBackend.MATH if n <= MATH_ATTENTION_MAX_TOKENS else SDPBackend.FLASH_ATTENTION
    for got, same_kernel, flash in zip(
        chosen, _attention_step(math, n), _attention_step(SDPBackend.FLASH_ATTENTION, n), strict=True
    ):
        assert torch.equal(got, same_kernel)  # the kernel the policy names is the one that ran
        torch.testing.assert_close(got.float(), flash.float(), atol=3e-2, rtol=3e-2)


def test_swiglu_width_matches_gelu_parameter_budget():
    assert swiglu_hidden(1152, 4.0) == 3072
    assert swiglu_hidden(1024, 4.0) % 8 == 0 and 2730 <= swiglu_hidden(1024, 4.0) < 2738


# ---------------------------------------------------------------------------------------------------------
# flags, autocast, conditioning


FLAGS = ("qk_norm", "use_rope", "use_swiglu", "use_rmsnorm")


@pytest.mark.parametrize("values", list(itertools.product([False, True], repeat=len(FLAGS))))
@pytest.mark.parametrize("bf16", [False, True])
def test_flag_combinations_forward_backward(values, bf16):
    flags = dict(zip(FLAGS, values))
    torch.manual_seed(0)
    model = DiT(tiny(input_size=4, patch_size=2, **flags))
    randomize_zero_layers(model)
    x, t, y = torch.randn(2, 4, 4, 4), torch.rand(2), torch.tensor([3, model.null_class])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(x, t, y)
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(p.grad.any() for p in model.parameters())  # every parameter (QK-norm gains too) learns


def test_rope_alone_gives_position_information():
    """Without the absolute embedding, a DiT with p = 1 would be permutation-equivariant; RoPE breaks that."""
    torch.manual_seed(0)
    model = DiT(tiny(use_abs_pos=False, use_rope=True))
    randomize_zero_layers(model)
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    assert not torch.allclose(model(x.flip(-1), t), model(x, t).flip(-1), atol=1e-4)


def test_null_class_and_label_conditioning():
    model = DiT(tiny(num_classes=10))
    randomize_zero_layers(model)
    assert model.null_class == 10 and model.y_embedder.table.num_embeddings == 11
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    null = torch.full((2,), model.null_class)
    torch.testing.assert_close(model(x, t), model(x, t, null))
    assert not torch.allclose(model(x, t, torch.tensor([0, 1])), model(x, t, null))
    assert not torch.allclose(model(x, t.flip(0)), model(x, t))


def test_config_validation():
    with pytest.raises(ValueError, match="patch_size"):
        tiny(input_size=7, patch_size=2)
    with pytest.raises(ValueError, match="num_heads"):
        tiny(num_heads=3)
    with pytest.raises(ValueError, match="position"):
        tiny(use_rope=False, use_abs_pos=False)
    with pytest.raises(ValueError, match="divisible by 4"):
        tiny(hidden_size=72, num_heads=12)  # head dim 6 cannot carry 2-D RoPE ...
    DiT(tiny(hidden_size=72, num_heads=12, use_rope=False))  # ... but is fine without it
    model = DiT(tiny())
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(1, 3, 8, 8), torch.rand(1))


# ---------------------------------------------------------------------------------------------------------
# presets and parameter counts


def test_presets():
    widths = {k: (v["hidden_size"], v["depth"], v["num_heads"]) for k, v in DIT_PRESETS.items()}
    assert widths["S"] == (384, 12, 6) and widths["B"] == (768, 12, 12)
    assert widths["L"] == (1024, 24, 16) and widths["XL"] == (1152, 28, 16)
    cfg = dit_preset("XL/2", in_channels=32, input_size=16, num_classes=1000, qk_norm=True)
    assert cfg.patch_size == 2 and cfg.qk_norm and cfg.hidden_size == 1152
    assert dit_preset("B", patch_size=1, in_channels=4, input_size=8, num_classes=0).patch_size == 1
    for bad, kw in [
        ("XL", {}),
        ("XL/1", {"patch_size": 2}),
        ("XXL/1", {}),
        ("XL/x", {}),
        ("B/1", {"nope": 1}),
    ]:
        with pytest.raises(ValueError):
            dit_preset(bad, in_channels=4, input_size=8, num_classes=10, **kw)


def expected_params(cfg: DiTConfig) -> int:
    """Closed-form count for the default flags (SwiGLU, RMSNorm with gain, no QK-norm), written by hand."""
    d, c, p, f = cfg.hidden_size, cfg.in_channels, cfg.patch_size, cfg.frequency_dim
    h = swiglu_hidden(d, cfg.mlp_ratio)
    block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * 2 * h + 2 * h + h * d + d) + (6 * d * d + 6 * d)
    final = d + (2 * d * d + 2 * d) + (d * p * p * c + p * p * c)
    embed = (c * p * p * d + d) + (f * d + d + d * d + d) + (cfg.num_classes + 1) * d
    return cfg.depth * block + final + embed


@pytest.mark.parametrize("name", ["XL/1", "B/1", "S/1"])
def test_parameter_counts_on_meta(name):
    cfg = dit_preset(name, in_channels=32, input_size=16, num_classes=1000)
    with torch.device("meta"):
        model = DiT(cfg)
    assert count(model) == expected_params(cfg)
    if name == "XL/1":
        assert 640e6 <= count(model) <= 710e6  # the paper: about 675M


def test_meta_build_then_materialise_matches_eager():
    cfg = tiny(patch_size=2)
    with torch.device("meta"):
        meta = DiT(cfg)
    meta.to_empty(device="cpu")
    meta.init_weights()
    eager = DiT(cfg)
    assert not any("rope" in k or "pos_embed" in k for k in eager.state_dict())  # recomputed, never saved
    for name in ("rope_cos", "rope_sin", "pos_embed"):
        torch.testing.assert_close(getattr(meta, name), getattr(eager, name))
    meta.load_state_dict(eager.state_dict())
    randomize_zero_layers(eager)
    meta.load_state_dict(eager.state_dict())
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    torch.testing.assert_close(meta(x, t), eager(x, t))


# ---------------------------------------------------------------------------------------------------------
# learning


def test_tiny_dit_overfits_fixed_flow_matching_batch():
    """4 latents 4x4x4, one shared time and every label dropped, so only the input tells the samples apart;
    the loss is the trainer's own (`flow_matching_loss`)."""
    torch.manual_seed(0)
    model = DiT(dit_preset("debug/1", in_channels=4, input_size=4, num_classes=4))
    g = torch.Generator().manual_seed(1)
    z0, eps = torch.randn(4, 4, 4, 4, generator=g), torch.randn(4, 4, 4, 4, generator=g)
    t = torch.full((4,), 0.5)
    null = torch.full((4,), 4)
    noise = (torch.ones(4, dtype=torch.bool), t, eps)  # (label dropout mask, t, eps) as draw_step_noise gives
    cfg = DiTTrainConfig(model="debug/1")
    z_t = interpolate(z0, eps, t)  # (1 - t) z0 + t eps
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(100):  # reaches ~1e-4 of the start on 2 CPU cores in about a second
        loss = flow_matching_loss(model, z0, torch.zeros(4, dtype=torch.long), noise, cfg, null_class=4)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.01 * losses[0]
    with torch.no_grad():
        x0 = z_t - 0.5 * model(z_t, t, null)  # data prediction from the velocity
    assert (x0 - z0).square().mean() < 0.01 * z0.square().mean()
