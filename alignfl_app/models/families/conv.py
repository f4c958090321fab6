"""The ``conv`` family: convolutional VAEs (stride-2 stages of ``hidden`` channels; ``refine`` stride-1 layers at
each decoder resolution below the image's own)."""

from __future__ import annotations

import math

from torch import nn
from torch.nn import functional as F

from alignfl_app.config import ArchitectureSpec, ConfigError
from alignfl_app.models.families.base import Decoder, Encoder, GeneratorFamily


class ConvDecoder(Decoder):
    def __init__(self, spec: ArchitectureSpec, cond_dim: int, image_shape: tuple[int, ...], latent_components: int = 0):
        super().__init__(spec, cond_dim, image_shape, latent_components)
        c, h, w = self.image_shape
        chans = list(reversed(spec.hidden))
        down = 2 ** len(chans)
        if h % down or w % down:
            raise ValueError(f"conv architecture '{spec.name}' needs image sides divisible by {down}")
        self.base = (chans[0], h // down, w // down)
        self.fc = nn.Linear(spec.latent_dim + cond_dim, math.prod(self.base))
        layers: list[nn.Module] = []
        for cin, cout in zip(chans, chans[1:] + [c], strict=True):
            for _ in range(spec.refine):  # transposed at stride 1 (a plain conv): the Lipschitz bounds cover it
                layers += [nn.ConvTranspose2d(cin, cin, 3, 1, 1), nn.ReLU()]
            layers.append(nn.ConvTranspose2d(cin, cout, 4, 2, 1))
            layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers[:-1])

    @property
    def input_layer(self) -> nn.Linear:
        return self.fc

    def decode(self, zin):
        return self.net(F.relu(self.fc(zin)).view(-1, *self.base))

    @staticmethod
    def network_activations(spec: ArchitectureSpec, in_dim: int, image_shape: tuple[int, ...]) -> int:
        _, h, w = image_shape
        chans = list(reversed(spec.hidden))
        down = 2 ** len(chans)
        side_h, side_w = max(h // down, 1), max(w // down, 1)
        total = 2 * chans[0] * side_h * side_w * (1 + spec.refine)
        for cout in chans[1:]:
            side_h, side_w = side_h * 2, side_w * 2
            total += 2 * cout * side_h * side_w * (1 + spec.refine)
        return total

    @staticmethod
    def network_workspace(spec: ArchitectureSpec, in_dim: int, image_shape: tuple[int, ...]) -> tuple[int, int]:
        """A transposed convolution on the CPU (oneDNN) holds a reordered copy of its input, its output in a blocked
        layout and that output's plain copy beside the one returned, and a reordered copy of its weight; the input
        layer's matrix product may pack a copy of its weight (BLAS)."""
        c, h, w = image_shape
        chans = list(reversed(spec.hidden))
        down = 2 ** len(chans)
        pixels = max(h // down, 1) * max(w // down, 1)
        per_sample, per_pass = 0, in_dim * chans[0] * pixels
        for cin, cout in zip(chans, chans[1:] + [c], strict=True):
            if spec.refine:  # stride 1, 3x3: as many values out as in
                per_sample, per_pass = max(per_sample, 3 * cin * pixels), max(per_pass, cin * cin * 9)
            per_sample = max(per_sample, cin * pixels + 2 * cout * 4 * pixels)  # stride 2, 4x4: four times the pixels
            per_pass = max(per_pass, cin * cout * 16)
            pixels *= 4
        return per_sample, per_pass


class ConvEncoder(Encoder):
    def build(self, spec: ArchitectureSpec, cond_dim: int, image_shape: tuple[int, ...]) -> int:
        c, h, w = image_shape
        layers: list[nn.Module] = []
        cin = c
        for cout in spec.hidden:
            layers += [nn.Conv2d(cin, cout, 4, 2, 1), nn.ReLU()]
            cin = cout
        layers.append(nn.Flatten())
        self.features = nn.Sequential(*layers)
        down = 2 ** len(spec.hidden)
        feat = spec.hidden[-1] * (h // down) * (w // down)
        self.body = nn.Sequential(nn.Linear(feat + cond_dim, 256), nn.ReLU())
        return 256


class ConvFamily(GeneratorFamily):
    def check_spec(self, spec: ArchitectureSpec) -> None:
        """``refine`` is this family's own field."""
        self.check_vae_spec(spec)

    def check_fits(self, spec: ArchitectureSpec, image_shape: tuple[int, int, int]) -> None:
        """Each stride-2 stage halves the sides."""
        _, h, w = image_shape
        down = 2 ** len(spec.hidden)
        if h % down or w % down:
            raise ConfigError(
                f"architecture '{spec.name}' ({len(spec.hidden)} stride-2 stages) needs image sides "
                f"divisible by {down}, but image-size is {h}x{w}: choose an image-size like "
                f"'{-(-h // down) * down}x{-(-w // down) * down}' or another architecture"
            )


FAMILY = ConvFamily("conv", ConvDecoder, ConvEncoder)
