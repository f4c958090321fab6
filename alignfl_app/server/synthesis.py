"""Sampling labelled synthetic data from the stored generators (the server's only view of the silos)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from alignfl_app.contract.descriptor import GeneratorDescriptor
from alignfl_app.contract.sampling import SamplingStyle, sample_generator
from alignfl_app.server.store import GeneratorStore, GeneratorTerms


@dataclass(frozen=True)
class SyntheticBudget:
    """How many samples each stored generator draws in a server epoch: ``per_silo`` from every one, or (``total``
    > 0) a fixed total split evenly over the classes the generators hold, then over the silos holding each class,
    so that a class held by two silos is not drawn twice as often and server time does not grow with the silos."""

    per_silo: int
    total: int = 0

    def allocation(
        self, descriptors: dict[str, GeneratorDescriptor], terms: GeneratorTerms
    ) -> dict[str, list[int] | None]:
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
    store: GeneratorStore,
    terms: GeneratorTerms,
    budget: SyntheticBudget,
    style: SamplingStyle,
    seed: Callable[[int], int],
    device: torch.device = torch.device("cpu"),
    exclude: frozenset[str] = frozenset(),
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> SyntheticSet:
    """The union of every stored generator's samples under ``budget`` (one decoder in memory at a time), on
    ``device``; ``seed(i)`` seeds the i-th generator's draw. A generator that fails is left out (``failed``
    says why) and never stops the others; ``exclude``: silos not to draw from (they failed earlier). ``encode``
    (a feature-space run): pixel generators' images go through it, so every sample is a point of the run's
    feature space."""
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
            x, y = sample_generator(
                desc,
                decoder,
                n,
                terms.class_ids(desc),
                style,
                seed=seed(i),
                per_class=per_class if desc.conditional else None,
                chunk=terms.sampling_chunk(desc),
            )
            if encode is not None and desc.family.output == "pixels":
                x = encode(x)
        except Exception as exc:  # one generator never stops the round: it is left out and reported
            failed[silo] = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            continue
        xs.append(x)
        ys.append(y)
        counts[silo] = n
        del decoder
    if not xs:
        shape = terms.features.out_shape(terms.image_shape)
        x, y = torch.empty(0, *shape, device=device), torch.empty(0, dtype=torch.long, device=device)
        return SyntheticSet(x, y, counts, failed)
    return SyntheticSet(torch.cat(xs), torch.cat(ys), counts, failed)
