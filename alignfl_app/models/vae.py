"""A silo's (conditional) VAEs, whose decoder is the shared generator, and the server's global classifier.

The decoder is a separate ``nn.Module`` (``vae.decoder``) so that exactly its parameters can be shipped and rebuilt
on the server from a descriptor alone. Encoders and decoders come from the architecture's family
(``models/families/``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import nn
from torch.nn import functional as F

from alignfl_app.config import IMAGE_SHAPE, ArchitectureSpec
from alignfl_app.models.families import Decoder, family_of


class VAE(nn.Module):
    """A silo's VAE. ``cond_dim`` = number of the silo's classes (0: unconditional)."""

    def __init__(self, spec: ArchitectureSpec, cond_dim: int, image_shape: tuple[int, ...] = IMAGE_SHAPE) -> None:
        super().__init__()
        family = family_of(spec.kind)
        self.encoder = family.encoder(spec, cond_dim, image_shape)
        self.decoder = family.decoder(spec, cond_dim, image_shape)

    def forward(self, x: torch.Tensor, y_onehot: torch.Tensor | None = None):
        mu, logvar = self.encoder(x, y_onehot)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.decoder(z, y_onehot), mu, logvar

    def reconstruct(self, x: torch.Tensor, y_onehot: torch.Tensor | None = None) -> torch.Tensor:
        """Decode the posterior mean: the model's own reconstruction of ``x`` (logits)."""
        mu, _ = self.encoder(x, y_onehot)
        return self.decoder(mu, y_onehot)


class PerClassDecoders(nn.Module):
    """One unconditional decoder per class; the one-hot label only picks which decoder draws the sample."""

    def __init__(
        self,
        spec: ArchitectureSpec,
        num_classes: int,
        image_shape: tuple[int, ...] = IMAGE_SHAPE,
        decoders: list[Decoder] | None = None,
        latent_components: int = 0,
    ) -> None:
        super().__init__()
        self.spec, self.cond_dim, self.image_shape = spec, num_classes, tuple(image_shape)
        self.decoders = nn.ModuleList(
            decoders
            if decoders is not None
            else [family_of(spec.kind).decoder(spec, 0, image_shape, latent_components) for _ in range(num_classes)]
        )

    def forward(self, z: torch.Tensor, y_onehot: torch.Tensor | None = None) -> torch.Tensor:
        if y_onehot is None:
            raise ValueError("per-class decoders need the class of every sample")
        labels = y_onehot.argmax(1)
        out = z.new_empty(len(z), *self.image_shape)
        for k, decoder in enumerate(self.decoders):
            chosen = labels == k
            if chosen.any():
                out[chosen] = decoder(z[chosen])
        return out


def build_decoder(
    spec: ArchitectureSpec,
    layout: str,
    num_classes: int,
    image_shape: tuple[int, ...] = IMAGE_SHAPE,
    latent_components: int = 0,
) -> nn.Module:
    """The decoder a descriptor describes (what the server rebuilds from a reply)."""
    if layout == "per-class":
        return PerClassDecoders(spec, num_classes, image_shape, latent_components=latent_components)
    return family_of(spec.kind).decoder(
        spec, num_classes if layout == "conditional" else 0, image_shape, latent_components
    )


class FoldableFit(Protocol):
    """A fit of a VAE's latent codes that the released decoder carries (``latents``)."""

    latent_components: int

    def fold_into(self, decoder: Decoder) -> Decoder: ...


LatentFitter = Callable[["VAE", torch.Tensor, torch.Tensor], FoldableFit]


class GeneratorSet(nn.Module):
    """A silo's VAEs: one (conditional or unconditional) VAE over all its classes, or one unconditional VAE per
    class. ``decoder`` is the part that leaves the silo: the same parameters, keyed as ``build_decoder`` keys them."""

    def __init__(
        self, spec: ArchitectureSpec, layout: str, num_classes: int, image_shape: tuple[int, ...] = IMAGE_SHAPE
    ) -> None:
        super().__init__()
        self.layout, self.num_classes = layout, num_classes
        if layout == "per-class":
            self.vaes = nn.ModuleList(VAE(spec, 0, image_shape) for _ in range(num_classes))
        else:
            self.vaes = nn.ModuleList([VAE(spec, num_classes if layout == "conditional" else 0, image_shape)])
        self.latent_fits: list[FoldableFit] | None = None  # not weights: the silo's state never carries them

    def fit_latents(self, groups: Sequence[tuple[torch.Tensor, torch.Tensor]], fit: LatentFitter) -> None:
        """Fit each VAE's latents on its group's records ``(x, decoder condition)``; the released decoder then
        samples the fits (``decoder``). A statistic of the records: only where such figures may leave."""
        self.latent_fits = [fit(vae, x, y) for vae, (x, y) in zip(self.vaes, groups, strict=True)]

    @property
    def latent_components(self) -> int:
        """Components of the mixture layer the released decoder carries (0: none); what its descriptor declares."""
        return self.latent_fits[0].latent_components if self.latent_fits else 0

    @property
    def decoder(self) -> nn.Module:
        """The decoder that leaves the silo: the VAEs' decoders, with the latent fits folded in when made."""
        decoders = [v.decoder for v in self.vaes]
        if self.latent_fits is not None:
            decoders = [fit.fold_into(d) for fit, d in zip(self.latent_fits, decoders, strict=True)]
        if self.layout == "per-class":
            return PerClassDecoders(decoders[0].spec, self.num_classes, decoders[0].image_shape, decoders)
        return decoders[0]

    def reconstruct(self, x: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        """Each record through its own class's VAE (posterior mean), as logits."""
        if self.layout != "per-class":
            cond = self.vaes[0].decoder.cond_dim
            return self.vaes[0].reconstruct(x, one_hot(local_labels, cond))
        out = torch.empty_like(x)
        for k, vae in enumerate(self.vaes):
            chosen = local_labels == k
            if chosen.any():
                out[chosen] = vae.reconstruct(x[chosen])
        return out


def vae_loss(
    logits: torch.Tensor,
    x: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    kl_weight: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Negative ELBO per image (Bernoulli likelihood), averaged (or per-sample with reduction='none')."""
    rec = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)
    loss = rec + kl_weight * kl
    return loss if reduction == "none" else loss.mean()


class Classifier(nn.Module):
    """The global classifier the server trains on synthetic data (a small CNN)."""

    def __init__(self, num_classes: int = 10, image_shape: tuple[int, ...] = IMAGE_SHAPE) -> None:
        super().__init__()
        c, h, w = image_shape
        self.features = nn.Sequential(
            nn.Conv2d(c, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.head = nn.Sequential(
            nn.Linear(32 * (h // 4) * (w // 4), 128), nn.ReLU(), nn.Dropout(0.2), nn.Linear(128, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class FeatureClassifier(nn.Module):
    """The global classifier of a feature-space run: the features standardised (running statistics of the data it
    learns from), then an MLP."""

    def __init__(self, in_dim: int, num_classes: int, hidden: int = 256) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(in_dim, affine=False)
        self.head = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(0.3), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x.flatten(1)))


def one_hot(labels_local: torch.Tensor, cond_dim: int) -> torch.Tensor | None:
    return F.one_hot(labels_local, cond_dim).to(torch.float32) if cond_dim else None


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
