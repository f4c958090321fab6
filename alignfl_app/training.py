"""Local VAE training (silo side) and global-model training / evaluation (server side)."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .lipschitz import SpectralProjector, gradient_penalty
from .models import VAE, one_hot, vae_loss
from .privacy import AdaptiveClipDP, DPPlan, poisson_batches, secure_seed


def set_threads(n: int) -> None:
    """Pin torch's intra-op threads to this process's CPU share (oversubscription costs 30x here)."""
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def to_local_labels(y: torch.Tensor, label_set: tuple[int, ...]) -> torch.Tensor:
    """Global class ids -> index within the silo's label set (the decoder's condition)."""
    lut = torch.full((int(max(label_set)) + 1,), -1, dtype=torch.long)
    lut[torch.tensor(label_set)] = torch.arange(len(label_set))
    local = lut[y]
    if (local < 0).any():
        raise ValueError("labels outside the silo's label set")
    return local


def _batches(n: int, batch_size: int, g: torch.Generator):
    perm = torch.randperm(n, generator=g)
    for i in range(0, n, batch_size):
        yield perm[i:i + batch_size]


@dataclass
class VAETrainReport:
    loss: float
    examples_seen: int
    seconds: float
    steps: int = 0
    clip_bound: float | None = None  # DP: the adaptive bound after the last step (carried to the next round)
    unclipped_fraction: float | None = None  # DP: mean noisy share of unclipped records
    penalty: float | None = None  # gradient penalty (unweighted) of the last step


def train_vae(
    vae: VAE, x: torch.Tensor, y: torch.Tensor, label_set: tuple[int, ...], *, epochs: int, batch_size: int,
    lr: float, kl_weight: float = 1.0, seed: int = 0, optimizer: torch.optim.Optimizer | None = None,
    dp_plan: DPPlan | None = None, clip_bound: float | None = None,
    lipschitz: str = "none", lipschitz_weight: float = 0.0, lipschitz_target: float = 1.0,
    proximal_mu: float = 0.0,
) -> VAETrainReport:
    """Local training of a silo's (conditional) VAE; private (DP-SGD, adaptive clipping) when ``dp_plan`` is set.

    Private: Poisson-sampled batches, ``dp_plan.steps_per_round`` steps (``epochs`` is part of the plan).
    Lipschitz methods act on the decoder only and never touch a record (see ``lipschitz.py``), so they
    compose with DP as post-processing. Pass ``optimizer`` to keep its state across calls. ``proximal_mu > 0``
    adds FedProx's term (see ``train_classifier``); the baselines that use it train without DP.
    """
    if dp_plan and proximal_mu > 0:
        raise ValueError("the FedProx term is not supported under DP: set proximal-mu=0 or drop dp-epsilon")

    t0 = time.perf_counter()
    cond_dim = vae.decoder.cond_dim
    y_local = to_local_labels(y, label_set) if cond_dim else torch.zeros(len(y), dtype=torch.long)
    opt = optimizer or torch.optim.Adam(vae.parameters(), lr=lr)
    # Private runs draw batches and noise from an unpredictable seed: the run config's seed is known to the
    # server, and noise it could replay would protect nothing.
    g = torch.Generator().manual_seed(secure_seed() if dp_plan else seed)
    if dp_plan:  # per-sample gradients of sparse images underflow to denormals: 1.5x slower on MNIST otherwise
        torch.set_flush_denormal(True)
    vae.train()
    dp = AdaptiveClipDP(vae, dp_plan, clip_bound or dp_plan.clip_init, torch.Generator().manual_seed(secure_seed())) \
        if dp_plan else None
    if dp_plan:
        batches = poisson_batches(len(x), dp_plan.sample_rate, dp_plan.steps_per_round, g)
    else:
        batches = (idx for _ in range(epochs) for idx in _batches(len(x), batch_size, g))
    projector = SpectralProjector(vae.decoder, lipschitz_target, g) if lipschitz == "spectral" else None
    penalised = lipschitz in ("gp", "gp-one-sided") and lipschitz_weight > 0
    anchor = [p.detach().clone() for p in vae.parameters()] if proximal_mu > 0 else []
    total, seen, steps, penalty = 0.0, 0, 0, None
    try:
        for idx in batches:
            steps += 1
            opt.zero_grad(set_to_none=True)
            if len(idx):
                xb, yb = x[idx], one_hot(y_local[idx], cond_dim)
                logits, mu, logvar = vae(xb, yb)
                per_sample = vae_loss(logits, xb, mu, logvar, kl_weight, reduction="none")
                total += float(per_sample.detach().sum())
                seen += len(idx)
            else:  # an empty Poisson batch is still a step: the noise alone is released
                per_sample = None
            if dp:
                dp.private_backward(per_sample)
            elif per_sample is not None:
                loss = per_sample.mean()
                (loss + 0.5 * proximal_mu * proximal_term(vae, anchor) if anchor else loss).backward()
            if penalised:
                if dp:
                    dp.hooks(False)
                pen = gradient_penalty(vae.decoder, batch_size, lipschitz_target, lipschitz == "gp-one-sided", g)
                with warnings.catch_warnings():  # Opacus' (disabled) full backward hooks still warn
                    warnings.simplefilter("ignore", UserWarning)
                    (lipschitz_weight * pen).backward()
                if dp:
                    dp.hooks(True)
                penalty = float(pen.detach())
            opt.step()
            if projector:
                projector.step()
    finally:
        if dp:
            dp.close()
        if projector:
            projector.finish()
    return VAETrainReport(
        total / max(seen, 1), seen, time.perf_counter() - t0, steps,
        clip_bound=dp.clip if dp else None,
        unclipped_fraction=sum(dp.unclipped_fraction) / max(len(dp.unclipped_fraction), 1) if dp else None,
        penalty=penalty,
    )


@torch.no_grad()
def vae_test_loss(vae: VAE, x: torch.Tensor, y: torch.Tensor, label_set: tuple[int, ...], batch_size: int = 1000) -> float:
    """Mean negative ELBO of real held-out images (lower is better)."""
    vae.eval()
    y_local = to_local_labels(y, label_set) if vae.decoder.cond_dim else torch.zeros(len(y), dtype=torch.long)
    total = 0.0
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        logits, mu, logvar = vae(xb, one_hot(y_local[i:i + batch_size], vae.decoder.cond_dim))
        total += float(vae_loss(logits, xb, mu, logvar, reduction="none").sum())
    return total / max(len(x), 1)


def proximal_term(model: nn.Module, anchor: list[torch.Tensor]) -> torch.Tensor:
    """||w - w_anchor||^2 over all parameters, differentiable in w (FedProx, Li et al. 2020)."""
    return sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True))


def train_classifier(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, batch_size: int, lr: float, seed: int = 0,
    optimizer: torch.optim.Optimizer | None = None, proximal_mu: float = 0.0,
) -> float:
    """Supervised training; returns the mean task loss (cross-entropy) of the last epoch.

    Pass ``optimizer`` to keep its state across calls. ``proximal_mu > 0`` adds FedProx's
    ``mu/2 * ||w - w_start||^2`` to the loss, anchored at the weights the model had on entry (the global
    model a silo received), so it pulls the gradient back towards them.
    """
    opt = optimizer or torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else []
    model.train()
    last = float("nan")
    for _ in range(epochs):
        total, seen = 0.0, 0
        for idx in _batches(len(x), batch_size, g):
            task = F.cross_entropy(model(x[idx]), y[idx])
            loss = task + 0.5 * proximal_mu * proximal_term(model, anchor) if anchor else task
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(task.detach()) * len(idx)
            seen += len(idx)
        last = total / max(seen, 1)
    return last


@dataclass
class ClassifierEval:
    accuracy: float
    loss: float
    per_class_accuracy: list[float]  # NaN where the class is absent from the test set
    num_examples: int


@torch.no_grad()
def evaluate_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                        batch_size: int = 1000) -> ClassifierEval:
    model.eval()
    preds, loss = [], 0.0
    for i in range(0, len(x), batch_size):
        out = model(x[i:i + batch_size])
        loss += float(F.cross_entropy(out, y[i:i + batch_size], reduction="sum"))
        preds.append(out.argmax(1))
    pred = torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)
    correct = pred == y
    per_class = []
    for c in range(num_classes):
        mask = y == c
        per_class.append(float(correct[mask].float().mean()) if mask.any() else float("nan"))
    n = len(y)
    return ClassifierEval(float(correct.float().mean()) if n else float("nan"), loss / max(n, 1), per_class, n)
