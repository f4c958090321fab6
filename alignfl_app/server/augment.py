"""Random transforms of the server's synthetic images (``server-augment``): free of privacy cost, since they
act on decoder samples, never on a silo's records.

Geometric moves (affine, crop) teach invariances the classes have. Blur and noise hide what tells one silo's
decoder from another's (its own smoothness and pixel statistics): every class then comes in every style, and the
classifier must tell classes apart by shape, as it must on real images.

Our own batched versions rather than torchvision's: torchvision draws one set of parameters per call, so a
different transform per image would cost one call per image; here each image gets its own draw in one
``affine_grid`` / ``grid_sample`` (affine), one gather (crop) or one grouped convolution (blur).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.nn import functional as F


def random_affine(
    x: torch.Tensor, g: torch.Generator, degrees: float = 10.0, translate: float = 0.1, scale: float = 0.1
) -> torch.Tensor:
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
        n, x.shape[1], h, padded.shape[3]
    )
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None, :])[:, None, None, :].expand(n, x.shape[1], h, w)
    return out.gather(3, cols)


def random_blur(x: torch.Tensor, g: torch.Generator, max_sigma: float = 1.0, radius: int = 2) -> torch.Tensor:
    """Each image blurred by a Gaussian of its own width, drawn uniformly from (0, ``max_sigma``] pixels (a
    separable ``2 * radius + 1`` kernel; the border is extended, not darkened)."""
    n, c, h, w = x.shape
    sigma = (1 - torch.rand(n, generator=g)).to(x.device) * max_sigma
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (taps[None, :] / sigma[:, None].to(x.dtype)) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # one kernel per image and channel
    planes = x.reshape(1, n * c, h, w)
    planes = F.conv2d(F.pad(planes, (radius, radius, 0, 0), mode="replicate"), kernel[:, None, None, :], groups=n * c)
    planes = F.conv2d(F.pad(planes, (0, 0, radius, radius), mode="replicate"), kernel[:, None, :, None], groups=n * c)
    return planes.reshape(n, c, h, w)


def random_noise(x: torch.Tensor, g: torch.Generator, std: float = 0.2) -> torch.Tensor:
    """Independent Gaussian noise of standard deviation ``std`` on every pixel (``SyntheticAugmentation`` clamps
    the set to [0, 1] after its last transform)."""
    return x + torch.randn(x.shape, generator=g).to(x.device) * std


TRANSFORMS = {"affine": random_affine, "crop": random_crop, "blur": random_blur, "noise": random_noise}


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
