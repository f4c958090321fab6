"""How a decoder is sampled: the server draws its synthetic data so, and a silo judging its own decoder draws
as the server will."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from alignfl_app.config import ServerSection
from alignfl_app.contract.descriptor import GeneratorDescriptor
from alignfl_app.devices import device_of
from alignfl_app.models.vae import one_hot


class GeneratorFailed(RuntimeError):
    """A stored generator whose samples cannot be used (non-finite, or its decoder raised); one line."""


@dataclass(frozen=True)
class SamplingStyle:
    """How the server turns a decoder into images: latents from N(0, ``temperature``^2 I), pixels
    ``sigmoid(sharpness * logits)`` (1: the decoder's mean image; larger: each pixel nearer its likelier value,
    as a classifier will see real images)."""

    temperature: float = 1.0
    sharpness: float = 1.0

    @classmethod
    def of(cls, server: ServerSection) -> SamplingStyle:
        """The run's style (``sample-temperature``, ``sample-sharpness``): the server draws in it, and a silo
        judging its own decoder draws as the server will."""
        return cls(server.sample_temperature, server.sample_sharpness)


@torch.no_grad()
def sample_generator(
    desc: GeneratorDescriptor,
    decoder: nn.Module,
    n: int,
    class_ids: torch.Tensor,
    style: SamplingStyle = SamplingStyle(),
    seed: int = 0,
    per_class: Sequence[int] | None = None,
    chunk: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples (images in [0, 1], or points of the feature space for a feature family) and their run-wide
    labels (``class_ids[k]`` for the descriptor's k-th class), classes balanced over the silo's classes, or
    ``per_class[k]`` of class k (then ``n`` is their sum). Unconditional generators return label -1 (usable only
    by a global VAE). Drawn on the CPU (the same draw on every device), computed where the decoder is, ``chunk``
    samples per forward pass (bounded memory).
    GeneratorFailed if any sample is not finite.
    """
    g = torch.Generator().manual_seed(seed)
    k = len(desc.classes)
    if per_class is None:
        local = torch.arange(n) % k
    else:
        local = torch.repeat_interleave(torch.arange(k), torch.tensor(list(per_class), dtype=torch.long))
        n = len(local)
    local = local[torch.randperm(n, generator=g)]
    z = torch.randn(n, desc.latent_dim, generator=g) * style.temperature
    device = device_of(decoder)
    local = local.to(device)
    cond = one_hot(local, desc.cond_dim)
    x = torch.empty(n, *desc.output_shape, device=device)
    pixels = desc.family.output == "pixels"
    for start in range(0, n, max(chunk, 1)):
        part = slice(start, start + chunk)
        logits = decoder(z[part].to(device), None if cond is None else cond[part])
        if not torch.isfinite(logits).all():  # checked before the sigmoid, which would hide an Inf as 0 or 1
            raise GeneratorFailed(f"silo '{desc.silo}': its decoder drew non-finite samples")
        x[part] = torch.sigmoid(logits * style.sharpness) if pixels else logits
    labels = class_ids.to(device)[local] if desc.conditional else torch.full((n,), -1, device=device)
    return x, labels
