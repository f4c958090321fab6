"""Lipschitz control of a silo's decoder (the shared generator), measured on its output logits.

* ``gradient_penalty``: the paper's penalty on interpolated latents, two-sided ``(s - K)^2`` or one-sided
  ``max(0, s - K)^2``, where ``s`` is the decoder's secant slope ``|D(z + eps v) - D(z)| / eps`` in a random
  unit direction ``v``. The interpolated latents are drawn from the prior (``z = t z_a + (1 - t) z_b``,
  random labels of the silo), so the penalty never touches a record: under DP its gradient is added
  after the privatised data gradient at no privacy cost (post-processing).
* ``SpectralProjection``: after each optimizer step, rescale every decoder layer whose spectral bound
  exceeds K (post-processing too). Weights stay plain tensors, so the decoder's state_dict keys are
  unchanged and the server rebuilds it from the descriptor as before.
* ``layer_bounds`` / ``upper_bound``: a certified bound, the product of per-layer bounds (ReLU is
  1-Lipschitz). Linear: the spectral norm of W. ConvTranspose2d (kernel k, stride s): every output
  pixel sums ``ceil(k/s)^2`` input patches, so ``|T x| <= ceil(k/s) * |M| * |x|`` with ``M`` the
  (C_in, C_out k k) reshaped kernel (Cauchy-Schwarz over the overlaps).
* ``empirical_lipschitz``: the largest secant slope seen over random latent pairs: a lower bound.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from alignfl_app.config import ConfigError, LipschitzSection
from alignfl_app.devices import device_of
from alignfl_app.models.families import Decoder
from alignfl_app.models.vae import one_hot
from alignfl_app.training import GradientRule, StepHook

SECANT_STEP = 0.05


BOUNDED_LAYERS = (nn.Linear, nn.ConvTranspose2d)  # the layers _matrix_and_factor bounds


def _layers(decoder: nn.Module) -> list[nn.Module]:
    """The decoder's weighted layers; ConfigError for one this module has no bound for (a certified bound must
    never omit a layer)."""
    layers = []
    for name, module in decoder.named_modules():
        if isinstance(module, BOUNDED_LAYERS):
            layers.append(module)
        elif any(True for _ in module.parameters(recurse=False)):
            raise ConfigError(
                f"decoder layer '{name}' ({type(module).__name__}) has weights but no Lipschitz bound: add its rule "
                "to alignfl_app/models/lipschitz.py or use lipschitz='none'"
            )
    return layers


def _matrix_and_factor(layer: nn.Module) -> tuple[torch.Tensor, float]:
    w = layer.weight
    if isinstance(layer, nn.Linear):
        return w, 1.0
    k, s = layer.kernel_size[0], layer.stride[0]
    return w.reshape(w.shape[0], -1), float(math.ceil(k / s))


@torch.no_grad()
def layer_bounds(decoder: Decoder) -> list[float]:
    return [float(torch.linalg.matrix_norm(m, ord=2)) * f for m, f in map(_matrix_and_factor, _layers(decoder))]


def upper_bound(decoder: Decoder) -> float:
    return float(math.prod(layer_bounds(decoder)))


class SpectralProjection(StepHook):
    """Keeps every decoder layer's bound <= ``cap``: cheap power iterations each step, exact at ``finish``."""

    def __init__(self, decoder: Decoder, cap: float, generator: torch.Generator) -> None:
        self.layers, self.cap = _layers(decoder), cap
        self.u = [
            torch.randn(_matrix_and_factor(m)[0].shape[0], generator=generator).to(m.weight.device) for m in self.layers
        ]

    @torch.no_grad()
    def after_step(self, iterations: int = 2) -> None:
        for i, layer in enumerate(self.layers):
            mat, factor = _matrix_and_factor(layer)
            u = self.u[i]
            for _ in range(iterations):
                v = nn.functional.normalize(mat.T @ u, dim=0)
                u = nn.functional.normalize(mat @ v, dim=0)
            self.u[i] = u
            sigma = float(u @ mat @ v) * factor
            if sigma > self.cap:
                layer.weight.mul_(self.cap / sigma)

    @torch.no_grad()
    def finish(self) -> None:
        """Exact projection, so the decoder that leaves the silo meets the cap."""
        for layer in self.layers:
            mat, factor = _matrix_and_factor(layer)
            sigma = float(torch.linalg.matrix_norm(mat, ord=2)) * factor
            if sigma > self.cap:
                layer.weight.mul_(self.cap / sigma)


class GradientPenalty(StepHook):
    """The weighted penalty on ``n`` data-free latents, its gradient added after the data gradient."""

    def __init__(self, decoder: Decoder, n: int, section: LipschitzSection, generator: torch.Generator) -> None:
        self.decoder, self.n, self.section, self.g = decoder, n, section, generator
        self.last: float | None = None

    def after_backward(self, rule: GradientRule) -> None:
        with rule.data_free():
            pen = gradient_penalty(
                self.decoder, self.n, self.section.target, self.section.method == "gp-one-sided", self.g
            )
            (self.section.weight * pen).backward()
        self.last = float(pen.detach())

    def report(self) -> dict[str, float]:
        return {} if self.last is None else {"lipschitz-penalty": self.last}


class LipschitzMeter(StepHook):
    """After training: the certified upper bound and the measured slope of the decoder (data-free numbers)."""

    def __init__(self, decoder: Decoder, seed: int) -> None:
        self.decoder, self.seed = decoder, seed
        self.values: dict[str, float] = {}

    def finish(self) -> None:
        self.values = {
            "lipschitz-upper-bound": upper_bound(self.decoder),
            "lipschitz-empirical": empirical_lipschitz(self.decoder, seed=self.seed),
        }

    def report(self) -> dict[str, float]:
        return self.values


def lipschitz_hooks(
    section: LipschitzSection, decoder: Decoder, batch_size: int, generator: torch.Generator, measure_seed: int
) -> list[StepHook]:
    """The step hooks of the run's Lipschitz method (none, a penalty, or a projection), then the meter."""
    hooks: list[StepHook] = []
    if section.method == "spectral":
        hooks.append(SpectralProjection(decoder, section.target, generator))
    elif section.method in ("gp", "gp-one-sided") and section.weight > 0:
        hooks.append(GradientPenalty(decoder, batch_size, section, generator))
    return [*hooks, LipschitzMeter(decoder, measure_seed)]


def _prior_points(decoder: Decoder, n: int, g: torch.Generator, temperature: float = 1.0):
    d = decoder.spec.latent_dim
    za, zb = torch.randn(n, d, generator=g) * temperature, torch.randn(n, d, generator=g) * temperature
    t = torch.rand(n, 1, generator=g)
    z = t * za + (1 - t) * zb
    v = nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    y = one_hot(torch.randint(0, decoder.cond_dim, (n,), generator=g), decoder.cond_dim) if decoder.cond_dim else None
    device = device_of(decoder)  # drawn on the CPU (the same points on every device), used where the decoder is
    return z.to(device), v.to(device), None if y is None else y.to(device)


def secant_slopes(
    decoder: Decoder, z: torch.Tensor, v: torch.Tensor, y: torch.Tensor | None, step: float = SECANT_STEP
) -> torch.Tensor:
    """``|D(z + step v) - D(z)| / step`` per row (differentiable; every value is <= the Lipschitz constant)."""
    out = decoder(torch.cat([z, z + step * v]), None if y is None else torch.cat([y, y]))
    a, b = out[: len(z)], out[len(z) :]
    return (b - a).flatten(1).norm(dim=1) / step


def gradient_penalty(decoder: Decoder, n: int, target: float, one_sided: bool, g: torch.Generator) -> torch.Tensor:
    """The penalty on ``n`` data-free interpolated latents (mean over them)."""
    z, v, y = _prior_points(decoder, n, g)
    gap = secant_slopes(decoder, z, v, y) - target
    return (gap.clamp(min=0) if one_sided else gap).pow(2).mean()


@torch.no_grad()
def empirical_lipschitz(decoder: Decoder, n: int = 512, seed: int = 0) -> float:
    """Largest secant slope over ``n`` random prior points and directions (a lower bound of the constant)."""
    was = decoder.training
    decoder.eval()
    z, v, y = _prior_points(decoder, n, torch.Generator().manual_seed(seed))
    value = float(secant_slopes(decoder, z, v, y).max())
    decoder.train(was)
    return value
