"""The space the global classifier reads: pixels, or a fixed, data-free feature transform of the images.

``scattering``: the wavelet scattering transform (Bruna and Mallat 2013; Kymatio's torch implementation), log
magnitudes, averaged over ``scattering-pool`` x ``scattering-pool`` cells. It needs no data and no training, so
silo and server compute exactly the same features: a silo may share a generator *of features* (the ``gaussian``
family), the server draws pixel generators' samples through the same transform, and the global model reads the
features of real test images. Nothing about it is learnt, so it costs no privacy.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

LOG_FLOOR = 1e-4  # log(|S| + floor): scattering magnitudes of flat regions are ~0
ENCODE_CHUNK = 512  # images per transform call (bounded memory)


class FeatureSpec(BaseModel):
    """A feature space as the run config, a descriptor and a saved model name it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    space: Literal["pixels", "scattering"] = "pixels"
    scales: int = Field(default=3, ge=1, le=6)
    """J: the scattering's octaves (its wavelets reach 2^J pixels; the output is 2^J times coarser)."""
    angles: int = Field(default=8, ge=2, le=16)
    """L: wavelet orientations per scale."""
    pool: int = Field(default=1, ge=1, le=4)
    """The output is averaged over pool x pool cells (1: over the whole image)."""

    @property
    def is_pixels(self) -> bool:
        return self.space == "pixels"

    def channels_per_image_channel(self) -> int:
        """Zeroth, first and second order coefficients: 1 + J L + L^2 J (J - 1) / 2."""
        j, l_ = self.scales, self.angles
        return 1 + j * l_ + l_ * l_ * j * (j - 1) // 2

    def out_shape(self, image_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of one image's features (pixels: the image's own)."""
        if self.is_pixels:
            return tuple(image_shape)
        return (image_shape[0] * self.channels_per_image_channel() * self.pool * self.pool,)

    def check_fits(self, image_shape: tuple[int, int, int]) -> None:
        """ValueError unless the scattering's coarsest scale fits the image (its sides >= 2^J)."""
        if not self.is_pixels and min(image_shape[1:]) < 2**self.scales * self.pool:
            raise ValueError(
                f"scattering-scales={self.scales} with scattering-pool={self.pool} needs image sides of at least "
                f"{2**self.scales * self.pool}: lower them or raise image-size"
            )


class FeatureSpace(nn.Module):
    """The transform itself: images [N, C, H, W] in [0, 1] -> features [N, D] (pixels: unchanged)."""

    def __init__(self, spec: FeatureSpec, image_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.spec, self.image_shape = spec, tuple(image_shape)
        self.out_shape = spec.out_shape(self.image_shape)
        self.scattering = None if spec.is_pixels else _scattering(spec.scales, spec.angles, self.image_shape[1:])

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.scattering is None:
            return images
        parts = []
        for start in range(0, len(images), ENCODE_CHUNK):
            s = self.scattering(images[start : start + ENCODE_CHUNK].float())  # [n, C, K, h, w]
            s = torch.log(s.abs() + LOG_FLOOR).flatten(1, 2)
            parts.append(nn.functional.adaptive_avg_pool2d(s, self.spec.pool).flatten(1))
        return torch.cat(parts) if parts else images.new_empty(0, math.prod(self.out_shape))


@lru_cache(maxsize=8)
def _scattering(scales: int, angles: int, size: tuple[int, int]) -> nn.Module:
    """Kymatio's 2D scattering (its filters are built once per shape). Imported from its 2D module: Kymatio
    0.3.0's package-level ``kymatio.torch`` also loads its 3D transform, which needs a SciPy function SciPy 1.15
    removed."""
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    return ScatteringTorch2D(J=scales, shape=tuple(size), L=angles)
