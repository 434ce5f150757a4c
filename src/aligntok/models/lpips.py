"""VGG16 / AlexNet feature trunks and the LPIPS v0.1 perceptual distance (Zhang et al., CVPR 2018).

Architecture and weight loading only; the weights come from the offline assets `lpips-vgg16` and
`lpips-alexnet` (see `aligntok.assets`), whose safetensors keys match these modules' state dicts:
`trunk.features.<i>.weight|bias` at torchvision's `features` indices and `heads.<k>.weight` (1x1, no bias).

Input convention of the trunks: LPIPS-normalised images, i.e. `lpips_normalize(x)` of x in [0, 1]. LPIPS
maps x to [-1, 1] and applies `(x - LPIPS_SHIFT) / LPIPS_SCALE`; in [0, 1] space this is exactly
`(x - VGG_MEAN) / VGG_STD`, the ImageNet statistics the trunks were trained with.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

# LPIPS input scaling, applied to images in [-1, 1] (LPIPS v0.1 `ScalingLayer`).
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
# The same normalisation for images in [0, 1]: (x - mean) / std. These are the ImageNet mean/std.
VGG_MEAN = tuple((1.0 + s) / 2.0 for s in LPIPS_SHIFT)
VGG_STD = tuple(s / 2.0 for s in LPIPS_SCALE)

_ASSET = {"vgg": "lpips-vgg16", "alex": "lpips-alexnet"}


def lpips_normalize(x: Tensor) -> Tensor:
    """Images (B, 3, H, W) in [0, 1] -> the input the trunks expect (LPIPS shift/scale of [-1, 1] images)."""
    shift = x.new_tensor(LPIPS_SHIFT).view(1, 3, 1, 1)
    scale = x.new_tensor(LPIPS_SCALE).view(1, 3, 1, 1)
    return (x * 2 - 1 - shift) / scale


def _run_taps(features: nn.Sequential, taps: tuple[int, ...], x: Tensor, stages: int) -> list[Tensor]:
    if not 1 <= stages <= len(taps):
        raise ValueError(f"stages must be in 1..{len(taps)}, got {stages}")
    out = []
    for i, layer in enumerate(features[: taps[stages - 1] + 1]):
        x = layer(x)
        if i in taps:
            out.append(x)
    return out


class VGG16Features(nn.Module):
    """The 13 convs of VGG16 (torchvision `features` indices 0..29), tapped after relu1_2 ... relu5_3.

    Strides of the taps: 1, 2, 4, 8, 16; channels 64, 128, 256, 512, 512. Expects `lpips_normalize`d input.
    """

    TAPS = (3, 8, 15, 22, 29)
    CHANNELS = (64, 128, 256, 512, 512)

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c_out in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512):
            if c_out == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True)]
                c_in = c_out
        self.features = nn.Sequential(*layers)

    def forward(self, x: Tensor, stages: int = 5) -> list[Tensor]:
        """The first `stages` taps for x (B, 3, H, W); computation stops after the last one asked for."""
        return _run_taps(self.features, self.TAPS, x, stages)


class AlexNetFeatures(nn.Module):
    """The 5 convs of AlexNet (torchvision `features` indices 0..11), tapped after relu1 ... relu5."""

    TAPS = (1, 4, 7, 9, 11)
    CHANNELS = (64, 192, 384, 256, 256)

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, stride=4, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor, stages: int = 5) -> list[Tensor]:
        """The first `stages` taps for x (B, 3, H, W)."""
        return _run_taps(self.features, self.TAPS, x, stages)


def _unit_normalize(f: Tensor, eps: float = 1e-10) -> Tensor:
    # LPIPS eq. (1): features scaled to unit length along the channel axis, eps as in the reference.
    return f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """LPIPS v0.1 distance: d(x, y) = sum_l mean_hw w_l . (f_l(x) / |f_l(x)| - f_l(y) / |f_l(y)|)^2.

    Build with `LPIPS.from_assets("vgg"|"alex")` for the pretrained, frozen network; the bare constructor
    gives random weights (architecture only).
    """

    def __init__(self, net: Literal["vgg", "alex"] = "vgg") -> None:
        super().__init__()
        if net not in _ASSET:
            raise ValueError(f"LPIPS net must be 'vgg' or 'alex', got {net!r}")
        self.net = net
        self.trunk = VGG16Features() if net == "vgg" else AlexNetFeatures()
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in self.trunk.CHANNELS)

    @classmethod
    def from_assets(cls, net: Literal["vgg", "alex"] = "vgg") -> LPIPS:
        """Pretrained LPIPS from the `lpips-vgg16` / `lpips-alexnet` asset: eval mode, parameters frozen.

        Gradients still flow to the inputs, so it serves as a training loss.
        """
        from safetensors.torch import load_file

        from aligntok import assets

        model = cls(net)
        state = load_file(assets.require(_ASSET[net]) / "model.safetensors")
        model.load_state_dict(state, strict=True)
        return model.requires_grad_(False).eval()

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Distances (B,) between images x and y, each (B, 3, H, W) in [0, 1]."""
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(
                f"LPIPS needs two (B, 3, H, W) batches of equal shape, got {x.shape} and {y.shape}"
            )
        # Two separate passes (not one concatenated batch) so that d(x, x) is exactly 0.
        fx = self.trunk(lpips_normalize(x))
        fy = self.trunk(lpips_normalize(y))
        dist = x.new_zeros(x.shape[0])
        for head, a, b in zip(self.heads, fx, fy):
            diff = (_unit_normalize(a) - _unit_normalize(b)).pow(2)  # (B, C_l, H_l, W_l)
            dist = dist + head(diff).mean(dim=(1, 2, 3))
        return dist


def load_vgg16_trunk() -> VGG16Features:
    """VGG16 convs with their ImageNet weights (from the `lpips-vgg16` asset); trainable, train mode.

    Input: `lpips_normalize(x)` of images in [0, 1] (equivalently `(x - VGG_MEAN) / VGG_STD`).
    """
    from safetensors.torch import load_file

    from aligntok import assets

    state = load_file(assets.require("lpips-vgg16") / "model.safetensors")
    trunk = VGG16Features()
    prefix = "trunk."
    trunk.load_state_dict(
        {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, strict=True
    )
    return trunk


__all__ = [
    "LPIPS",
    "LPIPS_SCALE",
    "LPIPS_SHIFT",
    "VGG_MEAN",
    "VGG_STD",
    "AlexNetFeatures",
    "VGG16Features",
    "load_vgg16_trunk",
    "lpips_normalize",
]
