"""Models: per-silo (conditional) VAEs whose decoder is the shared generator, and the global models.

The decoder is a separate ``nn.Module`` (``vae.decoder``) so that exactly its parameters can be
shipped and rebuilt on the server from a descriptor alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import nn
from torch.nn import functional as F

from alignfl_app.config import IMAGE_SHAPE, ArchitectureSpec


class LatentMixture(nn.Module):
    """A Gaussian mixture over the latent space per decoder condition, driven by the same N(0, I) latents as the
    decoder: the first coordinate's normal CDF picks the component by its weight and, rescaled within that
    component's share, becomes a fresh standard normal, so ``z ~ N(0, I)`` maps exactly to a draw of the mixture
    and the server's sampler stays as it is. The pick is computed on the CPU in float64 (the same draw on every
    device, exact for small weights). A temperature other than 1 also skews which components are picked."""

    def __init__(self, rows: int, components: int, latent_dim: int) -> None:
        super().__init__()
        self.register_buffer("log_weights", torch.zeros(rows, components))
        self.register_buffer("means", torch.zeros(rows, components, latent_dim))
        self.register_buffer("scale_tril", torch.eye(latent_dim).expand(rows, components, -1, -1).clone())

    @staticmethod
    def values_per_sample(components: int, latent_dim: int) -> int:
        """What one sample's pass holds: weights and their running sum in float64, the pick, the fresh normal
        coordinate, the standard-normal latent and the output."""
        return 4 * components + 4 + 2 * latent_dim

    def forward(self, z: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        components = self.log_weights.shape[1]
        rows_cpu = rows.cpu()
        weights = self.log_weights.detach().cpu().double().softmax(1)[rows_cpu]
        upper = weights.cumsum(1)
        u = torch.special.ndtr(z[:, 0].detach().cpu().double())
        pick = (u[:, None] >= upper).sum(1).clamp(max=components - 1)
        share = weights.gather(1, pick[:, None]).squeeze(1)
        lower = upper.gather(1, pick[:, None]).squeeze(1) - share
        within = ((u - lower) / share.clamp_min(1e-300)).clamp(1e-15, 1 - 1e-15)
        first = torch.special.ndtri(within).to(z)
        eps = torch.cat([first[:, None], z[:, 1:]], 1)
        key = (rows_cpu * components + pick).to(z.device)
        out = torch.empty_like(z)
        for k in key.unique().tolist():
            chosen = key == k
            row, comp = divmod(k, components)
            out[chosen] = self.means[row, comp] + eps[chosen] @ self.scale_tril[row, comp].tril().T
        return out


class Decoder(nn.Module):
    """p(x | z, y): latent (+ one-hot label over the silo's own classes) -> image logits; with
    ``latent_components`` > 0, a ``LatentMixture`` first maps the N(0, I) latent into the fitted mixture."""

    def __init__(
        self,
        spec: ArchitectureSpec,
        cond_dim: int,
        image_shape: tuple[int, ...] = IMAGE_SHAPE,
        latent_components: int = 0,
    ) -> None:
        super().__init__()
        self.spec, self.cond_dim, self.image_shape = spec, cond_dim, tuple(image_shape)
        self.prior = LatentMixture(max(cond_dim, 1), latent_components, spec.latent_dim) if latent_components else None
        c, h, w = self.image_shape
        in_dim = spec.latent_dim + cond_dim
        if spec.kind == "mlp":
            widths = list(reversed(spec.hidden))
            layers: list[nn.Module] = []
            for width in widths:
                layers += [nn.Linear(in_dim, width), nn.ReLU()]
                in_dim = width
            layers.append(nn.Linear(in_dim, c * h * w))
            self.net = nn.Sequential(*layers)
        else:
            chans = list(reversed(spec.hidden))
            down = 2 ** len(chans)
            if h % down or w % down:
                raise ValueError(f"conv architecture '{spec.name}' needs image sides divisible by {down}")
            self.base = (chans[0], h // down, w // down)
            self.fc = nn.Linear(in_dim, math.prod(self.base))
            layers = []
            for cin, cout in zip(chans, chans[1:] + [c]):
                for _ in range(spec.refine):  # transposed at stride 1 (a plain conv): the Lipschitz bounds cover it
                    layers += [nn.ConvTranspose2d(cin, cin, 3, 1, 1), nn.ReLU()]
                layers.append(nn.ConvTranspose2d(cin, cout, 4, 2, 1))
                layers.append(nn.ReLU())
            self.net = nn.Sequential(*layers[:-1])

    @staticmethod
    def activations_per_sample(
        spec: ArchitectureSpec, cond_dim: int, image_shape: tuple[int, ...], latent_components: int = 0
    ) -> int:
        """Values one sample's forward pass holds (input, every layer's output), from the spec alone: what bounds
        the server's memory when it draws samples, computed before anything is built."""
        c, h, w = image_shape
        total = spec.latent_dim + cond_dim + c * h * w
        if latent_components:
            total += LatentMixture.values_per_sample(latent_components, spec.latent_dim)
        if spec.kind == "mlp":
            return total + 2 * sum(spec.hidden)  # each hidden layer: linear output + its activation
        chans = list(reversed(spec.hidden))
        down = 2 ** len(chans)
        side_h, side_w = max(h // down, 1), max(w // down, 1)
        total += 2 * chans[0] * side_h * side_w * (1 + spec.refine)
        for cout in chans[1:]:
            side_h, side_w = side_h * 2, side_w * 2
            total += 2 * cout * side_h * side_w * (1 + spec.refine)
        return total

    @property
    def input_layer(self) -> nn.Linear:
        """The linear layer that takes ``[z, one-hot label]``."""
        return self.net[0] if self.spec.kind == "mlp" else self.fc

    def forward(self, z: torch.Tensor, y_onehot: torch.Tensor | None = None) -> torch.Tensor:
        if self.prior is not None:
            rows = y_onehot.argmax(1) if self.cond_dim else torch.zeros(len(z), dtype=torch.long, device=z.device)
            z = self.prior(z, rows)
        zin = z if self.cond_dim == 0 else torch.cat([z, y_onehot], dim=1)
        if self.spec.kind == "mlp":
            return self.net(zin).view(-1, *self.image_shape)
        return self.net(F.relu(self.fc(zin)).view(-1, *self.base))


class Encoder(nn.Module):
    """q(z | x, y). Never leaves the silo."""

    def __init__(self, spec: ArchitectureSpec, cond_dim: int, image_shape: tuple[int, ...] = IMAGE_SHAPE) -> None:
        super().__init__()
        self.spec, self.cond_dim = spec, cond_dim
        c, h, w = image_shape
        if spec.kind == "mlp":
            self.features: nn.Module = nn.Flatten()
            in_dim = c * h * w + cond_dim
            body: list[nn.Module] = []
            for width in spec.hidden:
                body += [nn.Linear(in_dim, width), nn.ReLU()]
                in_dim = width
            self.body = nn.Sequential(*body)
            feat = in_dim
        else:
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
            feat = 256
        self.mu = nn.Linear(feat, spec.latent_dim)
        self.logvar = nn.Linear(feat, spec.latent_dim)

    def forward(self, x: torch.Tensor, y_onehot: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)
        if self.cond_dim:
            h = torch.cat([h, y_onehot], dim=1)
        h = self.body(h)
        return self.mu(h), self.logvar(h).clamp(-10.0, 10.0)


class VAE(nn.Module):
    """A silo's VAE. ``cond_dim`` = number of the silo's classes (0: unconditional)."""

    def __init__(self, spec: ArchitectureSpec, cond_dim: int, image_shape: tuple[int, ...] = IMAGE_SHAPE) -> None:
        super().__init__()
        self.encoder = Encoder(spec, cond_dim, image_shape)
        self.decoder = Decoder(spec, cond_dim, image_shape)

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
            else [Decoder(spec, 0, image_shape, latent_components) for _ in range(num_classes)]
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
    return Decoder(spec, num_classes if layout == "conditional" else 0, image_shape, latent_components)


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


def one_hot(labels_local: torch.Tensor, cond_dim: int) -> torch.Tensor | None:
    return F.one_hot(labels_local, cond_dim).to(torch.float32) if cond_dim else None


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
