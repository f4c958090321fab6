"""What every generator family shares: a decoder maps a latent (and the one-hot class) to one sample, optionally
through a latent mixture layer; an encoder (kept on the silo) maps a record to its posterior.

A family (``GeneratorFamily``) names its decoder and encoder classes, checks its own architecture fields and
image shapes, and owns its sampling-memory estimate (``sampling_values``) and its compute per sample
(``flops_per_sample``). The registry (``families/__init__.py``) maps a kind to one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from alignfl_app.config import IMAGE_SHAPE, ArchitectureSpec, ConfigError


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
        """What one sample's pass holds: weights, their running sum and the pick's temporaries in float64, the
        fresh normal latent, the output, and the chosen rows' copy and their affine image while a component draws."""
        return 5 * components + 32 + 4 * latent_dim

    @staticmethod
    def values_per_pass(rows: int, components: int, latent_dim: int) -> int:
        """What one pass holds whatever its size: the weights' softmax in float64 and a copy of the drawing
        component's triangular factor (``tril``)."""
        return 2 * rows * components + latent_dim * latent_dim

    @staticmethod
    def flops_per_sample(latent_dim: int) -> int:
        """One sample's affine draw ``mean + eps @ L.T`` (the pick reads data on the CPU, so it cannot run on the
        meta device: counted in closed form; the pick itself is O(components), negligible)."""
        return 2 * latent_dim * latent_dim + latent_dim

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


class Decoder(nn.Module, ABC):
    """p(x | z, y): latent (+ one-hot label over the silo's own classes) -> sample logits; with
    ``latent_components`` > 0, a ``LatentMixture`` first maps the N(0, I) latent into the fitted mixture. A family
    subclass builds the network (``decode``) and counts its activations (``network_activations``)."""

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

    @property
    @abstractmethod
    def input_layer(self) -> nn.Linear:
        """The linear layer that takes ``[z, one-hot label]`` (a Gaussian latent fit folds into it)."""

    @abstractmethod
    def decode(self, zin: torch.Tensor) -> torch.Tensor:
        """``[z, one-hot label]`` -> logits of shape ``(n, *image_shape)``."""

    @staticmethod
    @abstractmethod
    def network_activations(spec: ArchitectureSpec, in_dim: int, image_shape: tuple[int, ...]) -> int:
        """Values one sample's pass through the network holds beyond its input and output."""

    @staticmethod
    @abstractmethod
    def network_workspace(spec: ArchitectureSpec, in_dim: int, image_shape: tuple[int, ...]) -> tuple[int, int]:
        """Values a layer's kernel allocates while it runs beyond its input and output, per sample and per pass, of
        the layer that needs the most (one layer runs at a time)."""

    @classmethod
    def activations_per_sample(
        cls, spec: ArchitectureSpec, cond_dim: int, image_shape: tuple[int, ...], latent_components: int = 0
    ) -> int:
        """Values one sample's forward pass holds (input, every layer's output), from the spec alone: what bounds
        the server's memory when it draws samples, computed before anything is built."""
        c, h, w = image_shape
        total = spec.latent_dim + cond_dim + c * h * w
        if latent_components:
            total += LatentMixture.values_per_sample(latent_components, spec.latent_dim)
        return total + cls.network_activations(spec, spec.latent_dim + cond_dim, image_shape)

    @classmethod
    def sampling_values(
        cls, spec: ArchitectureSpec, cond_dim: int, image_shape: tuple[int, ...], latent_components: int = 0
    ) -> tuple[int, int]:
        """Values a draw holds, per sample and per pass: every activation and every kernel's workspace, what bounds
        the server's memory when it samples (``max-sampling-mb``), from the spec alone."""
        per_sample, per_pass = cls.network_workspace(spec, spec.latent_dim + cond_dim, image_shape)
        if latent_components:
            per_pass += LatentMixture.values_per_pass(max(cond_dim, 1), latent_components, spec.latent_dim)
        return cls.activations_per_sample(spec, cond_dim, image_shape, latent_components) + per_sample, per_pass

    @classmethod
    def flops_per_sample(
        cls, spec: ArchitectureSpec, cond_dim: int, image_shape: tuple[int, ...], latent_components: int = 0
    ) -> int:
        """FLOPs of one sample's draw, what bounds the server's compute when it samples (``max-sample-mflops``):
        the network's forward pass of one sample counted on the meta device (shapes only, nothing allocated)."""
        with torch.device("meta"):
            network = cls(spec, cond_dim, image_shape)
            zin = torch.empty(1, spec.latent_dim + cond_dim)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            network.decode(zin)
        mixture = LatentMixture.flops_per_sample(spec.latent_dim) if latent_components else 0
        return int(counter.get_total_flops()) + mixture

    def forward(self, z: torch.Tensor, y_onehot: torch.Tensor | None = None) -> torch.Tensor:
        if self.prior is not None:
            rows = y_onehot.argmax(1) if self.cond_dim else torch.zeros(len(z), dtype=torch.long, device=z.device)
            z = self.prior(z, rows)
        zin = z if self.cond_dim == 0 else torch.cat([z, y_onehot], dim=1)
        return self.decode(zin)


class Encoder(nn.Module):
    """q(z | x, y). Never leaves the silo. A family subclass builds ``features`` (image -> vector) and ``body``
    (vector + one-hot label -> hidden) in ``build``, which returns the hidden width."""

    def __init__(self, spec: ArchitectureSpec, cond_dim: int, image_shape: tuple[int, ...] = IMAGE_SHAPE) -> None:
        super().__init__()
        self.spec, self.cond_dim = spec, cond_dim
        self.features: nn.Module
        self.body: nn.Module
        hidden = self.build(spec, cond_dim, tuple(image_shape))
        self.mu = nn.Linear(hidden, spec.latent_dim)
        self.logvar = nn.Linear(hidden, spec.latent_dim)

    def build(self, spec: ArchitectureSpec, cond_dim: int, image_shape: tuple[int, ...]) -> int:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, y_onehot: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)
        if self.cond_dim:
            h = torch.cat([h, y_onehot], dim=1)
        h = self.body(h)
        return self.mu(h), self.logvar(h).clamp(-10.0, 10.0)


@dataclass(frozen=True)
class GeneratorFamily:
    """A kind of generator: its decoder (what leaves the silo) and encoder classes and its own checks."""

    kind: str
    decoder: type[nn.Module]
    encoder: type[Encoder] | None
    """None: the family fits its generator in closed form, without an encoder or gradient steps."""
    output: Literal["pixels", "features"] = "pixels"
    """What the decoder draws: pixel logits (the sampler applies the sharpened sigmoid), or points of the run's
    feature space (used as they are)."""

    def check_spec(self, spec: ArchitectureSpec) -> None:
        """ValueError naming the field when the architecture file lacks what this family needs or sets what it does
        not use (a VAE family here)."""
        if spec.refine:
            raise ValueError(
                f"refine = {spec.refine} applies to conv architectures only: remove it or set kind = 'conv'"
            )
        self.check_vae_spec(spec)

    @staticmethod
    def check_vae_spec(spec: ArchitectureSpec) -> None:
        if spec.latent_dim < 1 or not spec.hidden:
            raise ValueError(f"kind = '{spec.kind}' needs latent_dim (1..256) and hidden (1 to 4 widths)")
        if spec.components:
            raise ValueError("components applies to kind = 'gaussian' only: remove it")

    def check_fits(self, spec: ArchitectureSpec, image_shape: tuple[int, int, int]) -> None:
        """ConfigError unless this architecture can encode and decode images of ``image_shape``."""


def unknown_family(kind: str, known: list[str]) -> ConfigError:
    return ConfigError(f"unknown generator family '{kind}': use one of {known} (alignfl_app/models/families/)")
