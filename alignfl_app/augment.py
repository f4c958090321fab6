"""Random transforms of the server's synthetic images (``server-augment``): free of privacy cost, since they
act on decoder samples, never on a silo's records.

Our own batched versions rather than torchvision's: torchvision draws one set of parameters per call, so a
different transform per image would cost one call per image; here each image gets its own draw in one
``affine_grid`` / ``grid_sample`` (affine) or one gather (crop).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.nn import functional as F


def random_affine(x: torch.Tensor, g: torch.Generator, degrees: float = 10.0, translate: float = 0.1,
                  scale: float = 0.1) -> torch.Tensor:
    """Each image rotated by up to ``degrees``, shifted by up to ``translate`` of its side and scaled by up to
    ``1 +- scale``, with zeros (background) where the transform reaches outside the image."""
    n = len(x)
    angle = (torch.rand(n, generator=g) * 2 - 1).to(x.device) * math.radians(degrees)
    factor = 1 + (torch.rand(n, generator=g) * 2 - 1).to(x.device) * scale
    shift = (torch.rand(n, 2, generator=g) * 2 - 1).to(x.device) * 2 * translate  # grid coordinates span [-1, 1]
    cos, sin = torch.cos(angle) / factor, torch.sin(angle) / factor
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def random_crop(x: torch.Tensor, g: torch.Generator, padding: int = 2) -> torch.Tensor:
    """Each image zero-padded by ``padding`` and cropped back to its size at a random offset."""
    n, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=g).to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=g).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None, :])[:, None, :, None].expand(
        n, x.shape[1], h, padded.shape[3])
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None, :])[:, None, None, :].expand(n, x.shape[1], h, w)
    return out.gather(3, cols)


TRANSFORMS = {"affine": random_affine, "crop": random_crop}


class SyntheticAugmentation:
    """The configured transforms, applied in order to a whole synthetic set (seeded per server epoch)."""

    def __init__(self, names: Sequence[str]) -> None:
        self.transforms = [TRANSFORMS[name] for name in names]

    def __call__(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        if not self.transforms:
            return x
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for transform in self.transforms:
                x = transform(x, g)
        return x.clamp_(0.0, 1.0)
