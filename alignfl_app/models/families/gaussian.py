"""The ``gaussian`` family: a Gaussian mixture per class in the run's feature space (``feature-space``), fitted in
closed form to the features of the silo's records. Its decoder maps z ~ N(0, I_D) to a draw of the class's mixture
(a ``LatentMixture`` over the D features), so the server samples it like any other generator; what it draws are
features, used as they are. No encoder and no gradient steps; there is no DP recipe for it (a silo refuses it under
DP). ``components`` per class; with too few records for that many, fewer are fitted (``fit_gaussian_mixture``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from alignfl_app.config import ArchitectureSpec
from alignfl_app.models.families.base import GeneratorFamily, LatentMixture

JITTER = 1e-4  # added to every covariance's diagonal (the features of a class may span fewer than D directions)


class GaussianDecoder(nn.Module):
    """One mixture per row (the one-hot class, or a single row unconditionally) over ``image_shape`` features."""

    def __init__(
        self, spec: ArchitectureSpec, cond_dim: int, image_shape: tuple[int, ...], latent_components: int = 0
    ) -> None:
        super().__init__()
        self.spec, self.cond_dim, self.image_shape = spec, cond_dim, tuple(image_shape)
        self.mixture = LatentMixture(max(cond_dim, 1), spec.components, math.prod(self.image_shape))

    def forward(self, z: torch.Tensor, y_onehot: torch.Tensor | None = None) -> torch.Tensor:
        rows = y_onehot.argmax(1) if self.cond_dim else torch.zeros(len(z), dtype=torch.long, device=z.device)
        return self.mixture(z, rows).view(-1, *self.image_shape)

    @staticmethod
    def activations_per_sample(
        spec: ArchitectureSpec, cond_dim: int, image_shape: tuple[int, ...], latent_components: int = 0
    ) -> int:
        """The latent and label in, the mixture's pass (its output is the sample)."""
        d = math.prod(image_shape)
        return d + cond_dim + LatentMixture.values_per_sample(spec.components, d)

    @classmethod
    def sampling_values(
        cls, spec: ArchitectureSpec, cond_dim: int, image_shape: tuple[int, ...], latent_components: int = 0
    ) -> tuple[int, int]:
        """Values a draw holds, per sample and per pass (the mixture's own, ``LatentMixture``)."""
        d = math.prod(image_shape)
        per_pass = LatentMixture.values_per_pass(max(cond_dim, 1), spec.components, d)
        return cls.activations_per_sample(spec, cond_dim, image_shape), per_pass

    @staticmethod
    def flops_per_sample(
        spec: ArchitectureSpec, cond_dim: int, image_shape: tuple[int, ...], latent_components: int = 0
    ) -> int:
        """FLOPs of one sample's draw: the mixture's affine map, in closed form (``LatentMixture``)."""
        return LatentMixture.flops_per_sample(math.prod(image_shape))

    @torch.no_grad()
    def set_fit(self, row: int, log_weights: torch.Tensor, means: torch.Tensor, scale_tril: torch.Tensor) -> None:
        self.mixture.log_weights[row] = log_weights
        self.mixture.means[row] = means
        self.mixture.scale_tril[row] = scale_tril

    @torch.no_grad()
    def slope(self) -> float:
        """The decoder's Lipschitz constant in z: the largest spectral norm of a component's Cholesky factor
        (each component is affine in z)."""
        return float(torch.linalg.matrix_norm(self.mixture.scale_tril.tril(), ord=2).max())


class GaussianFamily(GeneratorFamily):
    def check_spec(self, spec: ArchitectureSpec) -> None:
        if spec.components < 1:
            raise ValueError("kind = 'gaussian' needs components (1..8 Gaussians per class)")
        if spec.latent_dim or spec.hidden or spec.refine:
            raise ValueError("kind = 'gaussian' takes components only: remove latent_dim, hidden and refine")

    def check_fits(self, spec: ArchitectureSpec, image_shape: tuple[int, int, int]) -> None:
        """Any image shape: the run's feature space decides what it draws."""


def fit_class_mixtures(
    decoders: Sequence[GaussianDecoder], groups: Sequence[tuple[torch.Tensor, torch.Tensor]], seed: int
) -> None:
    """Fit each decoder's rows: ``groups[i]`` holds the features and row indices (local classes) of decoder i's
    records."""
    from alignfl_app.models.latents import fit_gaussian_mixture

    g = torch.Generator().manual_seed(seed)
    for decoder, (features, rows) in zip(decoders, groups, strict=True):
        z, rows = features.detach().cpu().double().flatten(1), rows.cpu()
        for row in range(decoder.mixture.log_weights.shape[0]):
            log_w, means, tril = fit_gaussian_mixture(
                z[rows == row], decoder.spec.components, g, jitter=JITTER, shrink=True
            )
            decoder.set_fit(row, log_w.float(), means.float(), tril.float())


FAMILY = GaussianFamily("gaussian", GaussianDecoder, None, output="features")
