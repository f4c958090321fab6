"""The ``mlp`` family: fully connected VAEs (hidden widths in encoder order, mirrored by the decoder)."""

from __future__ import annotations

import math

from torch import nn

from alignfl_app.config import ArchitectureSpec
from alignfl_app.models.families.base import Decoder, Encoder, GeneratorFamily


class MLPDecoder(Decoder):
    def __init__(self, spec: ArchitectureSpec, cond_dim: int, image_shape: tuple[int, ...], latent_components: int = 0):
        super().__init__(spec, cond_dim, image_shape, latent_components)
        c, h, w = self.image_shape
        in_dim = spec.latent_dim + cond_dim
        layers: list[nn.Module] = []
        for width in reversed(spec.hidden):
            layers += [nn.Linear(in_dim, width), nn.ReLU()]
            in_dim = width
        layers.append(nn.Linear(in_dim, c * h * w))
        self.net = nn.Sequential(*layers)

    @property
    def input_layer(self) -> nn.Linear:
        return self.net[0]

    def decode(self, zin):
        return self.net(zin).view(-1, *self.image_shape)

    @staticmethod
    def network_activations(spec: ArchitectureSpec, in_dim: int, image_shape: tuple[int, ...]) -> int:
        return 2 * sum(spec.hidden)  # each hidden layer: linear output + its activation

    @staticmethod
    def network_workspace(spec: ArchitectureSpec, in_dim: int, image_shape: tuple[int, ...]) -> tuple[int, int]:
        """A linear layer's matrix product may pack a copy of its weight (BLAS), whatever the number of samples."""
        widths = [in_dim, *reversed(spec.hidden), math.prod(image_shape)]
        return 0, max(a * b for a, b in zip(widths, widths[1:], strict=False))


class MLPEncoder(Encoder):
    def build(self, spec: ArchitectureSpec, cond_dim: int, image_shape: tuple[int, ...]) -> int:
        c, h, w = image_shape
        self.features = nn.Flatten()
        in_dim = c * h * w + cond_dim
        body: list[nn.Module] = []
        for width in spec.hidden:
            body += [nn.Linear(in_dim, width), nn.ReLU()]
            in_dim = width
        self.body = nn.Sequential(*body)
        return in_dim


FAMILY = GeneratorFamily("mlp", MLPDecoder, MLPEncoder)
