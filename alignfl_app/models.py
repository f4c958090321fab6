"""Models: per-silo (conditional) VAEs whose decoder is the shared generator, and the global models.

The decoder is a separate ``nn.Module`` (``vae.decoder``) so that exactly its parameters can be
shipped and rebuilt on the server from a descriptor alone.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .config import IMAGE_SHAPE, ArchitectureSpec


class Decoder(nn.Module):
    """p(x | z, y): latent (+ one-hot label over the silo's own classes) -> image logits."""

    def __init__(self, spec: ArchitectureSpec, cond_dim: int, image_shape: tuple[int, ...] = IMAGE_SHAPE) -> None:
        super().__init__()
        self.spec, self.cond_dim, self.image_shape = spec, cond_dim, tuple(image_shape)
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
    def activations_per_sample(spec: ArchitectureSpec, cond_dim: int, image_shape: tuple[int, ...]) -> int:
        """Values one sample's forward pass holds (input, every layer's output), from the spec alone: what bounds
        the server's memory when it draws samples, computed before anything is built."""
        c, h, w = image_shape
        total = spec.latent_dim + cond_dim + c * h * w
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




@dataclass(frozen=True)
class LatentFit:
    """A Gaussian fitted to a VAE's aggregate posterior on the records it trained on: one mean per label of the
    decoder's condition and one shared covariance (of the posterior means around them plus the mean posterior
    variance). Latents drawn from it land where the decoder was trained, not in the N(0, I) prior's holes."""

    means: torch.Tensor  # (max(cond_dim, 1), latent_dim)
    scale_tril: torch.Tensor  # (latent_dim, latent_dim), lower triangular

    @classmethod
    @torch.no_grad()
    def of(cls, vae: VAE, x: torch.Tensor, y_local: torch.Tensor, batch_size: int = 1000) -> LatentFit:
        """The fit of ``vae`` on records ``x`` with decoder conditions ``y_local`` (all 0 when unconditional)."""
        vae.eval()
        cond = vae.decoder.cond_dim
        mus, variances = [], []
        for i in range(0, len(x), batch_size):
            mu, logvar = vae.encoder(x[i:i + batch_size], one_hot(y_local[i:i + batch_size], cond))
            mus.append(mu)
            variances.append(logvar.exp())
        mu, var = torch.cat(mus).double(), torch.cat(variances).double()
        labels = y_local if cond else torch.zeros_like(y_local)
        prior = torch.zeros(mu.shape[1], dtype=mu.dtype, device=mu.device)
        means = torch.stack([mu[labels == k].mean(0) if (labels == k).any() else prior for k in range(max(cond, 1))])
        spread = mu - means[labels]
        cov = spread.T @ spread / len(mu) + torch.diag(var.mean(0))
        scale = torch.linalg.cholesky(cov + 1e-6 * torch.eye(len(cov), dtype=cov.dtype, device=cov.device))
        return cls(means.float(), scale.float())

    @torch.no_grad()
    def fold_into(self, decoder: Decoder) -> Decoder:
        """A copy of ``decoder`` whose N(0, I) input is mapped to ``mean_y + L z`` inside its first layer, so the
        server samples the fit with the same architecture and the same sampler."""
        folded = copy.deepcopy(decoder)
        layer, d = folded.input_layer, decoder.spec.latent_dim
        w_z = layer.weight[:, :d].clone()
        layer.weight[:, :d] = w_z @ self.scale_tril.to(w_z)
        if decoder.cond_dim:
            layer.weight[:, d:] += w_z @ self.means.to(w_z).T
        else:
            layer.bias += w_z @ self.means[0].to(w_z)
        return folded


class PerClassDecoders(nn.Module):
    """One unconditional decoder per class; the one-hot label only picks which decoder draws the sample."""

    def __init__(self, spec: ArchitectureSpec, num_classes: int, image_shape: tuple[int, ...] = IMAGE_SHAPE,
                 decoders: list[Decoder] | None = None) -> None:
        super().__init__()
        self.spec, self.cond_dim, self.image_shape = spec, num_classes, tuple(image_shape)
        self.decoders = nn.ModuleList(decoders if decoders is not None else
                                      [Decoder(spec, 0, image_shape) for _ in range(num_classes)])

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


def build_decoder(spec: ArchitectureSpec, layout: str, num_classes: int,
                  image_shape: tuple[int, ...] = IMAGE_SHAPE) -> nn.Module:
    """The decoder a descriptor describes (what the server rebuilds from a reply)."""
    if layout == "per-class":
        return PerClassDecoders(spec, num_classes, image_shape)
    return Decoder(spec, num_classes if layout == "conditional" else 0, image_shape)


class GeneratorSet(nn.Module):
    """A silo's VAEs: one (conditional or unconditional) VAE over all its classes, or one unconditional VAE per
    class. ``decoder`` is the part that leaves the silo: the same parameters, keyed as ``build_decoder`` keys them."""

    def __init__(self, spec: ArchitectureSpec, layout: str, num_classes: int,
                 image_shape: tuple[int, ...] = IMAGE_SHAPE) -> None:
        super().__init__()
        self.layout, self.num_classes = layout, num_classes
        if layout == "per-class":
            self.vaes = nn.ModuleList(VAE(spec, 0, image_shape) for _ in range(num_classes))
        else:
            self.vaes = nn.ModuleList([VAE(spec, num_classes if layout == "conditional" else 0, image_shape)])
        self.latent_fits: list[LatentFit] | None = None  # not weights: the silo's state never carries them

    def fit_latents(self, groups: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Fit each VAE's latents on its group's records ``(x, decoder condition)``; the released decoder then
        samples the fits (``decoder``). A statistic of the records: only where such figures may leave."""
        self.latent_fits = [LatentFit.of(vae, x, y) for vae, (x, y) in zip(self.vaes, groups, strict=True)]

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


def vae_loss(logits: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
             kl_weight: float = 1.0, reduction: str = "mean") -> torch.Tensor:
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
            nn.Conv2d(c, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(32 * (h // 4) * (w // 4), 128), nn.ReLU(), nn.Dropout(0.2),
                                  nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def one_hot(labels_local: torch.Tensor, cond_dim: int) -> torch.Tensor | None:
    return F.one_hot(labels_local, cond_dim).to(torch.float32) if cond_dim else None


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
