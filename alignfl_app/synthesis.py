"""Sampling labelled synthetic data from the stored generators (the server's only view of the silos)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from torch import nn

from .devices import device_of
from .models import one_hot
from .store import GeneratorDescriptor, GeneratorStore, GeneratorTerms


@torch.no_grad()
def sample_generator(
    desc: GeneratorDescriptor, decoder: nn.Module, n: int, class_ids: torch.Tensor, temperature: float = 1.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images in [0, 1] and their run-wide labels (``class_ids[k]`` for the descriptor's k-th class),
    classes balanced over the silo's classes. Unconditional generators return label -1 (usable only by a
    global VAE). Drawn on the CPU (the same draw on every device), computed where the decoder is.
    """
    g = torch.Generator().manual_seed(seed)
    k = len(desc.classes)
    local = torch.arange(n) % k
    local = local[torch.randperm(n, generator=g)]
    z = torch.randn(n, desc.architecture.latent_dim, generator=g) * temperature
    device = device_of(decoder)
    local = local.to(device)
    x = torch.sigmoid(decoder(z.to(device), one_hot(local, desc.cond_dim)))
    labels = class_ids.to(device)[local] if desc.conditional else torch.full((n,), -1, device=device)
    return x, labels


def synthesize(
    store: GeneratorStore, terms: GeneratorTerms, n_per_silo: int, temperature: float, seed: Callable[[int], int],
    device: torch.device = torch.device("cpu"),
) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """The union of ``n_per_silo`` samples from every stored generator (one decoder in memory at a time), on
    ``device``; ``seed(i)`` seeds the i-th generator's draw."""
    xs, ys, counts = [], [], {}
    for i, silo in enumerate(store.silos()):
        desc, decoder = store.load_decoder(silo)
        decoder.to(device)
        x, y = sample_generator(desc, decoder, n_per_silo, terms.class_ids(desc), temperature, seed=seed(i))
        xs.append(x)
        ys.append(y)
        counts[silo] = n_per_silo
        del decoder
    if not xs:
        raise RuntimeError("no generator stored yet: no silo has sent a valid reply")
    return torch.cat(xs), torch.cat(ys), counts
