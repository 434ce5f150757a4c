"""What each part of a CPU tokenizer step costs (docs/training.md, "What a CPU step costs").

    python benchmarks/tokenizer_step_cost.py

Times one forward (+ backward where it trains) of each part of the `emoji` preset's step at batch 16,
64 px, in fp32 and bf16 autocast: the mean of two calls after a warm-up call. Prints a markdown table.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from aligntok.losses import PerceptualLoss
from aligntok.models.decoder import Decoder, DecoderConfig
from aligntok.models.discriminator import DiscriminatorConfig, PatchDiscriminator
from aligntok.models.tokenizer import Tokenizer
from aligntok.recipes.tokenizer import tokenizer_preset


def seconds(fn: Callable[[], None], calls: int = 2) -> float:
    fn()
    start = time.time()
    for _ in range(calls):
        fn()
    return (time.time() - start) / calls


def time_parts(
    tok: Tokenizer, parts: dict, lpips: dict, disc: torch.nn.Module, bf16: bool
) -> dict[str, float]:
    x = torch.rand(16, 3, 64, 64)

    def amp() -> torch.autocast:
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    def encoder() -> None:
        with amp(), torch.no_grad():
            tok.features(x)

    def run_decoder(net: torch.nn.Module) -> None:
        with amp():
            y = net(torch.randn(16, 16, 8, 8))
        y.float().mean().backward()

    def run_loss(loss: torch.nn.Module) -> None:
        y = x.clone().requires_grad_(True)
        with amp():
            value = loss(y, x)
        value.float().backward()

    def run_disc() -> None:
        y = x.clone().requires_grad_(True)
        with amp():
            value = disc(y).float().mean()
        value.backward()

    timed = {"EfficientNet-Lite0 to block 10 at 128 px (forward)": seconds(encoder)}
    timed |= {name: seconds(lambda n=net: run_decoder(n)) for name, net in parts.items()}
    timed |= {name: seconds(lambda n=net: run_loss(n)) for name, net in lpips.items()}
    timed["PatchGAN discriminator"] = seconds(run_disc)
    return timed


def main() -> None:
    torch.manual_seed(0)
    tok = Tokenizer(tokenizer_preset("emoji"))
    wide = DecoderConfig(ch=32, ch_mult=(1, 2, 4, 8), num_res_blocks=1, attn_resolutions=(8,))
    parts = {
        "decoder, 2 blocks per level": Decoder(wide, 8, latent_channels=16),
        "decoder, 1 block per level (emoji)": tok.decoder,
    }
    lpips = {"LPIPS VGG16": PerceptualLoss(net="vgg"), "LPIPS AlexNet": PerceptualLoss(net="alex")}
    disc = PatchDiscriminator(DiscriminatorConfig())
    fp32, bf16 = (time_parts(tok, parts, lpips, disc, flag) for flag in (False, True))
    print("| part | fp32 (s) | bf16 (s) |\n|---|---|---|")
    for name in fp32:
        print(f"| {name} | {fp32[name]:.2f} | {bf16[name]:.2f} |")


if __name__ == "__main__":
    main()
