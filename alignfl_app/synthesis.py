"""Sampling labelled synthetic data from the stored generators (the server's only view of the silos)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .config import ServerSection
from .devices import device_of
from .models import one_hot
from .store import GeneratorDescriptor, GeneratorStore, GeneratorTerms


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
    desc: GeneratorDescriptor, decoder: nn.Module, n: int, class_ids: torch.Tensor,
    style: SamplingStyle = SamplingStyle(), seed: int = 0, per_class: Sequence[int] | None = None, chunk: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images in [0, 1] and their run-wide labels (``class_ids[k]`` for the descriptor's k-th class),
    classes balanced over the silo's classes, or ``per_class[k]`` of class k (then ``n`` is their sum).
    Unconditional generators return label -1 (usable only by a global VAE). Drawn on the CPU (the same draw on
    every device), computed where the decoder is, ``chunk`` samples per forward pass (bounded memory).
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
    z = torch.randn(n, desc.architecture.latent_dim, generator=g) * style.temperature
    device = device_of(decoder)
    local = local.to(device)
    cond = one_hot(local, desc.cond_dim)
    x = torch.empty(n, *desc.image_shape, device=device)
    for start in range(0, n, max(chunk, 1)):
        part = slice(start, start + chunk)
        logits = decoder(z[part].to(device), None if cond is None else cond[part])
        if not torch.isfinite(logits).all():  # checked before the sigmoid, which would hide an Inf as 0 or 1
            raise GeneratorFailed(f"silo '{desc.silo}': its decoder drew non-finite samples")
        x[part] = torch.sigmoid(logits * style.sharpness)
    labels = class_ids.to(device)[local] if desc.conditional else torch.full((n,), -1, device=device)
    return x, labels


@dataclass(frozen=True)
class SyntheticBudget:
    """How many samples each stored generator draws in a server epoch: ``per_silo`` from every one, or (``total``
    > 0) a fixed total split evenly over the classes the generators hold, then over the silos holding each class,
    so that a class held by two silos is not drawn twice as often and server time does not grow with the silos."""

    per_silo: int
    total: int = 0

    def allocation(self, descriptors: dict[str, GeneratorDescriptor],
                   terms: GeneratorTerms) -> dict[str, list[int] | None]:
        """silo -> samples per class of its descriptor, in the descriptor's order (None: ``per_silo``, balanced)."""
        if not self.total:
            return {silo: None for silo in descriptors}
        silos = list(descriptors)
        if not all(d.conditional for d in descriptors.values()):  # unlabelled samples: split over the silos only
            return {s: [share] for s, share in zip(silos, even_split(self.total, len(silos)), strict=True)}
        ids = {silo: terms.class_ids(desc).tolist() for silo, desc in descriptors.items()}
        holders: dict[int, list[str]] = {}
        for silo, classes in ids.items():
            for c in classes:
                holders.setdefault(c, []).append(silo)
        counts = {silo: [0] * len(classes) for silo, classes in ids.items()}
        for c, share in zip(sorted(holders), even_split(self.total, len(holders)), strict=True):
            for silo, part in zip(holders[c], even_split(share, len(holders[c])), strict=True):
                counts[silo][ids[silo].index(c)] += part
        return counts


def even_split(n: int, parts: int) -> list[int]:
    """``n`` split into ``parts`` counts that differ by at most one (the first ones get the remainder)."""
    return [n // parts + (i < n % parts) for i in range(parts)]


@dataclass
class SyntheticSet:
    """One server epoch's samples, how many each silo's generator drew, and the generators that failed."""

    x: torch.Tensor
    y: torch.Tensor
    counts: dict[str, int]
    failed: dict[str, str]


def synthesize(
    store: GeneratorStore, terms: GeneratorTerms, budget: SyntheticBudget, style: SamplingStyle,
    seed: Callable[[int], int], device: torch.device = torch.device("cpu"), exclude: frozenset[str] = frozenset(),
) -> SyntheticSet:
    """The union of every stored generator's samples under ``budget`` (one decoder in memory at a time), on
    ``device``; ``seed(i)`` seeds the i-th generator's draw. A generator that fails is left out (``failed``
    says why) and never stops the others; ``exclude``: silos not to draw from (they failed earlier)."""
    xs, ys, counts, failed = [], [], {}, {}
    silos = [s for s in store.silos() if s not in exclude]
    allocation = budget.allocation({silo: store.descriptor(silo) for silo in silos}, terms)
    for i, silo in enumerate(store.silos()):
        if silo in exclude:
            continue
        per_class = allocation[silo]
        n = budget.per_silo if per_class is None else sum(per_class)
        if n == 0:
            continue
        try:
            desc, decoder = store.load_decoder(silo)
            decoder.to(device)
            x, y = sample_generator(desc, decoder, n, terms.class_ids(desc), style, seed=seed(i),
                                    per_class=per_class if desc.conditional else None,
                                    chunk=terms.sampling_chunk(desc))
        except Exception as exc:  # one generator never stops the round: it is left out and reported
            failed[silo] = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            continue
        xs.append(x)
        ys.append(y)
        counts[silo] = n
        del decoder
    if not xs:
        x, y = torch.empty(0, *terms.image_shape, device=device), torch.empty(0, dtype=torch.long, device=device)
        return SyntheticSet(x, y, counts, failed)
    return SyntheticSet(torch.cat(xs), torch.cat(ys), counts, failed)
