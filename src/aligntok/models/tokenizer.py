"""The AlignTok tokenizer: foundation encoder -> per-token MLP adapter -> latent z -> CNN decoder.

docs/method.md "Tokenizer": z = A(E(x)) is deterministic (no KL, no sampling, no noise); the decoder of the
LDM/VA-VAE shape maps z back to pixels. `posterior="gaussian"` is for the baselines (vanilla VAE, VA-VAE):
the adapter then outputs a diagonal Gaussian's mean and log-variance, training samples from it, and
`encode` gives the mean. The module also owns the per-channel latent statistics that the
diffusion model standardises with, so that they travel inside the export (a mismatch between latents and
statistics is a known way to get FID above 100).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from aligntok.checkpoint import load_export, load_state_strict, save_export
from aligntok.config import from_dict, to_dict
from aligntok.models.decoder import Decoder, DecoderConfig
from aligntok.models.encoders import EncoderConfig, build_encoder

_ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "silu": nn.SiLU, "relu": nn.ReLU}
_POSTERIORS = ("deterministic", "gaussian")
# LDM's DiagonalGaussianDistribution clamps the log-variance here: exp() stays finite in fp32 and bf16.
LOGVAR_RANGE = (-30.0, 20.0)


@dataclass(kw_only=True)
class TokenizerConfig:
    """Image size, encoder, adapter width, latent channels, decoder; presets in recipes/tokenizer.py."""

    image_size: int
    encoder: EncoderConfig
    adapter_hidden: int
    latent_channels: int
    decoder: DecoderConfig
    adapter_act: str = "gelu"
    # AlignTok's latent is deterministic (docs/method.md: a KL term hurt); "gaussian" serves the VAE
    # baselines.
    posterior: Literal["deterministic", "gaussian"] = "deterministic"

    def __post_init__(self) -> None:
        # Checks that tie two fields together live in Tokenizer.__init__: `--set` overrides change one
        # field at a time, so a config is briefly inconsistent while both are being changed.
        if self.image_size < 1 or self.adapter_hidden < 1 or self.latent_channels < 1:
            raise ValueError(
                f"tokenizer sizes must be positive (image_size={self.image_size}, "
                f"adapter_hidden={self.adapter_hidden}, latent_channels={self.latent_channels})"
            )
        if self.adapter_act not in _ACTIVATIONS:
            raise ValueError(f"adapter_act={self.adapter_act!r} is not one of {sorted(_ACTIVATIONS)}")
        if self.posterior not in _POSTERIORS:
            raise ValueError(f"posterior={self.posterior!r} is not one of {list(_POSTERIORS)}")

    @staticmethod
    def migrate(data: dict[str, Any]) -> dict[str, Any]:
        """A config mapping of an older file, brought up to date (`config.from_dict` calls this first).

        Configs written before the decoder took its input width from `latent_channels` also hold it as
        `decoder.z_channels`: the key is dropped when it agrees, and an error when it does not.
        """
        decoder = data.get("decoder")
        if not isinstance(decoder, dict) or "z_channels" not in decoder:
            return data
        z_channels, latent_channels = decoder["z_channels"], data.get("latent_channels")
        if z_channels != latent_channels:
            raise ValueError(
                f"decoder.z_channels={z_channels} differs from latent_channels={latent_channels}; the "
                "decoder's input width is latent_channels (decoder.z_channels, a key of older configs, "
                "must equal it or be removed)"
            )
        return {**data, "decoder": {k: v for k, v in decoder.items() if k != "z_channels"}}


class Adapter(nn.Module):
    """Per-token two-layer MLP from encoder features (B, D, h, w) to the latent (B, C, h, w)."""

    def __init__(self, dim: int, hidden: int, out: int, act: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = _ACTIVATIONS[act]()
        self.fc2 = nn.Linear(hidden, out)

    @property
    def last_layer(self) -> Tensor:
        """Weight of the layer that outputs the latent (a Gaussian posterior's mean and log-variance):
        VA-VAE's adaptive VF weight compares gradient norms here."""
        return self.fc2.weight

    def forward(self, feats: Tensor) -> Tensor:
        x = feats.permute(0, 2, 3, 1)  # (B, h, w, D): tokens channels-last
        return self.fc2(self.act(self.fc1(x))).permute(0, 3, 1, 2).contiguous()  # (B, C, h, w)


class Tokenizer(nn.Module):
    """Images in [0, 1] (B, 3, H, W) <-> raw latents (B, C, h, w); `normalize` gives the DiT's latents."""

    def __init__(self, cfg: TokenizerConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = build_encoder(cfg.encoder)
        grid = self.encoder.grid(cfg.image_size)
        factor = cfg.decoder.upsample_factor
        if grid * factor != cfg.image_size:
            levels = math.log2(cfg.image_size / grid) + 1 if grid > 0 else float("nan")
            fix = (
                f"use {int(levels)} decoder.ch_mult entries"
                if levels.is_integer()
                else "change encoder.input_size or image_size so that their ratio is a power of 2"
            )
            raise ValueError(
                f"encoder {cfg.encoder.name} gives a {grid}x{grid} grid at image_size={cfg.image_size}, "
                f"and the decoder's {len(cfg.decoder.ch_mult)} levels upsample it x{factor} to "
                f"{grid * factor} px, not {cfg.image_size}; {fix}"
            )
        self.grid = grid
        # A Gaussian posterior's adapter outputs (mean, logvar): 2C channels.
        out = cfg.latent_channels * (2 if cfg.posterior == "gaussian" else 1)
        self.adapter = Adapter(self.encoder.dim, cfg.adapter_hidden, out, cfg.adapter_act)
        self.decoder = Decoder(cfg.decoder, latent_size=grid, latent_channels=cfg.latent_channels)
        self.register_buffer("latent_mean", torch.zeros(cfg.latent_channels))
        self.register_buffer("latent_std", torch.ones(cfg.latent_channels))

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one image's latent."""
        return (self.config.latent_channels, self.grid, self.grid)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by part, for per-stage freezing and optimizers (docs/method.md, the three stages).

        The encoder group leaves out the parameters its features never use (later blocks, heads): they
        must stay frozen, or a DDP wrapper would wait for gradients that never come.
        """
        return {
            "encoder": self.encoder.feature_parameters(),
            "adapter": list(self.adapter.parameters()),
            "decoder": list(self.decoder.parameters()),
        }

    def set_trainable(self, *, encoder: bool, adapter: bool, decoder: bool) -> None:
        """Set requires_grad per part (stage 1: F/T/T, stage 2: T/T/T, stage 3: F/F/T)."""
        for group, flag in zip(self.param_groups().values(), (encoder, adapter, decoder)):
            for p in group:
                p.requires_grad_(flag)

    def _check_images(self, images: Tensor) -> None:
        s = self.config.image_size
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != (s, s):
            raise ValueError(
                f"tokenizer expects images of shape (B, 3, {s}, {s}) in [0, 1], got {tuple(images.shape)}; "
                "resize/crop the data to the tokenizer's image_size"
            )

    def features(self, images: Tensor) -> Tensor:
        """Encoder features (B, D, h, w) of images in [0, 1]."""
        self._check_images(images)
        return self.encoder.features(images)

    def adapt(self, feats: Tensor) -> Tensor:
        """Latent z (B, C, h, w) from encoder features (a Gaussian posterior's mean)."""
        out = self.adapter(feats)
        if self.config.posterior == "gaussian":
            return out[:, : self.config.latent_channels].contiguous()
        return out

    def encode(self, images: Tensor) -> Tensor:
        """Raw (unnormalised) latent z (B, C, h, w) of images in [0, 1] (B, 3, H, W).

        For a Gaussian posterior this is its mean: deterministic, so that latent caches, statistics and
        evaluation do not depend on a noise draw (LDM's latent diffusion samples the posterior instead; under
        the baselines' tiny KL weight its standard deviation is small, so the two differ little).
        """
        return self.adapt(self.features(images))

    def encode_posterior(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, logvar), each (B, C, h, w), of a Gaussian-posterior tokenizer; logvar clamped to
        LOGVAR_RANGE. Training samples z = mean + exp(logvar / 2) * eps."""
        if self.config.posterior != "gaussian":
            raise ValueError(
                "encode_posterior needs a tokenizer with posterior='gaussian'; this one is deterministic "
                "(use encode)"
            )
        return self.posterior(self.adapter(self.features(images)))

    @staticmethod
    def posterior(raw: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, logvar) of a Gaussian posterior from its adapter's output (B, 2C, h, w); logvar clamped."""
        mean, logvar = raw.chunk(2, dim=1)
        return mean.contiguous(), logvar.clamp(*LOGVAR_RANGE).contiguous()

    def decode(self, z: Tensor) -> Tensor:
        """Images (B, 3, H, W) on the [0, 1] scale, not clamped, from raw latents."""
        return (self.decoder(z) + 1.0) / 2.0

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(reconstruction on the [0, 1] scale, raw latent)."""
        z = self.encode(images)
        return self.decode(z), z

    def set_latent_stats(self, mean: Tensor, std: Tensor) -> None:
        """Store per-channel latent mean/std (shape (C,)); std must be positive."""
        C = self.config.latent_channels
        mean, std = torch.as_tensor(mean).flatten(), torch.as_tensor(std).flatten()
        if mean.shape != (C,) or std.shape != (C,):
            raise ValueError(
                f"latent stats must have shape ({C},), got mean {tuple(mean.shape)}, std {tuple(std.shape)}"
            )
        if not torch.isfinite(mean).all() or not (torch.isfinite(std).all() and (std > 0).all()):
            raise ValueError("latent stats must be finite with std > 0; recompute them on real latents")
        self.latent_mean.copy_(mean)
        self.latent_std.copy_(std)

    def normalize(self, z: Tensor) -> Tensor:
        """Per-channel standardised latent: (z - mean) / std."""
        mean, std = self.latent_mean.to(z.dtype), self.latent_std.to(z.dtype)
        return (z - mean[:, None, None]) / std[:, None, None]

    def denormalize(self, z: Tensor) -> Tensor:
        """Inverse of `normalize`."""
        mean, std = self.latent_mean.to(z.dtype), self.latent_std.to(z.dtype)
        return z * std[:, None, None] + mean[:, None, None]

    def export_config(self) -> TokenizerConfig:
        """The config an export records: `self.config` with the encoder's resolved, self-contained config
        (no weights folder, `pretrained=False`; `Encoder.resolved_config`), so that the export alone
        rebuilds this tokenizer. `self.config` itself is left as given."""
        return dataclasses.replace(self.config, encoder=self.encoder.resolved_config(self.config.encoder))

    def save_pretrained(self, directory: str | Path, extra_meta: dict[str, Any] | None = None) -> Path:
        """Write model.safetensors (all weights, latent stats included) + config.json to `directory`.

        The export is self-contained: config.json holds `export_config()`, so loading it needs neither the
        encoder's weights folder nor the offline assets.
        """
        document = {
            "kind": "tokenizer",
            "config": to_dict(self.export_config()),
            "latent_shape": list(self.latent_shape),
        }
        return save_export(directory, self, document, extra_meta)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> Tokenizer:
        """Rebuild from a `save_pretrained` directory; all weights (fine-tuned encoder too) come from it.

        The model is built with `encoder.pretrained=False` (also for exports written before exports were
        self-contained), so loading never reads an asset or a pretrained weights file; `config` is the
        export's.
        """
        state, document = load_export(directory)
        if document.get("kind") != "tokenizer":
            raise ValueError(
                f"{directory}: config.json has kind={document.get('kind')!r}, not 'tokenizer'; "
                "pass a directory written by Tokenizer.save_pretrained"
            )
        try:
            cfg = from_dict(TokenizerConfig, document["config"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"{directory}: config.json does not hold a valid tokenizer config ({e})"
            ) from None
        cfg = dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, pretrained=False))
        try:
            model = cls(cfg)
        except ValueError as e:
            raise ValueError(f"{directory}: cannot rebuild the exported tokenizer: {e}") from None
        load_state_strict(model, state, directory)
        return model.to(map_location)
