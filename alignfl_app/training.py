"""One training loop for every model alignfl trains, composed from small parts.

``Trainer`` runs ``objective -> gradient rule -> step hooks -> optimizer step`` over the index batches a
batcher yields. The parts:

* batchers: ``ShuffledBatches`` (epochs of a seeded permutation) here, ``PoissonBatches`` in privacy.py;
* gradient rules: ``PlainGradient`` (mean loss, backward) here, ``AdaptiveClipDP`` (DP-SGD) in privacy.py;
* step hooks: ``ProximalTerm`` (FedProx) here, the gradient penalty and spectral projection in lipschitz.py.

The silo's VAE, the baselines' classifier and the server's global model all train through ``Trainer``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from torch.nn import functional as F

from alignfl_app.models.vae import one_hot, vae_loss


def set_threads(n: int) -> None:
    """Pin torch's intra-op threads to this process's CPU share (oversubscription costs 30x here)."""
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def to_local_labels(y: torch.Tensor, label_set: tuple[int, ...]) -> torch.Tensor:
    """Global class ids -> index within the silo's label set (the decoder's condition)."""
    lut = torch.full((int(max(label_set)) + 1,), -1, dtype=torch.long, device=y.device)
    lut[torch.tensor(label_set, device=y.device)] = torch.arange(len(label_set), device=y.device)
    local = lut[y]
    if (local < 0).any():
        raise ValueError("labels outside the silo's label set")
    return local


# --- objectives: per-record losses -------------------------------------------------------------
class Objective(Protocol):
    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One loss per record (DP clips them one by one; the plain rule averages them)."""


@dataclass(frozen=True)
class NegativeELBO:
    """A (conditional) VAE's negative ELBO; ``y`` holds indices into the decoder's own label set."""

    kl_weight: float = 1.0

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits, mu, logvar = model(x, one_hot(y, model.decoder.cond_dim))
        return vae_loss(logits, x, mu, logvar, self.kl_weight, reduction="none")


@dataclass(frozen=True)
class CrossEntropy:
    """A classifier's cross-entropy; ``label_smoothing`` > 0 spreads that share of each target over all classes
    (a classifier learning from generated images must not trust every sample's label fully)."""

    label_smoothing: float = 0.0

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x), y, reduction="none", label_smoothing=self.label_smoothing)


# --- batchers -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShuffledBatches:
    """``epochs`` passes over the records, each a fresh permutation cut into ``batch_size`` slices; more passes
    when that makes fewer than ``min_steps`` batches (a small silo's VAE needs a number of steps, not of passes)."""

    batch_size: int
    epochs: int
    min_steps: int = 0

    def passes(self, n: int) -> int:
        per_pass = max(math.ceil(n / self.batch_size), 1)
        return max(self.epochs, math.ceil(self.min_steps / per_pass))

    def __call__(self, n: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
        for _ in range(self.passes(n)):
            perm = torch.randperm(n, generator=generator)
            for i in range(0, n, self.batch_size):
                yield perm[i : i + self.batch_size]


# --- gradient rules ---------------------------------------------------------------------------
class GradientRule(Protocol):
    def backward(self, per_record_loss: torch.Tensor | None) -> None:
        """Leave the step's gradient in ``p.grad``; ``None``: an empty batch."""

    def data_free(self) -> contextlib.AbstractContextManager:
        """Context for a backward pass that touches no record (penalties, proximal terms)."""

    def report(self) -> dict[str, float]:
        """Numbers the rule releases about the call (after ``close``)."""

    def close(self) -> None:
        """Leave the model as it was (hooks removed)."""


class PlainGradient:
    """Non-private training: the mean loss of the batch, backpropagated."""

    def backward(self, per_record_loss: torch.Tensor | None) -> None:
        if per_record_loss is not None:
            per_record_loss.mean().backward()

    def data_free(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def report(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        pass


# --- step hooks -----------------------------------------------------------------------------
class StepHook:
    """Something added to every step without touching a record. Override what you need."""

    def after_backward(self, rule: GradientRule) -> None:
        """Add data-free gradient terms (inside ``rule.data_free()``)."""

    def after_step(self) -> None:
        """Act on the weights after the optimizer step."""

    def finish(self) -> None:
        """Once after the last step."""

    def report(self) -> dict[str, float]:
        return {}


def proximal_term(model: nn.Module, anchor: list[torch.Tensor]) -> torch.Tensor:
    """||w - w_anchor||^2 over all parameters, differentiable in w (FedProx, Li et al. 2020)."""
    return sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True))


class ProximalTerm(StepHook):
    """FedProx: ``mu/2 * ||w - w_start||^2`` anchored at the weights the model had when the hook was made
    (the global model a silo received), so the gradient is pulled back towards them."""

    def __init__(self, model: nn.Module, mu: float) -> None:
        self.model, self.mu = model, mu
        self.anchor = [p.detach().clone() for p in model.parameters()]

    def after_backward(self, rule: GradientRule) -> None:
        with rule.data_free():
            (0.5 * self.mu * proximal_term(self.model, self.anchor)).backward()


class HeldOutLoss(StepHook):
    """After training, the VAE's negative ELBO on held-out records (reported only where losses may leave)."""

    def __init__(self, vae: nn.Module, held_out: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.vae, self.held_out = vae, held_out
        self.value: float | None = None

    def finish(self) -> None:
        self.value = vae_test_loss(self.vae, *self.held_out)

    def report(self) -> dict[str, float]:
        return {} if self.value is None else {"test-neg-elbo": self.value}


# --- the loop ---------------------------------------------------------------------------------
@dataclass
class TrainReport:
    loss: float  # mean per-record loss over every record seen
    examples_seen: int
    seconds: float
    steps: int
    details: dict[str, float] = field(default_factory=dict)  # what the rule and the hooks report


@dataclass
class Trainer:
    """Objective, gradient rule and step hooks; ``fit`` runs them over a batcher's batches."""

    objective: Objective
    rule: GradientRule = field(default_factory=PlainGradient)
    hooks: Sequence[StepHook] = ()

    def fit(
        self,
        model: nn.Module,
        data: tuple[torch.Tensor, torch.Tensor],
        batches: Iterable[torch.Tensor],
        optimizer: torch.optim.Optimizer,
    ) -> TrainReport:
        """Train ``model`` in place on ``data = (x, y)``; the rule is closed at the end, then the hooks finish."""
        x, y = data
        t0 = time.perf_counter()
        model.train()
        total, seen, steps, seconds = 0.0, 0, 0, 0.0
        try:
            for idx in batches:
                idx = idx.to(x.device)  # a few bytes; the records themselves stay where they are
                steps += 1
                optimizer.zero_grad(set_to_none=True)
                per_record = self.objective(model, x[idx], y[idx]) if len(idx) else None
                if per_record is not None:
                    total += float(per_record.detach().sum())
                    seen += len(idx)
                self.rule.backward(per_record)
                for hook in self.hooks:
                    hook.after_backward(self.rule)
                optimizer.step()
                for hook in self.hooks:
                    hook.after_step()
            seconds = time.perf_counter() - t0  # the training itself, not the hooks' final measurements
        finally:
            self.rule.close()  # also after a failure: the model must be plain again
        for hook in self.hooks:
            hook.finish()
        details = dict(self.rule.report())
        for hook in self.hooks:
            details.update(hook.report())
        return TrainReport(total / max(seen, 1), seen, seconds, steps, details)


# --- evaluation on real data -------------------------------------------------------------------
@torch.no_grad()
def vae_test_loss(vae: nn.Module, x: torch.Tensor, y_local: torch.Tensor, batch_size: int = 1000) -> float:
    """Mean negative ELBO of real held-out images (lower is better); ``y_local`` as for ``NegativeELBO``."""
    vae.eval()
    total = 0.0
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        logits, mu, logvar = vae(xb, one_hot(y_local[i : i + batch_size], vae.decoder.cond_dim))
        total += float(vae_loss(logits, xb, mu, logvar, reduction="none").sum())
    return total / max(len(x), 1)


@dataclass
class ClassifierEval:
    accuracy: float
    loss: float
    per_class_accuracy: list[float]  # NaN where the class is absent from the test set
    num_examples: int


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, batch_size: int = 1000
) -> ClassifierEval:
    model.eval()
    preds, loss = [], 0.0
    for i in range(0, len(x), batch_size):
        out = model(x[i : i + batch_size])
        loss += float(F.cross_entropy(out, y[i : i + batch_size], reduction="sum"))
        preds.append(out.argmax(1))
    pred = torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)
    correct = pred == y
    per_class = []
    for c in range(num_classes):
        mask = y == c
        per_class.append(float(correct[mask].float().mean()) if mask.any() else float("nan"))
    n = len(y)
    return ClassifierEval(float(correct.float().mean()) if n else float("nan"), loss / max(n, 1), per_class, n)
