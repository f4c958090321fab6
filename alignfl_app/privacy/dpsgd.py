"""Differential privacy for a silo's generators: DP-SGD with adaptive clipping, the silo's policy and ledger.

Mechanism (per generator group: the silo's one VAE, or one VAE per class; groups hold disjoint records):

* once per run, each group's record count is released to the silo's own training with Gaussian noise of
  std ``dp-count-noise-std`` (sensitivity 1: a record is in one group) and booked; the noisy count sets the
  expected batch ``q * n`` that normalises the gradient, so nothing downstream uses an exact count;
* every step draws a Poisson batch at the public rate ``q = dp-sample-rate`` (never batch / n, so epsilon
  reveals nothing about n), clips each record's gradient to the current bound ``C`` (ghost norms from
  Opacus: Linear layers never materialise per-sample gradients), adds ``N(0, (sigma_g C)^2)`` to the sum;
  the count of unclipped records gets ``N(0, sigma_b^2)`` and moves the bound toward the
  ``dp-clip-quantile`` quantile (Andrew et al. 2021). Both releases together are one Gaussian mechanism with
  noise multiplier ``sigma``, ``sigma^-2 = sigma_g^-2 + (2 sigma_b)^-2``, which the accountant sees;
* groups of one silo compose in parallel (disjoint records), so a round books one group's mechanisms;
  neighbouring datasets differ by adding or removing one record (under replace-one, epsilon doubles).

``calibrate`` fixes ``sigma`` from the run's target epsilon by the named accountant (PRV by default, the
tightest Opacus offers). ``admit`` holds the run's request against the silo's own policy
(``<silo-dir>/privacy-policy.toml``): the run may ask for more privacy, never less. ``PrivacyLedger`` books
every round under a file lock in ``<silo-dir>/privacy-ledger.json`` and refuses a round past the lifetime
budget.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from pydantic import BaseModel, ConfigDict
from torch import nn

import alignfl_app.privacy.grad_samplers  # noqa: F401  (registers the ConvTranspose2d rule)
from alignfl_app.config import ConfigError, LocalTrainingSection, PrivacySection
from alignfl_app.privacy.accounting import Mechanism, epsilon_of
from alignfl_app.privacy.errors import PolicyRefusal
from alignfl_app.privacy.ledger import LedgerAnchor, PrivacyLedger
from alignfl_app.privacy.policy import SiloPrivacyPolicy
from alignfl_app.training import PlainGradient, ShuffledBatches


class DPPlan(BaseModel):
    """The public recipe every DP silo of a run trains with (the same for neighbouring datasets)."""

    model_config = ConfigDict(frozen=True)

    accountant: Literal["prv", "rdp"]
    noise_multiplier: float  # sigma of the combined gradient + clip-count mechanism (what the accountant sees)
    sample_rate: float
    steps_per_round: int
    planned_rounds: int
    delta: float
    count_noise_std: float  # of each group's record count, released once per run
    unclipped_std: float  # 0: chosen per group from its expected batch
    clip_init: float
    clip_quantile: float
    clip_lr: float
    learning_rate: float
    secure_noise: bool

    def round_mechanisms(self, releases_counts: bool) -> list[Mechanism]:
        """What one round releases per group: the noisy count (first round of a run) and the DP-SGD steps."""
        steps = [(self.noise_multiplier, self.sample_rate, self.steps_per_round)]
        return [(self.count_noise_std, 1.0, 1), *steps] if releases_counts else steps

    @property
    def planned_mechanisms(self) -> list[Mechanism]:
        """Everything the planned run releases per group: the counts once, every round's steps."""
        return [
            (self.count_noise_std, 1.0, 1),
            (self.noise_multiplier, self.sample_rate, self.steps_per_round * self.planned_rounds),
        ]

    @functools.cached_property
    def planned_epsilon(self) -> float:
        return epsilon_of(self.planned_mechanisms, self.delta, self.accountant)


@functools.lru_cache(maxsize=16)
def calibrate(privacy: PrivacySection, rounds: int) -> DPPlan:
    """The run's plan: ``sigma`` from dp-noise-multiplier, or the smallest (within 0.5%) that keeps the planned
    run (counts + ``rounds x dp-steps`` steps) at dp-epsilon; one line when the target is unreachable."""

    def plan(sigma: float) -> DPPlan:
        return DPPlan(
            accountant=privacy.accountant,
            noise_multiplier=sigma,
            sample_rate=privacy.sample_rate,
            steps_per_round=privacy.steps,
            planned_rounds=rounds,
            delta=privacy.delta,
            count_noise_std=privacy.count_noise_std,
            unclipped_std=privacy.unclipped_std,
            clip_init=privacy.clip_init,
            clip_quantile=privacy.clip_quantile,
            clip_lr=privacy.clip_lr,
            learning_rate=privacy.learning_rate,
            secure_noise=privacy.secure_noise,
        )

    if privacy.noise_multiplier > 0:
        return plan(privacy.noise_multiplier)
    target = privacy.epsilon
    floor = epsilon_of([(privacy.count_noise_std, 1.0, 1)], privacy.delta, privacy.accountant)
    if floor >= target:
        raise ConfigError(
            f"dp-epsilon={target} is unreachable: the record counts alone spend {floor:.3f}; "
            "raise dp-epsilon or dp-count-noise-std"
        )
    lo, hi = 0.1, 1.0
    while plan(hi).planned_epsilon > target:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise ConfigError(
                f"dp-epsilon={target} is unreachable for {rounds} x {privacy.steps} steps at "
                f"dp-sample-rate={privacy.sample_rate}: raise dp-epsilon or lower the steps or rate"
            )
    while hi - lo > 0.005 * hi:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if plan(mid).planned_epsilon <= target else (mid, hi)
    return plan(hi)


class RandomSource:
    """Where DP draws come from: a fast generator seeded from the OS (default), or the OS's cryptographic
    generator for every draw (``secure``: about 4x the cost of the draws, see docs/privacy.md)."""

    def __init__(self, secure: bool) -> None:
        self.secure = secure
        self.g = torch.Generator().manual_seed(secure_seed())
        self.device_generators: dict[torch.device, torch.Generator] = {}  # fast draws made where they are used

    def _generator(self, device: torch.device) -> torch.Generator:
        if device.type == "cpu":
            return self.g
        if device not in self.device_generators:
            self.device_generators[device] = torch.Generator(device).manual_seed(secure_seed())
        return self.device_generators[device]

    def _uniform64(self, n: int) -> torch.Tensor:
        """n uniforms in (0, 1) with 53 random bits each, straight from os.urandom."""
        bits = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)
        return (torch.from_numpy(bits.astype(np.float64)) + 0.5) * 2.0**-53

    def uniform(self, n: int) -> torch.Tensor:
        return self._uniform64(n).to(torch.float32) if self.secure else torch.rand(n, generator=self.g)

    def normal(self, shape: torch.Size | tuple[int, ...], device: torch.device = torch.device("cpu")) -> torch.Tensor:
        if not self.secure:
            return torch.randn(shape, generator=self._generator(device), device=device)
        n = math.prod(shape)
        draws = []
        for _ in range(4):  # as Opacus' secure mode: the sum of 4 draws / 2 blurs float-level artefacts
            u1, u2 = self._uniform64(n), self._uniform64(n)
            draws.append(torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2))
        return (sum(draws) / 2.0).to(torch.float32).reshape(shape).to(device)  # the OS's bytes come from the host


@dataclass(frozen=True)
class GroupNoise:
    """How one generator group's DP-SGD splits the plan's noise, from its noisy record count."""

    expected_batch: float  # q * noisy count: the gradient's normaliser
    grad_noise_multiplier: float  # sigma_g on the clipped-gradient sum
    count_noise_std: float  # sigma_b on the unclipped count

    @classmethod
    def of(cls, plan: DPPlan, noisy_count: float) -> GroupNoise:
        expected = max(plan.sample_rate * noisy_count, 1.0)
        sigma = plan.noise_multiplier
        count_std = plan.unclipped_std if plan.unclipped_std > 0 else max(expected / 20.0, sigma)
        if 2 * count_std <= sigma:
            raise ConfigError(
                f"dp-unclipped-std={count_std:.3f} must exceed half the noise multiplier {sigma:.3f} "
                f"(the clip-bound query takes its share of the noise): set it above {sigma / 2:.3f} "
                "or 0 (automatic)"
            )
        return cls(expected, (sigma**-2 - (2 * count_std) ** -2) ** -0.5, count_std)


class AdaptiveClipDP:
    """The DP-SGD gradient rule: per-sample clipping (ghost norms), noise, and the adaptive bound.

    Kept our own rather than Opacus' optimizer: the bound adapts every step from a noisy unclipped count
    that shares the accountant's noise budget, which Opacus' adaptive-clipping optimizer does not book.
    ``backward(per_record_loss)`` leaves the noisy mean of clipped gradients in ``p.grad``.
    """

    def __init__(
        self, module: nn.Module, plan: DPPlan, noise: GroupNoise, clip_bound: float, source: RandomSource
    ) -> None:
        torch.set_flush_denormal(True)  # per-sample gradients of sparse images underflow: 1.5x slower otherwise
        self.module, self.plan, self.noise, self.clip, self.source = module, plan, noise, float(clip_bound), source
        self.steps = 0
        self.gsm = GradSampleModuleFastGradientClipping(
            module, loss_reduction="sum", max_grad_norm=self.clip, use_ghost_clipping=True, strict=True
        )
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.unclipped_fraction: list[float] = []

    def close(self) -> None:
        """Remove Opacus' hooks (the module is plain again: same parameters, same state_dict keys)."""
        self.gsm.remove_hooks()
        for p in self.params:
            for attr in ("_norm_sample", "_forward_counter", "grad_sample"):
                if hasattr(p, attr):
                    delattr(p, attr)

    @contextlib.contextmanager
    def data_free(self):
        """Forward passes that are not per-record losses (e.g. a data-free penalty) must not be captured."""
        self.gsm.disable_hooks()
        try:
            with warnings.catch_warnings():  # Opacus' (disabled) full backward hooks still warn
                warnings.simplefilter("ignore", UserWarning)
                yield
        finally:
            self.gsm.enable_hooks()

    def report(self) -> dict[str, float]:
        """How the bound moved: private outputs of the mechanism, kept in the silo's own report."""
        fractions = self.unclipped_fraction
        return {
            "dp-steps": self.steps,
            "dp-clip-bound": self.clip,
            "dp-unclipped-fraction": sum(fractions) / max(len(fractions), 1),
        }

    def clipped_sum(self, per_sample_loss: torch.Tensor) -> torch.Tensor:
        """Leave sum_i clip_C(grad L_i) in ``p.grad``; return the per-sample gradient norms."""
        for p in self.params:
            p.grad = None
        if per_sample_loss.numel() == 0:
            for p in self.params:
                p.grad = torch.zeros_like(p)
            return torch.zeros(0)
        with warnings.catch_warnings():  # Opacus' full backward hooks on layers whose inputs need no grad
            warnings.simplefilter("ignore", UserWarning)
            per_sample_loss.sum().backward(retain_graph=True)
        self.gsm.max_grad_norm = self.clip
        norms = self.gsm.get_norm_sample().detach()
        coef = (self.clip / (norms + 1e-6)).clamp(max=1.0)
        for p in self.params:
            p.grad = None
        with self.data_free():
            (coef * per_sample_loss).sum().backward()
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return norms

    def backward(self, per_record_loss: torch.Tensor | None) -> None:
        """Noisy mean of clipped gradients in ``p.grad``; then update the clip bound from a noisy count.

        ``None``: an empty Poisson batch (no forward pass), released as noise only.
        """
        plan, noise = self.plan, self.noise
        self.steps += 1
        norms = self.clipped_sum(per_record_loss if per_record_loss is not None else torch.zeros(0))
        std = noise.grad_noise_multiplier * self.clip
        for p in self.params:
            p.grad.add_(self.source.normal(p.shape, p.device) * std).div_(noise.expected_batch)
        # Released: sum_i (b_i - 1/2) + N(0, sigma_b^2) (sensitivity 1/2); + m/2 (public) estimates the count.
        centred = float((norms <= self.clip).sum()) - len(norms) / 2
        noisy = centred + float(self.source.normal((1,))[0]) * noise.count_noise_std + noise.expected_batch / 2
        frac = noisy / noise.expected_batch
        self.unclipped_fraction.append(frac)
        self.clip *= math.exp(-plan.clip_lr * (frac - plan.clip_quantile))


def secure_seed() -> int:
    """A seed from the OS entropy pool: the run config's seed is known to the server, and noise it could replay
    would protect nothing."""
    return int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)


class PoissonBatches:
    """``steps`` batches, each record in each batch independently with probability ``sample_rate``.

    Our own rather than Opacus' DPDataLoader: the silo's records are one in-memory tensor, so sampling
    indices avoids a DataLoader and a copy per batch.
    """

    def __init__(self, sample_rate: float, steps: int, source: RandomSource) -> None:
        self.sample_rate, self.steps, self.source = sample_rate, steps, source

    def __call__(self, n: int) -> Iterator[torch.Tensor]:
        for _ in range(self.steps):
            yield torch.nonzero(self.source.uniform(n) < self.sample_rate).flatten()


class DPCarry(BaseModel):
    """What a DP silo carries from round to round of one run (kept on the silo): the noisy record counts (released
    once per run, booked) and each group's adaptive clip bound."""

    model_config = ConfigDict(extra="forbid")

    run: str
    noisy_counts: list[float]
    clip_bounds: list[float]


class NoPrivacy:
    """A silo that trains without DP: shuffled epochs at the run's seed, the plain gradient rule."""

    releases_record_figures = True  # losses, counts, audit numbers may be reported

    def __init__(self, local: LocalTrainingSection) -> None:
        self.local = local

    def open_round(self, run: str, server_round: int, group_sizes: list[int], carry: DPCarry | None) -> PlainRound:
        return PlainRound(self.local)


@dataclass
class PlainRound:
    local: LocalTrainingSection
    ledger_anchor: None = None  # nothing booked

    @property
    def learning_rate(self) -> float:
        return self.local.learning_rate

    def rule(self, group: int, model: nn.Module) -> PlainGradient:
        return PlainGradient()

    def batches(self, group: int, n: int, seed: int) -> Iterator[torch.Tensor]:
        local = self.local
        return ShuffledBatches(local.batch_size, local.local_epochs, local.local_min_steps)(
            n, torch.Generator().manual_seed(seed)
        )

    def carry(self) -> DPCarry | None:
        return None

    def public_report(self) -> dict[str, float]:
        return {}


class DifferentialPrivacy:
    """A silo that trains under DP-SGD: each round is booked in its ledger before it trains; every draw comes
    from the OS (fast generator seeded from it, or every draw in secure mode)."""

    releases_record_figures = False  # only the decoder and public constants leave the silo

    def __init__(self, plan: DPPlan, policy: SiloPrivacyPolicy, silo: str, silo_dir: Path) -> None:
        self.plan, self.policy, self.silo = plan, policy, silo
        self.ledger = PrivacyLedger(silo_dir, silo)

    def open_round(self, run: str, server_round: int, group_sizes: list[int], carry: DPCarry | None) -> DPRound:
        """Book the round (``PrivacyRefusal`` if it would pass the budget) and return what trains it. The first
        round of a run also releases (and books) each group's noisy record count."""
        plan, source = self.plan, RandomSource(self.plan.secure_noise)
        fresh = carry is None or carry.run != run or len(carry.noisy_counts) != len(group_sizes)
        if fresh:
            carry = DPCarry(
                run=run,
                noisy_counts=[n + float(source.normal((1,))[0]) * plan.count_noise_std for n in group_sizes],
                clip_bounds=[plan.clip_init] * len(group_sizes),
            )
        run_spent, _, anchor = self.ledger.book(run, server_round, plan.round_mechanisms(fresh), plan, self.policy)
        # the model's own draws (the VAE's reparameterisation) from a secret stream too: one the server could
        # replay would tie every record's gradient to the batch before it
        torch.manual_seed(secure_seed())
        if plan.delta * max(sum(carry.noisy_counts), 1.0) >= 1.0:  # on the booked noisy counts: leaks nothing more
            raise PolicyRefusal(
                f"silo '{self.silo}' holds too many records for dp-delta={plan.delta:g} (delta must "
                "stay below 1 / records): lower dp-delta"
            )
        return DPRound(plan, carry, source, run_spent, anchor)


@dataclass
class DPRound:
    plan: DPPlan
    dp_carry: DPCarry
    source: RandomSource
    run_spent: float
    ledger_anchor: LedgerAnchor  # the ledger after this round's booking: recorded in the report and state
    rules: dict[int, AdaptiveClipDP] = field(default_factory=dict)

    @property
    def learning_rate(self) -> float:
        return self.plan.learning_rate

    def rule(self, group: int, model: nn.Module) -> AdaptiveClipDP:
        noise = GroupNoise.of(self.plan, self.dp_carry.noisy_counts[group])
        self.rules[group] = AdaptiveClipDP(model, self.plan, noise, self.dp_carry.clip_bounds[group], self.source)
        return self.rules[group]

    def batches(self, group: int, n: int, seed: int) -> Iterator[torch.Tensor]:
        return PoissonBatches(self.plan.sample_rate, self.plan.steps_per_round, self.source)(n)

    def carry(self) -> DPCarry:
        bounds = [self.rules[g].clip if g in self.rules else b for g, b in enumerate(self.dp_carry.clip_bounds)]
        return self.dp_carry.model_copy(update={"clip_bounds": bounds})

    def public_report(self) -> dict[str, float]:
        """The run's public recipe and what this run has spent (a function of it and of the rounds trained):
        identical for neighbouring datasets, and silent about the silo's other runs."""
        plan = self.plan
        return {
            "dp-epsilon": plan.planned_epsilon,
            "dp-delta": plan.delta,
            "dp-noise-multiplier": plan.noise_multiplier,
            "dp-sample-rate": plan.sample_rate,
            "dp-steps": plan.steps_per_round,
            "dp-epsilon-spent": self.run_spent,
        }
