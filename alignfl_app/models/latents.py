"""Fits of a VAE's latent codes of the silo's records that the released decoder carries, so that the server's
N(0, I) latents land where the decoder was trained: a Gaussian folded into the first layer, or a Gaussian mixture
in a ``LatentMixture`` layer in front of it. Both are statistics of the records (made only where such figures may
leave the silo)."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch

from alignfl_app.models.families import Decoder, LatentMixture
from alignfl_app.models.vae import VAE, one_hot


@dataclass(frozen=True)
class LatentFit:
    """A Gaussian fitted to a VAE's aggregate posterior on the records it trained on: one mean per label of the
    decoder's condition and one shared covariance (of the posterior means around them plus the mean posterior
    variance). Latents drawn from it land where the decoder was trained, not in the N(0, I) prior's holes."""

    means: torch.Tensor  # (max(cond_dim, 1), latent_dim)
    scale_tril: torch.Tensor  # (latent_dim, latent_dim), lower triangular
    latent_components: ClassVar[int] = 0  # folded into the first layer: no mixture layer

    @classmethod
    @torch.no_grad()
    def of(cls, vae: VAE, x: torch.Tensor, y_local: torch.Tensor, batch_size: int = 1000) -> LatentFit:
        """The fit of ``vae`` on records ``x`` with decoder conditions ``y_local`` (all 0 when unconditional)."""
        cond = vae.decoder.cond_dim
        mus, variances = [], []
        for mu, logvar in posterior_batches(vae, x, y_local, batch_size):
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


@dataclass(frozen=True)
class MixtureFit:
    """A Gaussian mixture per label of the decoder's condition, fitted by EM to posterior samples of the records'
    latent codes: a VAE's aggregate posterior is not one Gaussian (garments of one class come in several cuts), and
    a single Gaussian puts latents between the modes, where the decoder draws blends."""

    log_weights: torch.Tensor  # (rows, components)
    means: torch.Tensor  # (rows, components, latent_dim)
    scale_tril: torch.Tensor  # (rows, components, latent_dim, latent_dim), lower triangular

    @property
    def latent_components(self) -> int:
        return self.log_weights.shape[1]

    @classmethod
    @torch.no_grad()
    def of(
        cls, vae: VAE, x: torch.Tensor, y_local: torch.Tensor, components: int, seed: int, batch_size: int = 1000
    ) -> MixtureFit:
        """The fit of ``vae`` on records ``x`` with decoder conditions ``y_local`` (all 0 when unconditional); one
        posterior sample per record, drawn from ``seed``."""
        cond = vae.decoder.cond_dim
        g = torch.Generator().manual_seed(seed)
        codes = []
        for mu, logvar in posterior_batches(vae, x, y_local, batch_size):
            codes.append(
                mu.cpu().double()
                + torch.randn(mu.shape, generator=g, dtype=torch.float64) * (0.5 * logvar.cpu().double()).exp()
            )
        z = torch.cat(codes)
        labels = (y_local if cond else torch.zeros_like(y_local)).cpu()
        fits = [fit_gaussian_mixture(z[labels == k], components, g) for k in range(max(cond, 1))]
        device = x.device
        return cls(*(torch.stack(part).float().to(device) for part in zip(*fits, strict=True)))

    @torch.no_grad()
    def fold_into(self, decoder: Decoder) -> Decoder:
        """A copy of ``decoder`` with the mixture as its ``LatentMixture`` layer."""
        folded = copy.deepcopy(decoder)
        rows, components, d = self.means.shape
        folded.prior = LatentMixture(rows, components, d).to(self.means.device)
        folded.prior.log_weights.copy_(self.log_weights)
        folded.prior.means.copy_(self.means)
        folded.prior.scale_tril.copy_(self.scale_tril)
        return folded


def posterior_batches(
    vae: VAE, x: torch.Tensor, y_local: torch.Tensor, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The encoder's posterior (mean, log-variance) of the records, ``batch_size`` at a time (bounded memory)."""
    vae.eval()
    cond = vae.decoder.cond_dim
    for i in range(0, len(x), batch_size):
        yield vae.encoder(x[i : i + batch_size], one_hot(y_local[i : i + batch_size], cond))


def fit_gaussian_mixture(
    z: torch.Tensor,
    components: int,
    generator: torch.Generator,
    iterations: int = 50,
    jitter: float = 1e-4,
    shrink: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EM for a full-covariance Gaussian mixture of ``z`` (float64): log-weights, means and Cholesky factors of
    ``components`` components. With too few points for that many (under 2 (d + 1) per component), fewer are
    fitted and copies share their weight, so the shapes stay fixed and the distribution is the fitted one. No
    points: standard normals. ``shrink``: each covariance is ``shrunk_covariance`` (for fits with about as many
    dimensions as points). Kept here rather than scikit-learn's: a few lines of torch, no new dependency."""
    n, d = z.shape
    eye = torch.eye(d, dtype=torch.float64)
    fitted = max(1, min(components, n // (2 * (d + 1))))
    if n < 2:
        means = z.mean(0, keepdim=True) if n else torch.zeros(1, d, dtype=torch.float64)
        cov, log_w = eye[None], torch.zeros(1, dtype=torch.float64)
    else:
        means = z[torch.randperm(n, generator=generator)[:fitted]].clone()
        if shrink:
            cov = shrunk_covariance(z - z.mean(0), torch.ones(n, dtype=torch.float64)) + jitter * eye
        else:
            cov = torch.cov(z.T).reshape(d, d) + jitter * eye
        cov = cov.expand(fitted, d, d)
        log_w = torch.full((fitted,), -math.log(fitted), dtype=torch.float64)
        for _ in range(iterations):
            log_p = torch.distributions.MultivariateNormal(means, covariance_matrix=cov).log_prob(z[:, None]) + log_w
            resp = log_p.softmax(1)
            mass = resp.sum(0).clamp_min(1e-10)
            log_w = (mass / n).log()
            means = resp.T @ z / mass[:, None]
            if shrink:
                cov = torch.stack([shrunk_covariance(z - means[k], resp[:, k]) for k in range(fitted)]) + jitter * eye
            else:
                diff = z[:, None, :] - means
                cov = torch.einsum("nk,nki,nkj->kij", resp, diff, diff) / mass[:, None, None] + jitter * eye
    copies = torch.arange(components) % len(means)
    shares = torch.bincount(copies, minlength=len(means)).double()
    return log_w[copies] - shares[copies].log(), means[copies], torch.linalg.cholesky(cov)[copies]


def shrunk_covariance(diff: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The weighted covariance of centred points ``diff`` [n, d] with its correlations shrunk towards zero and its
    variances kept (Schafer and Strimmer 2005, target D): the weight is the estimated sampling variance of the
    correlations over their squares, so a fit from few points in many dimensions keeps only the correlations its
    points support (a raw covariance of n < d points is flat outside their span, and draws from it miss every new
    record). ``weights`` >= 0 (an EM component's responsibilities) set the effective number of points."""
    w = weights / weights.sum().clamp_min(1e-300)
    cov = (diff * w[:, None]).T @ diff
    sd = cov.diagonal().clamp_min(1e-300).sqrt()
    x = diff / sd
    corr = (x * w[:, None]).T @ x
    effective = 1.0 / float((w * w).sum())
    if effective < 2:
        return torch.diag(cov.diagonal())
    corr_variance = ((x * x * w[:, None]).T @ (x * x) - corr * corr).clamp_min(0) / (effective - 1)
    off = ~torch.eye(len(cov), dtype=torch.bool)
    weight = float((corr_variance[off].sum() / (corr[off] ** 2).sum().clamp_min(1e-300)).clamp(0, 1))
    return cov * (1 - weight * off.double())
