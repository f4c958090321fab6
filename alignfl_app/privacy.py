"""Differential privacy for a silo's local VAE training: DP-SGD with adaptive clipping and a ledger.

Mechanism (per step, Poisson sampling with rate ``q = batch-size / n``):

* every record's gradient is clipped to the current bound ``C`` (per-sample norms come from Opacus'
  ghost-clipping hooks: Linear layers never materialise per-sample gradients);
* the sum of clipped gradients gets Gaussian noise ``N(0, (sigma_g C)^2)``; the count of unclipped
  records gets ``N(0, sigma_b^2)`` and drives the bound toward the ``dp-clip-quantile`` quantile of the
  gradient norms (Andrew et al. 2021, geometric update). Both releases together are one Gaussian
  mechanism with noise multiplier ``sigma`` where ``sigma^-2 = sigma_g^-2 + (2 sigma_b)^-2``: each record
  moves the gradient sum by at most ``C`` and the released centred count ``sum_i (b_i - 1/2)`` by 1/2,
  so the accountant uses ``sigma``;
* the RDP accountant of Opacus composes ``(sigma, q, steps)`` over every round.

``plan_dp`` calibrates ``sigma`` once for the whole planned run (rounds x local epochs) from a target
epsilon, and refuses with one line when the target is unreachable instead of silently missing it.
``PrivacyLedger`` keeps each silo's spending on disk (JSON, atomic writes) and refuses a round that would
take the silo past its budget.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from .config import ConfigError, LocalTrainingSection, PrivacySection, RunConfig
from .files import atomic_write_text
from .training import Batcher, PlainGradient, ShuffledBatches

# opacus.utils.module_utils calls logging.basicConfig() on import: drop the root handler it adds, else every
# Flower log line is printed twice in the ServerApp / ClientApp processes.
_root_handlers = list(logging.getLogger().handlers)
from opacus.accountants import RDPAccountant  # noqa: E402
from opacus.accountants.utils import get_noise_multiplier  # noqa: E402
from opacus.grad_sample import GradSampleModuleFastGradientClipping, register_grad_sampler  # noqa: E402

for _handler in logging.getLogger().handlers[len(_root_handlers):]:
    logging.getLogger().removeHandler(_handler)


# Opacus' default RDP orders plus larger ones (small sampling rates x few steps want high orders).
RDP_ORDERS = [*RDPAccountant.DEFAULT_ALPHAS, *range(64, 513, 8)]


@register_grad_sampler(nn.ConvTranspose2d)
def conv_transpose2d_grad_sample(layer: nn.ConvTranspose2d, activations: list[torch.Tensor],
                                 backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a ConvTranspose2d (Opacus has none; its functorch fallback is slow).

    ``dW[ci, co, a, b] = sum_p x[ci, p] * g[co, s p - pad + (a, b)]``: unfold the output gradient with the
    layer's kernel, stride and padding, then one batched matmul with the input.
    """
    if layer.groups != 1 or layer.dilation != (1, 1) or layer.output_padding != (0, 0):
        raise NotImplementedError("DP supports ConvTranspose2d with groups=1, dilation=1, output_padding=0 only")
    x = activations[0].to(backprops.dtype)
    n, cin = x.shape[:2]
    cout, (kh, kw) = layer.out_channels, layer.kernel_size
    cols = nn.functional.unfold(backprops, (kh, kw), padding=layer.padding, stride=layer.stride)
    ret = {}
    if layer.weight.requires_grad:
        ret[layer.weight] = torch.bmm(x.reshape(n, cin, -1), cols.transpose(1, 2)).view(n, cin, cout, kh, kw)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = backprops.sum(dim=(2, 3))
    return ret


class PrivacyBudgetExceeded(RuntimeError):
    """A round would take the silo past its privacy budget; the message is one line naming the fix."""


class DPPlan(BaseModel):
    """Everything a silo needs to train privately; fixed for the whole run."""

    model_config = ConfigDict(frozen=True)

    noise_multiplier: float  # sigma of the combined mechanism (what the accountant sees)
    grad_noise_multiplier: float  # sigma_g on the clipped-gradient sum
    count_noise_std: float  # sigma_b on the unclipped count
    sample_rate: float
    expected_batch: float
    steps_per_round: int
    planned_rounds: int
    delta: float
    budget_epsilon: float  # inf: no cap (configured by noise multiplier without dp-budget-epsilon)
    clip_init: float
    clip_quantile: float
    clip_lr: float

    @property
    def planned_epsilon(self) -> float:
        return epsilon_of([(self.noise_multiplier, self.sample_rate, self.steps_per_round * self.planned_rounds)],
                          self.delta)


def epsilon_of(history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon of a composition of subsampled Gaussian steps (Opacus RDP accountant)."""
    if not history:
        return 0.0
    acc = RDPAccountant()
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(acc.get_epsilon(delta=delta, alphas=RDP_ORDERS))


def plan_dp(privacy: PrivacySection, local: LocalTrainingSection, rounds: int, num_records: int) -> DPPlan:
    """Calibrate the noise for ``rounds x local-epochs`` epochs over ``num_records`` records."""
    if num_records < 1:
        raise ConfigError("DP training needs at least one training record on the silo")
    q = min(1.0, local.batch_size / num_records)
    steps_per_round = local.local_epochs * max(1, round(1.0 / q))
    total = steps_per_round * rounds
    if privacy.noise_multiplier > 0:
        sigma = privacy.noise_multiplier
        budget = privacy.budget_epsilon if privacy.budget_epsilon > 0 else (privacy.epsilon or math.inf)
    else:
        try:
            sigma = get_noise_multiplier(target_epsilon=privacy.epsilon, target_delta=privacy.delta, sample_rate=q,
                                         steps=total, accountant="rdp", epsilon_tolerance=0.005, alphas=RDP_ORDERS)
        except ValueError as exc:
            raise ConfigError(
                f"dp-epsilon={privacy.epsilon} is unreachable for {total} steps at sampling rate {q:.4f} ({exc}): "
                "raise dp-epsilon, or lower num-server-rounds / local-epochs / batch-size"
            ) from exc
        budget = privacy.budget_epsilon if privacy.budget_epsilon > 0 else privacy.epsilon
        reached = epsilon_of([(sigma, q, total)], privacy.delta)
        if reached > privacy.epsilon:  # never silently miss the target
            raise ConfigError(f"noise calibration reached epsilon {reached:.4f} > dp-epsilon={privacy.epsilon}; "
                              "raise dp-epsilon or set dp-noise-multiplier explicitly")
    expected_batch = q * num_records
    count_std = privacy.unclipped_std if privacy.unclipped_std > 0 else expected_batch / 20.0
    if 2 * count_std <= sigma:
        raise ConfigError(
            f"dp-unclipped-std={count_std:.3f} must exceed half the noise multiplier {sigma:.3f} (the clip-bound "
            f"query takes its share of the noise): set dp-unclipped-std above {sigma / 2:.3f} or raise batch-size"
        )
    grad_sigma = (sigma ** -2 - (2 * count_std) ** -2) ** -0.5
    return DPPlan(
        noise_multiplier=sigma, grad_noise_multiplier=grad_sigma, count_noise_std=count_std, sample_rate=q,
        expected_batch=expected_batch, steps_per_round=steps_per_round, planned_rounds=rounds,
        delta=privacy.delta, budget_epsilon=budget, clip_init=privacy.clip_init,
        clip_quantile=privacy.clip_quantile, clip_lr=privacy.clip_lr,
    )


class LedgerState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    silo: str
    delta: float
    budget_epsilon: float | None  # None: no cap
    history: list[tuple[float, float, int]] = []  # (noise multiplier, sample rate, steps) of every round trained
    rounds: list[int] = []
    clip_bound: float | None = None  # the adaptive bound carried over to the next round


class PrivacyLedger:
    """A silo's privacy spending, on disk so that it survives restarts of the SuperNode or the run."""

    def __init__(self, path: Path, silo: str, delta: float, budget_epsilon: float) -> None:
        self.path = Path(path)
        budget = None if math.isinf(budget_epsilon) else budget_epsilon
        if self.path.is_file():
            try:
                self.state = LedgerState.model_validate_json(self.path.read_text())
            except ValueError as exc:
                raise PrivacyBudgetExceeded(
                    f"privacy ledger {self.path} is unreadable ({type(exc).__name__}); restore it from a backup "
                    "(training stays blocked: a lost ledger must not reset the budget)") from exc
            if self.state.silo != silo or self.state.delta != delta:
                raise PrivacyBudgetExceeded(
                    f"privacy ledger {self.path} belongs to silo '{self.state.silo}' at delta {self.state.delta}, "
                    f"not '{silo}' at delta {delta}: point privacy-ledger-dir elsewhere or keep dp-delta")
            self.state.budget_epsilon = budget
        else:
            self.state = LedgerState(silo=silo, delta=delta, budget_epsilon=budget)

    @property
    def spent_epsilon(self) -> float:
        return epsilon_of(self.state.history, self.state.delta)

    def reserve(self, server_round: int, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Book a round's steps before training (conservative if training then fails); returns epsilon after it."""
        after = epsilon_of([*self.state.history, (noise_multiplier, sample_rate, steps)], self.state.delta)
        budget = self.state.budget_epsilon
        if budget is not None and after > budget * (1 + 1e-9):
            raise PrivacyBudgetExceeded(
                f"silo '{self.state.silo}' refuses round {server_round}: it would spend epsilon {after:.3f} > budget "
                f"{budget:g} (spent {self.spent_epsilon:.3f}, ledger {self.path}); raise dp-budget-epsilon or stop")
        self.state.history.append((noise_multiplier, sample_rate, steps))
        self.state.rounds.append(server_round)
        self.save()
        return after

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, self.state.model_dump_json(indent=1))


class AdaptiveClipDP:
    """The DP-SGD gradient rule: per-sample clipping (ghost norms), noise, and the adaptive bound.

    Kept our own rather than Opacus' optimizer: the bound adapts every step from a noisy unclipped count
    that shares the accountant's noise budget, which Opacus' adaptive-clipping optimizer does not book.
    ``backward(per_record_loss)`` leaves the noisy mean of clipped gradients in ``p.grad``.
    """

    def __init__(self, module: nn.Module, plan: DPPlan, clip_bound: float, generator: torch.Generator,
                 ledger: PrivacyLedger | None = None) -> None:
        torch.set_flush_denormal(True)  # per-sample gradients of sparse images underflow: 1.5x slower otherwise
        self.module, self.plan, self.clip, self.g, self.ledger = module, plan, float(clip_bound), generator, ledger
        self.steps = 0
        self.gsm = GradSampleModuleFastGradientClipping(module, loss_reduction="sum", max_grad_norm=self.clip,
                                                        use_ghost_clipping=True, strict=True)
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.unclipped_fraction: list[float] = []

    def close(self) -> None:
        """Remove Opacus' hooks (the module is plain again: same parameters, same state_dict keys); carry the
        adaptive bound to the ledger's next round."""
        self.gsm.remove_hooks()
        for p in self.params:
            for attr in ("_norm_sample", "_forward_counter", "grad_sample"):
                if hasattr(p, attr):
                    delattr(p, attr)
        if self.ledger is not None:
            self.ledger.state.clip_bound = self.clip
            self.ledger.save()

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
        """What the round spent and how the bound moved (every figure here is private or data-free)."""
        plan, fractions = self.plan, self.unclipped_fraction
        out = {"dp-delta": plan.delta, "dp-noise-multiplier": plan.noise_multiplier, "dp-sample-rate": plan.sample_rate,
               "dp-steps": self.steps, "dp-clip-bound": self.clip,
               "dp-unclipped-fraction": sum(fractions) / max(len(fractions), 1)}
        if self.ledger is not None:
            out["dp-epsilon-spent"] = self.ledger.spent_epsilon
            if self.ledger.state.budget_epsilon is not None:
                out["dp-epsilon-budget"] = self.ledger.state.budget_epsilon
        return out

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
        plan = self.plan
        self.steps += 1
        norms = self.clipped_sum(per_record_loss if per_record_loss is not None else torch.zeros(0))
        std = plan.grad_noise_multiplier * self.clip
        for p in self.params:
            noise = torch.randn(p.shape, generator=self.g) * std
            p.grad.add_(noise).div_(plan.expected_batch)
        # Released: sum_i (b_i - 1/2) + N(0, sigma_b^2) (sensitivity 1/2); + m/2 (public) estimates the count.
        centred = float((norms <= self.clip).sum()) - len(norms) / 2
        noisy = centred + float(torch.randn((), generator=self.g)) * plan.count_noise_std + plan.expected_batch / 2
        frac = noisy / plan.expected_batch
        self.unclipped_fraction.append(frac)
        self.clip *= math.exp(-plan.clip_lr * (frac - plan.clip_quantile))


def secure_seed() -> int:
    """A seed from the OS entropy pool (Opacus' secure_mode would need torchcsprng, not installed here)."""
    return int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)


class PoissonBatches:
    """``steps`` batches, each record in each batch independently with probability ``sample_rate``.

    Our own rather than Opacus' DPDataLoader: the silo's records are one in-memory tensor, so sampling
    indices avoids a DataLoader and a copy per batch.
    """

    def __init__(self, sample_rate: float, steps: int) -> None:
        self.sample_rate, self.steps = sample_rate, steps

    def __call__(self, n: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
        for _ in range(self.steps):
            yield torch.nonzero(torch.rand(n, generator=generator) < self.sample_rate).flatten()


def ledger_path(cfg: RunConfig, node_ledger: str | None, silo: str) -> Path:
    """Node config ``privacy-ledger`` (a file) wins; else ``<privacy-ledger-dir>/<silo>.json``."""
    if node_ledger:
        return Path(node_ledger).expanduser()
    if cfg.privacy.ledger_dir:
        base = Path(cfg.privacy.ledger_dir).expanduser()
        if not base.is_absolute():
            root = os.environ.get("ALIGNFL_PROJECT_DIR")
            base = (Path(root) if root else Path.cwd()) / base
    else:
        base = cfg.run.resolved_results_dir() / "privacy-ledgers"
    return base / f"{silo}.json"


class NoPrivacy:
    """A silo that trains without DP: shuffled epochs at the run's seed, the plain gradient rule."""

    releases_record_losses = True  # its training and test losses may be reported

    def __init__(self, local: LocalTrainingSection) -> None:
        self.local = local

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    def batcher(self) -> Batcher:
        return ShuffledBatches(self.local.batch_size, self.local.local_epochs)

    def open_round(self, server_round: int, model: nn.Module) -> PlainGradient:
        return PlainGradient()


class DifferentialPrivacy:
    """A silo that trains under DP-SGD: each round is booked in its ledger before it trains.

    Batches and noise come from unpredictable seeds: the run config's seed is known to the server, and
    noise it could replay would protect nothing.
    """

    releases_record_losses = False  # losses on the silo's records are not privatised

    def __init__(self, plan: DPPlan, ledger_file: Path, silo: str) -> None:
        self.plan, self.ledger_file, self.silo = plan, ledger_file, silo

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(secure_seed())

    def batcher(self) -> Batcher:
        return PoissonBatches(self.plan.sample_rate, self.plan.steps_per_round)

    def open_round(self, server_round: int, model: nn.Module) -> AdaptiveClipDP:
        """Book the round (``PrivacyBudgetExceeded`` if it would pass the budget); the rule that trains it and
        writes its adaptive bound back to the ledger. The ledger is read from disk each round: another process
        may have spent budget."""
        plan = self.plan
        ledger = PrivacyLedger(self.ledger_file, self.silo, plan.delta, plan.budget_epsilon)
        ledger.reserve(server_round, plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)
        clip = ledger.state.clip_bound or plan.clip_init
        return AdaptiveClipDP(model, plan, clip, torch.Generator().manual_seed(secure_seed()), ledger)


def privacy_mode(cfg: RunConfig, num_records: int, node_ledger: str | None,
                 silo: str) -> NoPrivacy | DifferentialPrivacy:
    """The silo's privacy, from the privacy section of the run config (and the node's ledger file)."""
    if not cfg.privacy.enabled:
        return NoPrivacy(cfg.local)
    plan = plan_dp(cfg.privacy, cfg.local, cfg.run.num_server_rounds, num_records)
    return DifferentialPrivacy(plan, ledger_path(cfg, node_ledger, silo), silo)
