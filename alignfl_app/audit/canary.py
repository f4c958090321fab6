"""A privacy audit of a released decoder that can serve as evidence: canaries in one training run.

Why: the decoder is the only thing a silo releases, so the audit attacks the decoder alone, and it
reports numbers with stated confidence instead of point estimates that a lucky draw can inflate.

* **Canaries** (``make_canaries``): k images (typically out of domain, e.g. Fashion-MNIST items for an
  MNIST silo), each inserted into the silo's training records or held out by an independent fair coin.
* **Gradient canaries** (``make_gradient_canaries``, ``GradientCanaryInjection``, ``CanaryGradient``): k virtual
  records whose gradient is a Dirac vector on one decoder weight, sampled, clipped and noised as records are; the
  white-box score (``gradient_canary_scores``) is how far the released decoder moved each canary's weight.
* **Attack score** (``reconstruction_scores``): how well the decoder can reproduce a candidate,
  ``-min_z |sigmoid(D(z)) - x|^2`` found by Adam on z with random restarts (higher: more likely a member).
* **Epsilon lower bound** (``epsilon_lower_bound``): Steinke, Nasr, Jagielski, "Privacy Auditing with One
  (1) Training Run" (NeurIPS 2023): guess "in" for the top scores, "out" for the bottom ones, and find
  the largest epsilon that the number of correct guesses refutes at confidence 1 - beta. The search over
  how many guesses to make is paid for with a Bonferroni split of beta.
* **Membership inference** (``membership_report``): AUC and TPR at low FPR with bootstrap intervals.
* **Hubness-robust leakage** (``normalised_leakage``): distance of a record to the decoder's nearest
  sample, divided by the record's own distance to typical data, compared between members and non-members.
* ``run_canary_audit`` and ``run_gradient_canary_audit`` tie it together around an injected trainer, so the
  audit does not depend on how the decoder is trained.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from scipy import optimize, special, stats
from torch import nn
from torch.nn import functional as F

from alignfl_app.privacy.dpsgd import AdaptiveClipDP
from alignfl_app.training import GradientRule, PlainGradient

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DecoderLike = Callable[[torch.Tensor], torch.Tensor]
"""A released decoder: latent batch (B, latent_dim) -> image logits (B, C, H, W) or (B, C*H*W)."""

Trainer = Callable[[torch.Tensor], DecoderLike]
"""Trains on images (N, C, H, W) in [0, 1] and returns the decoder it would release."""

Distance = Literal["bce", "squared"]

GUESS_FRACTIONS: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5)
"""Shares of the canaries guessed "in" (top scores) and "out" (bottom scores); every pair is tried."""


class _Result(BaseModel):
    model_config = ConfigDict(frozen=True, allow_inf_nan=False)


# --------------------------------------------------------------------------------------------- canaries


@dataclass(frozen=True)
class CanarySet:
    """Canary images and, for each, whether its coin put it into the training records."""

    images: torch.Tensor  # (k, C, H, W), values in [0, 1]
    included: torch.Tensor  # (k,) bool
    pool_indices: torch.Tensor  # (k,) where each canary came from in the pool

    @property
    def included_images(self) -> torch.Tensor:
        return self.images[self.included]

    @property
    def held_out_images(self) -> torch.Tensor:
        return self.images[~self.included]


def make_canaries(pool: torch.Tensor, k: int, seed: int) -> CanarySet:
    """Pick k distinct pool images and flip an independent fair coin for each (the audit's randomness).

    The bound is only valid because inclusion is a fair coin independent of everything else, so the
    coins come from their own seeded generator and nothing else decides them.
    """
    if pool.dim() != 4:
        raise ValueError(f"pool must have shape (N, C, H, W), got {tuple(pool.shape)}")
    if not 1 <= k <= len(pool):
        raise ValueError(f"k must be in [1, {len(pool)}] (the pool size), got {k}")
    if pool.numel() and (float(pool.min()) < 0.0 or float(pool.max()) > 1.0):
        raise ValueError("pool values must lie in [0, 1]")
    rng = np.random.default_rng(seed)
    indices = np.sort(rng.choice(len(pool), size=k, replace=False))
    included = rng.integers(0, 2, size=k).astype(bool)
    pool_indices = torch.from_numpy(indices)
    return CanarySet(images=pool[pool_indices].clone(), included=torch.from_numpy(included), pool_indices=pool_indices)


# ----------------------------------------------------------------------------------------- attack score


def _binary_entropy_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over pixels of H(x): the smallest BCE any output can reach for a grey-valued target."""
    return -(torch.special.xlogy(x, x) + torch.special.xlogy(1 - x, 1 - x)).sum(dim=1)


def reconstruction_scores(
    decoder: DecoderLike,
    latent_dim: int,
    x: torch.Tensor,
    steps: int = 100,
    restarts: int = 4,
    seed: int = 0,
    lr: float = 0.1,
    distance: Distance = "squared",
) -> torch.Tensor:
    """Membership score of each candidate: minus how closely the decoder can reproduce it.

    For every candidate and restart a latent z starts from N(0, I) and Adam minimises the distance
    between ``sigmoid(decoder(z))`` and the candidate; all candidates x restarts form one batch (each z
    only enters its own loss, and Adam is per coordinate, so the searches are independent). The best
    loss seen over restarts and steps is kept.

    ``distance="squared"`` (default): squared error summed over pixels. ``"bce"``: binary cross-entropy
    summed over pixels minus the candidate's own entropy, i.e. the Bernoulli KL(x || sigmoid(logits));
    raw BCE has a floor, the entropy of the candidate, that grey-valued images carry whatever their
    membership, so it ranks candidates by greyness (subtracting it is constant in z: the search is the
    same). Squared error has no such floor; on a non-private VAE (600 MNIST records, 500 of 1,000
    Fashion-MNIST canaries included) it separated members at least as well as the KL (AUC 0.571 vs 0.564
    for the small MLP, 0.663 vs 0.649 for the large one; raw BCE: 0.498 and 0.522) and runs faster.
    Returns a (n,) float tensor; higher means more likely a member.
    """
    if steps < 0 or restarts < 1:
        raise ValueError("steps must be >= 0 and restarts >= 1")
    if distance not in ("bce", "squared"):
        raise ValueError(f"distance must be 'bce' or 'squared', got {distance!r}")
    target = x.detach().flatten(1).float()
    n, dim = target.shape
    if n == 0:
        return torch.empty(0)
    batch_target = target.repeat(restarts, 1)
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(restarts * n, latent_dim, generator=generator).requires_grad_(True)
    optimizer = torch.optim.Adam([z], lr=lr)

    def losses() -> torch.Tensor:
        logits = decoder(z).flatten(1)
        if logits.shape != batch_target.shape:
            raise ValueError(
                f"decoder output {tuple(logits.shape)} does not match the candidates' {dim} values per image"
            )
        if distance == "bce":
            return F.binary_cross_entropy_with_logits(logits, batch_target, reduction="none").sum(dim=1)
        return (torch.sigmoid(logits) - batch_target).pow(2).sum(dim=1)

    module_state = _freeze(decoder)
    try:
        with torch.enable_grad():
            best = torch.full((restarts * n,), math.inf)
            for _ in range(steps):
                loss = losses()
                best = torch.minimum(best, loss.detach())
                optimizer.zero_grad(set_to_none=True)
                loss.sum().backward(inputs=[z])  # the decoder's weights need no gradient
                optimizer.step()
            with torch.no_grad():
                best = torch.minimum(best, losses())
    finally:
        _restore(decoder, module_state)
    best_per_candidate = best.view(restarts, n).min(dim=0).values
    if distance == "bce":
        best_per_candidate = best_per_candidate - _binary_entropy_sum(target)
    return -best_per_candidate


@torch.no_grad()
def elbo_scores(vae: nn.Module, x: torch.Tensor, samples: int = 16, seed: int = 0, batch: int = 500) -> torch.Tensor:
    """Membership score from the whole trained VAE (encoder and decoder): minus each candidate's negative ELBO,
    averaged over ``samples`` posterior draws. A white-box attack on everything DP-SGD trained, so a bound from it
    is still a bound on the mechanism's epsilon; it sees memorisation the decoder's manifold hides."""
    from alignfl_app.models.vae import vae_loss

    g = torch.Generator().manual_seed(seed)
    vae.eval()
    out = []
    for i in range(0, len(x), batch):
        xb = x[i : i + batch]
        mu, logvar = vae.encoder(xb)
        total = torch.zeros(len(xb))
        for _ in range(samples):
            z = mu + torch.randn(mu.shape, generator=g) * torch.exp(0.5 * logvar)
            total += vae_loss(vae.decoder(z), xb, mu, logvar, reduction="none")
        out.append(-total / samples)
    return torch.cat(out)


def _freeze(decoder: DecoderLike) -> tuple[bool, list[bool]] | None:
    """Eval mode and no weight gradients during the attack; returns what to restore afterwards."""
    if not isinstance(decoder, nn.Module):
        return None
    params = list(decoder.parameters())
    state = (decoder.training, [p.requires_grad for p in params])
    decoder.eval()
    for p in params:
        p.requires_grad_(False)
    return state


def _restore(decoder: DecoderLike, state: tuple[bool, list[bool]] | None) -> None:
    if state is None or not isinstance(decoder, nn.Module):
        return
    training, requires_grad = state
    decoder.train(training)
    for p, flag in zip(decoder.parameters(), requires_grad, strict=True):
        p.requires_grad_(flag)


# ------------------------------------------------------------------------------ one-run epsilon bound


class EpsilonLowerBound(_Result):
    """The largest epsilon the canaries refute at confidence 1 - beta, and the guess that achieved it."""

    epsilon: float
    guesses: int  # r = k_plus + k_minus
    correct: int  # v
    k_plus: int  # top-scored canaries guessed "included"
    k_minus: int  # bottom-scored canaries guessed "held out"
    num_canaries: int  # m
    delta: float
    beta: float  # total failure probability, over the whole (k_plus, k_minus) search
    grid_size: int  # number of (k_plus, k_minus) pairs tried; each is tested at beta / grid_size


def one_run_p_value(num_canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """Upper bound on P[correct guesses >= v] for any (epsilon, delta)-DP training (Steinke et al. 2023).

    With q = e^eps / (1 + e^eps) and B ~ Binomial(r, q):
    ``P[W >= v] <= P[B >= v] + 2 m delta * max_{i=1..v} P[v - i <= B < v] / i``.
    """
    m, r, v = num_canaries, guesses, correct
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= correct <= guesses <= canaries, got {v}, {r}, {m}")
    if v == 0:
        return 1.0
    q = float(special.expit(epsilon))
    tail = float(stats.binom.sf(v - 1, r, q))
    if delta == 0:
        return tail
    below = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[B = v-1], P[B = v-2], ..., P[B = 0]
    window = np.cumsum(below) / np.arange(1, v + 1)  # P[v - i <= B < v] / i for i = 1..v
    return min(1.0, tail + 2 * m * delta * float(window.max()))


def epsilon_for_counts(num_canaries: int, guesses: int, correct: int, delta: float, level: float) -> float:
    """The smallest epsilon that v correct out of r guesses fails to refute at significance ``level``.

    Every epsilon below the returned value is refuted (p-value <= level), so "true epsilon < bound"
    happens with probability <= level. The p-value increases with epsilon when c = 2 m delta <= 1: each
    term of its max is (1 - c/i) P[B >= v] + (c/i) P[B >= v - i], a non-negative mix of tails that grow
    with q. So the boundary is found by root finding between 0 and the delta = 0 bound, which is exact:
    P[B >= v] <= level iff q <= the level-quantile of Beta(v, r - v + 1) (Clopper-Pearson).
    """
    if 2 * num_canaries * delta > 1:
        raise ValueError(f"delta={delta} is too large for {num_canaries} canaries (need 2 m delta <= 1)")
    if correct == 0 or one_run_p_value(num_canaries, guesses, correct, 0.0, delta) > level:
        return 0.0
    q_max = float(stats.beta.ppf(level, correct, guesses - correct + 1))
    eps_max = float(special.logit(q_max)) if q_max < 1 else math.inf
    if delta == 0:
        return max(eps_max, 0.0)
    if not math.isfinite(eps_max):
        eps_max = 50.0

    def excess(eps: float) -> float:
        return one_run_p_value(num_canaries, guesses, correct, eps, delta) - level

    if excess(eps_max) <= 0:
        return eps_max
    return float(optimize.brentq(excess, 0.0, eps_max, xtol=1e-6))


def guess_grid(num_canaries: int, fractions: Sequence[float] = GUESS_FRACTIONS) -> list[tuple[int, int]]:
    """Distinct (k_plus, k_minus) pairs: every pair of shares, at least one guess each, r <= m."""
    counts = sorted({max(1, round(f * num_canaries)) for f in fractions})
    return [(kp, km) for kp in counts for km in counts if kp + km <= num_canaries]


def epsilon_lower_bound(
    scores: torch.Tensor | np.ndarray,
    included: torch.Tensor | np.ndarray,
    delta: float,
    beta: float = 0.05,
    fractions: Sequence[float] = GUESS_FRACTIONS,
) -> EpsilonLowerBound:
    """One-run epsilon lower bound from canary scores and their true inclusion coins.

    For each (k_plus, k_minus) of ``guess_grid``: guess "in" for the k_plus highest scores, "out" for
    the k_minus lowest (ties broken by canary order, which is independent of the coins), abstain on the
    rest; count correct guesses v of r. Each pair is tested at level beta / G (Bonferroni over the G
    pairs), so the reported maximum over the grid is below the true epsilon with probability >= 1 - beta
    although the best pair was chosen after seeing the scores.
    """
    s = np.asarray(torch.as_tensor(scores).detach().cpu(), dtype=np.float64).ravel()
    inc = np.asarray(torch.as_tensor(included).detach().cpu(), dtype=bool).ravel()
    m = len(s)
    if len(inc) != m or m < 2:
        raise ValueError("need at least 2 canaries and one inclusion bit per score")
    if not 0 < beta < 1 or delta < 0:
        raise ValueError("need 0 < beta < 1 and delta >= 0")
    if 2 * m * delta > 1:
        raise ValueError(f"delta={delta} is too large for {m} canaries (need 2 m delta <= 1)")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    order = np.argsort(-s, kind="stable")
    in_sorted = inc[order]
    top_in = np.concatenate([[0], np.cumsum(in_sorted)])  # members among the top j
    bottom_out = np.concatenate([[0], np.cumsum(~in_sorted[::-1])])  # non-members among the bottom j
    grid = guess_grid(m, fractions)
    level = beta / len(grid)
    kp = np.array([g[0] for g in grid])
    km = np.array([g[1] for g in grid])
    r = kp + km
    v = top_in[kp] + bottom_out[km]
    # The delta = 0 bound is an upper limit of the delta > 0 one: try pairs in its order and stop early.
    q_max = np.where(v > 0, stats.beta.ppf(level, np.maximum(v, 1), r - v + 1), 0.0)
    eps_no_delta = np.where(q_max > 0.5, special.logit(np.clip(q_max, 0.5, 1 - 1e-16)), 0.0)
    best_eps, best_idx = 0.0, None
    for idx in np.argsort(-eps_no_delta, kind="stable"):
        if eps_no_delta[idx] <= best_eps:
            break
        eps = epsilon_for_counts(m, int(r[idx]), int(v[idx]), delta, level)
        if eps > best_eps:
            best_eps, best_idx = eps, int(idx)
    if best_idx is None:  # nothing refuted: report the pair with the most significant count at epsilon 0
        best_idx = int(np.argmin(stats.binom.sf(v - 1, r, 0.5)))
    return EpsilonLowerBound(
        epsilon=best_eps,
        guesses=int(r[best_idx]),
        correct=int(v[best_idx]),
        k_plus=int(kp[best_idx]),
        k_minus=int(km[best_idx]),
        num_canaries=m,
        delta=delta,
        beta=beta,
        grid_size=len(grid),
    )


# --------------------------------------------------------------------------------- membership inference


class MembershipReport(_Result):
    """AUC and TPR at low FPR with bootstrap 95% intervals (members and non-members resampled apart).

    A TPR at FPR f needs at least 1/f non-members (else no threshold allows even one false positive);
    below that it is None rather than a number read off an empty tail.
    """

    auc: float
    auc_ci: tuple[float, float]
    tpr_at_fpr_1e_2: float | None
    tpr_at_fpr_1e_2_ci: tuple[float, float] | None
    tpr_at_fpr_1e_3: float | None
    tpr_at_fpr_1e_3_ci: tuple[float, float] | None
    num_members: int
    num_nonmembers: int
    n_boot: int


def _auc_rows(members: np.ndarray, nonmembers: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC of each row pair (ties count half), via average ranks."""
    n1, n0 = members.shape[1], nonmembers.shape[1]
    ranks = stats.rankdata(np.concatenate([members, nonmembers], axis=1), axis=1)
    return (ranks[:, :n1].sum(axis=1) - n1 * (n1 + 1) / 2) / (n1 * n0)


def _allowed_false_positives(fpr: float, num_nonmembers: int) -> int:
    return math.floor(fpr * num_nonmembers + 1e-9)


def _tpr_rows(members: np.ndarray, nonmembers: np.ndarray, fpr: float) -> np.ndarray | None:
    """TPR of each row at a threshold letting at most floor(fpr * n0) non-members score above it.

    The threshold is the (floor(fpr * n0) + 1)-th highest non-member score and a member counts only if
    strictly above it, so the empirical FPR never exceeds the target (ties go against the attack).
    """
    allowed = _allowed_false_positives(fpr, nonmembers.shape[1])
    if allowed < 1:
        return None
    threshold = -np.partition(-nonmembers, allowed, axis=1)[:, allowed]
    return (members > threshold[:, None]).mean(axis=1)


def _interval(values: np.ndarray) -> tuple[float, float]:
    low, high = np.quantile(values, [0.025, 0.975])
    return float(low), float(high)


def membership_report(
    member_scores: torch.Tensor | np.ndarray, nonmember_scores: torch.Tensor | np.ndarray, seed: int, n_boot: int = 1000
) -> MembershipReport:
    """Membership-inference statistics of a score (higher: more likely a member) with percentile CIs."""
    mem = np.asarray(torch.as_tensor(member_scores).detach().cpu(), dtype=np.float64).ravel()
    non = np.asarray(torch.as_tensor(nonmember_scores).detach().cpu(), dtype=np.float64).ravel()
    if len(mem) == 0 or len(non) == 0:
        raise ValueError("need at least one member and one non-member score")
    if n_boot < 1:
        raise ValueError("n_boot must be >= 1")
    rng = np.random.default_rng(seed)
    auc = float(_auc_rows(mem[None], non[None])[0])
    tpr = {f: _tpr_rows(mem[None], non[None], f) for f in (1e-2, 1e-3)}
    boot_auc, boot_tpr = [], {f: [] for f in tpr}
    rows_per_chunk = max(1, 2_000_000 // (len(mem) + len(non)))
    for start in range(0, n_boot, rows_per_chunk):
        rows = min(rows_per_chunk, n_boot - start)
        mem_b = mem[rng.integers(0, len(mem), size=(rows, len(mem)))]
        non_b = non[rng.integers(0, len(non), size=(rows, len(non)))]
        boot_auc.append(_auc_rows(mem_b, non_b))
        for f in tpr:
            if tpr[f] is not None:
                boot_tpr[f].append(_tpr_rows(mem_b, non_b, f))

    def point(f: float) -> float | None:
        return None if tpr[f] is None else float(tpr[f][0])

    def ci(f: float) -> tuple[float, float] | None:
        return None if tpr[f] is None else _interval(np.concatenate(boot_tpr[f]))

    return MembershipReport(
        auc=auc,
        auc_ci=_interval(np.concatenate(boot_auc)),
        tpr_at_fpr_1e_2=point(1e-2),
        tpr_at_fpr_1e_2_ci=ci(1e-2),
        tpr_at_fpr_1e_3=point(1e-3),
        tpr_at_fpr_1e_3_ci=ci(1e-3),
        num_members=len(mem),
        num_nonmembers=len(non),
        n_boot=n_boot,
    )


def roc_curve(
    member_scores: Sequence[float] | np.ndarray, nonmember_scores: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every distinct threshold, "member" meaning score >= threshold; starts at (0, 0)."""
    mem = np.asarray(member_scores, dtype=np.float64)
    non = np.asarray(nonmember_scores, dtype=np.float64)
    thresholds = np.unique(np.concatenate([mem, non]))[::-1]
    tpr = len(mem) - np.searchsorted(np.sort(mem), thresholds, side="left")
    fpr = len(non) - np.searchsorted(np.sort(non), thresholds, side="left")
    return np.concatenate([[0.0], fpr / len(non)]), np.concatenate([[0.0], tpr / len(mem)])


# ------------------------------------------------------------------------------- normalised leakage


class NormalisedLeakage(_Result):
    """Members vs non-members by distance to the decoder's samples in units of their own local scale.

    ``membership`` scores each record by minus (distance to nearest decoder sample) / (distance to its
    ``neighbours``-th nearest typical record). AUC 0.5: the samples are as near to held-out outliers as to
    trained ones, however many samples land near outliers.
    """

    membership: MembershipReport
    neighbours: int
    member_median_ratio: float
    nonmember_median_ratio: float
    num_samples: int


def _nearest_distances(queries: torch.Tensor, refs: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance of each query to its k-th nearest reference row (Euclidean, chunked cdist)."""
    q, r = queries.flatten(1).double(), refs.flatten(1).double()
    if len(r) < k:
        raise ValueError(f"need at least {k} reference rows, got {len(r)}")
    out = []
    for start in range(0, len(q), chunk):
        d = torch.cdist(q[start : start + chunk], r)
        out.append(torch.topk(d, k, dim=1, largest=False).values[:, k - 1])
    return torch.cat(out) if out else torch.empty(0)


def normalised_leakage(
    samples: torch.Tensor,
    members: torch.Tensor,
    nonmembers: torch.Tensor,
    typical: torch.Tensor,
    neighbours: int = 5,
    seed: int = 0,
    n_boot: int = 1000,
    chunk: int = 1024,
) -> NormalisedLeakage:
    """Hubness-robust leakage: does the decoder sit nearer to its own outliers than to fresh ones?

    Why: blurry samples of a DP decoder are hubs, near every outlier whether trained on or not, so
    "share of samples nearest an outlier" measures blur, not memory. Dividing each record's distance to
    the nearest sample by its distance to its k-th nearest typical record (a local scale, as in CSLS /
    hubness reduction) makes records in sparse and dense regions comparable; comparing members with
    held-out non-members of the same source removes what any decoder would show.
    """
    candidates = torch.cat([members, nonmembers])

    def ratios() -> torch.Tensor:
        to_samples = _nearest_distances(candidates, samples, 1, chunk)
        scale = _nearest_distances(candidates, typical, neighbours, chunk).clamp_min(1e-12)
        return to_samples / scale

    with torch.no_grad():
        ratio = ratios()
    member_ratio, nonmember_ratio = ratio[: len(members)], ratio[len(members) :]
    report = membership_report(-member_ratio, -nonmember_ratio, seed=seed, n_boot=n_boot)
    return NormalisedLeakage(
        membership=report,
        neighbours=neighbours,
        member_median_ratio=float(member_ratio.median()),
        nonmember_median_ratio=float(nonmember_ratio.median()),
        num_samples=len(samples),
    )


# ------------------------------------------------------------------------------------- report and plot


class AuditReport(_Result):
    """Everything one canary audit found, JSON-serialisable (``report.model_dump_json()``)."""

    epsilon_bound: EpsilonLowerBound
    membership: MembershipReport
    member_scores: list[float]  # attack scores of the included canaries
    nonmember_scores: list[float]  # attack scores of the held-out canaries
    attack: str  # how the scores were computed
    seed: int
    leakage: NormalisedLeakage | None = None


def audit_figure(report: AuditReport) -> Figure:
    """ROC on log-log axes (with the chance line) and the score histograms.

    Both axes span [max(1 / n0, 1e-3), 1] (n0 = non-members): down to the smallest FPR the data can
    show, the same range on both so the chance line is the diagonal; nothing is cut off to make the
    curve look better. Points with TPR 0 cannot be drawn on a log axis and are left out.
    """
    from matplotlib.figure import Figure

    mem, non = np.asarray(report.member_scores), np.asarray(report.nonmember_scores)
    fpr, tpr = roc_curve(mem, non)
    low = max(1.0 / len(non), 1e-3)
    fig = Figure(figsize=(10, 4.2))
    ax_roc, ax_hist = fig.subplots(1, 2)
    visible = (fpr > 0) & (tpr > 0)
    ax_roc.plot(fpr[visible], tpr[visible], label=f"attack (AUC {report.membership.auc:.3f})")
    ax_roc.plot([low, 1], [low, 1], "k--", linewidth=1, label="chance (TPR = FPR)")
    ax_roc.set_xscale("log")
    ax_roc.set_yscale("log")
    ax_roc.set_xlim(low, 1)
    ax_roc.set_ylim(low, 1)
    ax_roc.set_xlabel("false positive rate")
    ax_roc.set_ylabel("true positive rate")
    bound = report.epsilon_bound
    ax_roc.set_title(f"eps >= {bound.epsilon:.2f} (conf. {1 - bound.beta:.0%}, delta {bound.delta:g})")
    ax_roc.legend(loc="lower right")
    bins = np.histogram_bin_edges(np.concatenate([mem, non]), bins=40)
    ax_hist.hist(non, bins=bins, alpha=0.6, label=f"held out ({len(non)})")
    ax_hist.hist(mem, bins=bins, alpha=0.6, label=f"included ({len(mem)})")
    ax_hist.set_xlabel("attack score (higher: more likely a member)")
    ax_hist.set_ylabel("canaries")
    ax_hist.legend()
    fig.tight_layout()
    return fig


def save_audit_plot(report: AuditReport, path: str | Path) -> Path:
    """Write ``audit_figure(report)`` to ``path`` (format from the suffix); returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = audit_figure(report)
    FigureCanvasAgg(fig)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


# ------------------------------------------------------------------------------------- gradient canaries


@dataclass(frozen=True)
class GradientCanarySet:
    """Dirac gradient canaries: canary i is a virtual record whose gradient is non-zero in one decoder coordinate.

    Why: these small VAEs generalise from any image, so an image canary leaves no trace an attack can find; a
    gradient along a coordinate that real records barely move is the strongest canary a white-box auditor (who
    may inject gradients and sees the initial and released decoder) can plant, and it is what DP-SGD must hide.
    """

    coordinates: torch.Tensor  # (k,) long, distinct: flat indices into ``flat_parameters(decoder)``
    directions: torch.Tensor  # (k,) float, +1 or -1: the way a descent step on the canary alone moves its coordinate
    included: torch.Tensor  # (k,) bool: its fair coin

    @property
    def num_included(self) -> int:
        return int(self.included.sum())


def make_gradient_canaries(
    candidates: torch.Tensor, k: int, seed: int, drift: torch.Tensor | None = None
) -> GradientCanarySet:
    """k distinct coordinates drawn from ``candidates``, each with a direction and an independent fair coin (from
    their own seeded generator, as ``make_canaries``: the bound needs coins independent of everything else).

    ``drift``: how a run without canaries moved every coordinate (flat, as ``flat_parameters``); each canary then
    pushes against it (a random direction where it is 0). Why: Adam scales a coordinate's steps by its gradient's
    RMS, which a canary inflates, so a member's coordinate follows the data's drift less than a non-member's;
    pushing against the drift makes that loss add to the canary's own push instead of cancelling it (one run
    without DP, random directions: AUC 0.80 for the canaries along the drift, 0.998 for those against it). Any
    choice made independently of the coins keeps the bound valid.
    """
    if candidates.dim() != 1 or len(torch.unique(candidates)) != len(candidates):
        raise ValueError("candidates must be a 1-d tensor of distinct coordinates")
    if not 1 <= k <= len(candidates):
        raise ValueError(f"k must be in [1, {len(candidates)}] (the candidate coordinates), got {k}")
    rng = np.random.default_rng(seed)
    coordinates = candidates[torch.from_numpy(np.sort(rng.choice(len(candidates), size=k, replace=False)))].long()
    included = torch.from_numpy(rng.integers(0, 2, size=k).astype(bool))
    directions = torch.from_numpy(rng.choice(np.array([-1.0, 1.0]), size=k)).float()
    if drift is not None:
        against = -torch.sign(drift[coordinates]).float()
        directions = torch.where(against != 0, against, directions)
    return GradientCanarySet(coordinates=coordinates, directions=directions, included=included)


def flat_parameters(module: nn.Module) -> torch.Tensor:
    """Every parameter of ``module`` in one detached vector (``parameters()`` order): what canary coordinates index."""
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def last_layer_weights(decoder: nn.Module) -> torch.Tensor:
    """Flat coordinates of the decoder's last weight tensor: the largest pool of coordinates, each of which one real
    record's gradient barely touches (one hidden unit times one pixel)."""
    params = list(decoder.parameters())
    offsets = np.cumsum([0] + [p.numel() for p in params])
    last = max(i for i, p in enumerate(params) if p.dim() >= 2)
    return torch.arange(int(offsets[last]), int(offsets[last + 1]))


def gradient_canary_scores(
    canaries: GradientCanarySet, initial: torch.Tensor, released: torch.Tensor, reference: torch.Tensor | None = None
) -> torch.Tensor:
    """Membership score of each canary: how far the released decoder moved its coordinate in its direction, minus
    how far a ``reference`` run without canaries moved it (flat vectors, as ``flat_parameters``).

    Adam (the silo's optimiser) steps a coordinate by about its running mean gradient over its running RMS, so the
    displacement is about (canary sum + data sum + noise sum) / RMS: a linear statistic of the canary, the one
    DP-SGD has to mask. The reference removes the data's own drift, which without DP is the only thing beside the
    canary (the runs start from the same weights); under DP its noise is independent of the release's, so
    subtracting it only adds variance and the caller leaves it out.
    """
    moved = released - initial if reference is None else released - reference
    return moved[canaries.coordinates] * canaries.directions


class GradientCanaryInjection:
    """The included canaries as records ``n .. n + m - 1`` of one generator group of ``n`` real records.

    ``batches`` takes the session's own batches over all ``n + m`` records (Poisson at rate q per step under DP,
    once per epoch in shuffled batches without), hands the real indices to the trainer and keeps the canaries of
    the same batch for ``CanaryGradient``: canaries are sampled exactly as records are. Nothing in the silo's
    training code knows about them; the audit wraps the session's batches and rule.
    """

    def __init__(self, canaries: GradientCanarySet, num_records: int, magnitude: float) -> None:
        if magnitude <= 0:
            raise ValueError("magnitude must be positive")
        self.coordinates = canaries.coordinates[canaries.included]
        self.directions = canaries.directions[canaries.included]
        self.num_records, self.magnitude = num_records, float(magnitude)
        self.current = torch.zeros(0, dtype=torch.long)  # the included canaries (0..m-1) in the current batch
        self.sampled = torch.zeros(len(self.coordinates), dtype=torch.long)  # how often each was in a batch

    @property
    def num_virtual(self) -> int:
        return len(self.coordinates)

    def batches(self, batches: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Split batches over real + virtual records: yield the real indices, keep the canaries in ``current``."""
        for idx in batches:
            real = idx < self.num_records
            self.current = idx[~real] - self.num_records
            self.sampled += torch.bincount(self.current, minlength=self.num_virtual)
            yield idx[real]

    def rule(self, rule: GradientRule, model: nn.Module, decoder: nn.Module) -> CanaryGradient:
        return CanaryGradient(rule, self, model, decoder)


class CanaryGradient:
    """A gradient rule that also trains on the current batch's canaries, as the wrapped rule would train on records.

    * Under DP (``AdaptiveClipDP``): each canary is a record whose gradient has norm C, the step's clip bound, so it
      is clipped as the rule clips it (by C / (C + 1e-6)), summed with the records' clipped gradients before the
      noise and divided by the same expected batch: adding ``sum canaries / expected_batch`` after the rule's noisy
      mean is the same arithmetic, since the noise does not depend on the batch. It counts as unclipped in the
      adaptive bound's noisy count (norm C <= C), so the bound moves as it would. Identical to the mechanism but
      for float rounding order and the forward pass a canary does not have (no reparameterisation draw of its own).
    * Without DP (``PlainGradient``): the batch mean runs over records and canaries, each canary's gradient being
      ``magnitude`` along its coordinate.
    """

    def __init__(
        self, rule: GradientRule, injection: GradientCanaryInjection, model: nn.Module, decoder: nn.Module
    ) -> None:
        if not isinstance(rule, (AdaptiveClipDP, PlainGradient)):
            raise TypeError(f"gradient canaries know AdaptiveClipDP and PlainGradient, not {type(rule).__name__}")
        self.inner, self.injection, self.private = rule, injection, isinstance(rule, AdaptiveClipDP)
        self.model_params = [p for p in model.parameters() if p.requires_grad]
        self.decoder_params = list(decoder.parameters())
        if not {id(p) for p in self.decoder_params} <= {id(p) for p in self.model_params}:
            raise ValueError("the decoder's parameters must be trained parameters of the model")
        self.offsets = torch.tensor(np.cumsum([0] + [p.numel() for p in self.decoder_params]))
        if len(injection.coordinates) and int(injection.coordinates.max()) >= int(self.offsets[-1]):
            raise ValueError("a canary coordinate lies outside the decoder's parameters")

    def backward(self, per_record_loss: torch.Tensor | None) -> None:
        canaries = self.injection.current
        if self.private:
            rule = self.inner
            clip = rule.clip  # the step's bound, before the rule moves it
            rule.backward(per_record_loss)
            value = clip * min(1.0, clip / (clip + 1e-6)) / rule.noise.expected_batch
            shift = 0.5 * len(canaries) / rule.noise.expected_batch  # each canary: +1 unclipped, +1 batch size
            rule.unclipped_fraction[-1] += shift
            rule.clip *= math.exp(-rule.plan.clip_lr * shift)
        else:
            real = 0 if per_record_loss is None else len(per_record_loss)
            total = real + len(canaries)
            if total == 0:
                return
            if per_record_loss is not None:
                self.inner.backward(per_record_loss * (real / total))  # the mean over records and canaries
            value = self.injection.magnitude / total
        if len(canaries):
            self._add(canaries, value)

    def _add(self, canaries: torch.Tensor, value: float) -> None:
        coordinates = self.injection.coordinates[canaries]
        directions = self.injection.directions[canaries]
        for p in self.model_params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)  # a batch of canaries only: the records contribute zero
        owner = torch.searchsorted(self.offsets, coordinates, right=True) - 1
        for i, p in enumerate(self.decoder_params):
            mine = owner == i
            if mine.any():
                # a descent step moves the coordinate by -gradient: the canary's gradient is -direction * value
                p.grad.view(-1).index_add_(0, coordinates[mine] - self.offsets[i], -directions[mine] * value)

    def data_free(self) -> contextlib.AbstractContextManager:
        return self.inner.data_free()

    def report(self) -> dict[str, float]:
        return self.inner.report()

    def close(self) -> None:
        self.inner.close()


# -------------------------------------------------------------------------------------------- the audit


def run_canary_audit(
    train: Trainer,
    records: torch.Tensor,
    pool: torch.Tensor,
    k: int,
    latent_dim: int,
    delta: float,
    seed: int,
    beta: float = 0.05,
    steps: int = 100,
    restarts: int = 4,
    distance: Distance = "squared",
    n_boot: int = 1000,
    calibrate: bool = True,
) -> AuditReport:
    """Canaries -> one training run through ``train`` -> decoder attack -> bound and membership report.

    The included canaries are shuffled into the records (seeded) so that a trainer that does not shuffle
    still sees them spread out. ``train`` gets images only and returns the decoder it would release.
    ``calibrate``: the score is the target decoder's reconstruction score minus that of a reference decoder
    trained the same way on the records alone (no canary). It removes how easy each canary is to draw for any
    decoder of this data, which otherwise swamps the membership signal; the reference never sees a coin, so the
    bound stays valid.
    """
    canaries = make_canaries(pool, k, seed)
    training_images = torch.cat([records, canaries.included_images])
    order = torch.randperm(len(training_images), generator=torch.Generator().manual_seed(seed))
    decoder = train(training_images[order])
    scores = reconstruction_scores(
        decoder, latent_dim, canaries.images, steps=steps, restarts=restarts, seed=seed, distance=distance
    )
    attack = f"decoder reconstruction ({distance}, {restarts} restarts x {steps} Adam steps)"
    if calibrate:
        reference = train(records[torch.randperm(len(records), generator=torch.Generator().manual_seed(seed + 1))])
        scores = scores - reconstruction_scores(
            reference, latent_dim, canaries.images, steps=steps, restarts=restarts, seed=seed, distance=distance
        )
        attack += ", minus a reference decoder's trained without canaries"
    bound = epsilon_lower_bound(scores, canaries.included, delta, beta=beta)
    member, nonmember = scores[canaries.included], scores[~canaries.included]
    report = membership_report(member, nonmember, seed=seed, n_boot=n_boot)
    return AuditReport(
        epsilon_bound=bound,
        membership=report,
        member_scores=member.tolist(),
        nonmember_scores=nonmember.tolist(),
        seed=seed,
        attack=attack,
    )


GradientTrainer = Callable[[GradientCanaryInjection | None], nn.Module]
"""One training run from the auditor's known initial weights, with the injection's canaries (or none); returns the
decoder it releases."""


def run_gradient_canary_audit(
    train: GradientTrainer,
    initial: nn.Module,
    num_records: int,
    k: int,
    delta: float,
    seed: int,
    magnitude: float,
    calibrate: bool,
    beta: float = 0.05,
    n_boot: int = 1000,
) -> AuditReport:
    """Gradient canaries -> one training run -> coordinate displacements -> bound and membership report.

    ``initial``: the decoder every run starts from. ``calibrate``: first train a reference run without canaries;
    the canaries push against its drift and the scores subtract it (``gradient_canary_scores``): right without DP,
    where that drift is the data's, only added variance under DP, where it is mostly noise. ``magnitude``: a
    canary's gradient norm without DP (under DP it is the step's clip bound, whatever this says).
    """
    start = flat_parameters(initial)
    reference = flat_parameters(train(None)) if calibrate else None
    canaries = make_gradient_canaries(
        last_layer_weights(initial), k, seed, drift=None if reference is None else reference - start
    )
    released = flat_parameters(train(GradientCanaryInjection(canaries, num_records, magnitude)))
    scores = gradient_canary_scores(canaries, start, released, reference)
    bound = epsilon_lower_bound(scores, canaries.included, delta, beta=beta)
    member, nonmember = scores[canaries.included], scores[~canaries.included]
    attack = "gradient canaries (Dirac, last decoder layer): coordinate displacement"
    if calibrate:
        attack += " minus a reference run's without canaries"
    return AuditReport(
        epsilon_bound=bound,
        membership=membership_report(member, nonmember, seed=seed, n_boot=n_boot),
        member_scores=member.tolist(),
        nonmember_scores=nonmember.tolist(),
        seed=seed,
        attack=attack,
    )
