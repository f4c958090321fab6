"""The canary audit: canaries, the decoder attack, the one-run epsilon bound and its statistics."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import special, stats
from torch import nn

from alignfl_app.canary import (
    GUESS_FRACTIONS,
    AuditReport,
    audit_figure,
    epsilon_for_counts,
    epsilon_lower_bound,
    guess_grid,
    make_canaries,
    membership_report,
    normalised_leakage,
    one_run_p_value,
    reconstruction_scores,
    run_canary_audit,
    save_audit_plot,
)

IMAGE = (1, 8, 8)
LATENT = 32


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def binary_images(n: int, seed: int) -> torch.Tensor:
    """Random black-and-white 8x8 images: distinct, far apart (about 32 differing pixels)."""
    return torch.bernoulli(torch.full((n, *IMAGE), 0.5), generator=torch.Generator().manual_seed(seed))


def randomized_response(epsilon: float, m: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Coins and an epsilon-DP release of each coin: the true bit with probability e^eps / (1 + e^eps)."""
    rng = np.random.default_rng(seed)
    included = rng.integers(0, 2, m).astype(bool)
    truthful = rng.random(m) < special.expit(epsilon)
    return np.where(truthful, included, ~included).astype(float), included


class MemorisingDecoder(nn.Module):
    """Releases its training images: the latent selects among them (softmax over one key per image).

    The softmax is kept soft (unit keys) so that the decoder is smooth in z, as a trained one is, and a
    gradient search from random latents can reach the stored images.
    """

    def __init__(self, images: torch.Tensor, seed: int, sharpness: float = 1.0) -> None:
        super().__init__()
        keys = torch.randn(len(images), LATENT, generator=torch.Generator().manual_seed(seed))
        self.keys = nn.Parameter(sharpness * keys / keys.norm(dim=1, keepdim=True))
        self.register_buffer("images", images.flatten(1).clone())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        mixed = torch.softmax(z @ self.keys.T, dim=1) @ self.images
        return torch.logit(mixed.clamp(1e-4, 1 - 1e-4)).view(-1, *IMAGE)


def memorising_trainer(images: torch.Tensor) -> nn.Module:
    return MemorisingDecoder(images, seed=0)


def ignoring_trainer(images: torch.Tensor) -> nn.Module:
    """A decoder that never looked at its data."""
    with torch.random.fork_rng():
        torch.manual_seed(123)
        return nn.Sequential(nn.Linear(LATENT, 64), nn.ReLU(), nn.Linear(64, math.prod(IMAGE)),
                             nn.Unflatten(1, IMAGE))


# ------------------------------------------------------------------------------------------- canaries


def test_canaries_are_seeded_distinct_and_fair_coins():
    pool = torch.rand(5000, *IMAGE)
    a, b, c = make_canaries(pool, 2000, seed=3), make_canaries(pool, 2000, seed=3), make_canaries(pool, 2000, 4)
    assert torch.equal(a.images, b.images) and torch.equal(a.included, b.included)
    assert not torch.equal(a.included, c.included)
    assert len(set(a.pool_indices.tolist())) == 2000
    assert torch.equal(a.images, pool[a.pool_indices])
    assert 0.45 < a.included.float().mean() < 0.55  # fair coin: 1,000 expected, sd 22
    assert len(a.included_images) + len(a.held_out_images) == 2000
    with pytest.raises(ValueError):
        make_canaries(pool, 5001, seed=0)
    with pytest.raises(ValueError):
        make_canaries(pool * 2, 10, seed=0)


# ------------------------------------------------------------------------------------ the p-value


def test_p_value_is_the_binomial_tail_plus_a_delta_term_and_grows_with_epsilon():
    m, r, v = 1000, 200, 150
    for eps in (0.0, 0.5, 1.0, 2.0):
        assert one_run_p_value(m, r, v, eps, 0.0) == pytest.approx(stats.binom.sf(v - 1, r, special.expit(eps)))
    # The delta term, written out: 2 m delta max_i P[v - i <= B < v] / i.
    q = special.expit(1.0)
    window = max(sum(stats.binom.pmf(v - j, r, q) for j in range(1, i + 1)) / i for i in range(1, v + 1))
    expected = stats.binom.sf(v - 1, r, q) + 2 * m * 1e-5 * window
    assert one_run_p_value(m, r, v, 1.0, 1e-5) == pytest.approx(expected, rel=1e-9)
    p = [one_run_p_value(m, r, v, eps, 1e-4) for eps in np.linspace(0, 6, 61)]
    assert all(b >= a for a, b in zip(p, p[1:]))


def test_bound_for_counts_is_the_boundary_of_the_refuted_epsilons():
    level = 0.05 / 64
    for r, v, delta in ((1000, 1000, 0.0), (1000, 900, 1e-5), (300, 250, 1e-5), (100, 80, 0.0)):
        eps = epsilon_for_counts(1000, r, v, delta, level)
        assert eps > 0
        assert one_run_p_value(1000, r, v, eps - 1e-3, delta) <= level < one_run_p_value(1000, r, v, eps + 1e-3, delta)


def test_no_bound_when_at_most_half_the_guesses_are_right():
    for r in (1, 2, 10, 101, 1000):
        for v in range(0, r // 2 + 1, max(1, r // 20)):
            assert epsilon_for_counts(1000, r, v, 1e-5, 0.05) == 0.0


def test_grid_pairs_are_distinct_and_fit_the_canaries():
    grid = guess_grid(1000)
    assert len(grid) == len(set(grid)) == len(GUESS_FRACTIONS) ** 2
    assert all(kp >= 1 and km >= 1 and kp + km <= 1000 for kp, km in grid)
    small = guess_grid(20)  # 1% and 2% of 20 both round to at least one guess: counted once
    assert len(small) == len(set(small)) < len(GUESS_FRACTIONS) ** 2


# --------------------------------------------------------------------------- the bound on known cases


def test_scores_unrelated_to_inclusion_give_no_bound():
    bounds = []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        result = epsilon_lower_bound(rng.random(1000), rng.integers(0, 2, 1000).astype(bool), delta=1e-5)
        if result.correct <= result.guesses / 2:
            assert result.epsilon == 0.0
        bounds.append(result.epsilon)
    assert np.mean(bounds) <= 0.3


def test_perfect_scores_reach_the_ceiling_of_a_thousand_canaries():
    included = np.random.default_rng(0).integers(0, 2, 1000).astype(bool)
    result = epsilon_lower_bound(included.astype(float) + 0.01 * np.random.default_rng(1).random(1000), included,
                                 delta=1e-5)
    assert result.correct == result.guesses
    assert result.grid_size == 64
    # All 1,000 guessed right at level beta/64 with delta = 0 is the most any outcome can show.
    ceiling = special.logit((0.05 / 64) ** (1 / 1000))
    assert 3.5 <= result.epsilon <= ceiling
    assert result.epsilon == pytest.approx(epsilon_for_counts(1000, result.guesses, result.correct, 1e-5, 0.05 / 64))


@pytest.mark.parametrize("epsilon", [1.0, 2.0, 4.0])
def test_bound_stays_below_the_true_epsilon_of_randomized_response(epsilon):
    bounds = np.array([epsilon_lower_bound(*randomized_response(epsilon, 1000, seed), delta=1e-5).epsilon
                       for seed in range(100)])
    assert (bounds > epsilon).mean() <= 0.05
    assert bounds.mean() >= 0.5 * epsilon  # and the audit does find most of it


def test_bound_rejects_a_delta_too_large_for_the_canaries():
    with pytest.raises(ValueError):
        epsilon_lower_bound(np.arange(100.0), np.arange(100) % 2 == 0, delta=0.01)


# ----------------------------------------------------------------------------- membership statistics


def test_auc_counts_ties_half_and_matches_all_pairs():
    rng = np.random.default_rng(0)
    mem, non = rng.integers(0, 5, 300).astype(float), rng.integers(0, 4, 400).astype(float)
    diff = mem[:, None] - non[None, :]
    brute = ((diff > 0) + 0.5 * (diff == 0)).mean()
    report = membership_report(mem, non, seed=0, n_boot=200)
    assert report.auc == pytest.approx(brute)
    assert report.auc_ci[0] <= report.auc <= report.auc_ci[1]
    assert membership_report(np.ones(50), np.ones(50), seed=0, n_boot=50).auc == 0.5


def test_tpr_threshold_never_exceeds_the_target_fpr():
    non = np.concatenate([np.arange(990.0), np.full(10, 1000.0)])  # the top 1% of non-members tie
    mem = np.concatenate([np.full(30, 1000.0), np.full(70, 2000.0)])
    report = membership_report(mem, non, seed=0, n_boot=100)
    # At most 10 of 1,000 non-members may score above the threshold: it is 989 (the 11th highest), so
    # the members at 1000, tied with the top non-members, are found too.
    assert report.tpr_at_fpr_1e_2 == 1.0
    # At 0.1% FPR at most one non-member may be above the threshold, which is then the tied 1000:
    # only the members at 2000 are strictly above it.
    assert report.tpr_at_fpr_1e_3 == pytest.approx(0.7)


def test_tpr_at_a_tenth_of_a_percent_needs_a_thousand_non_members():
    rng = np.random.default_rng(1)
    few = membership_report(rng.normal(1, 1, 500), rng.normal(0, 1, 999), seed=0, n_boot=100)
    assert few.tpr_at_fpr_1e_3 is None and few.tpr_at_fpr_1e_3_ci is None
    assert few.tpr_at_fpr_1e_2 is not None
    enough = membership_report(rng.normal(1, 1, 500), rng.normal(0, 1, 1000), seed=0, n_boot=100)
    assert enough.tpr_at_fpr_1e_3 is not None
    lo, hi = enough.tpr_at_fpr_1e_2_ci
    assert lo <= enough.tpr_at_fpr_1e_2 <= hi
    tiny = membership_report(rng.normal(1, 1, 50), rng.normal(0, 1, 99), seed=0, n_boot=100)
    assert tiny.tpr_at_fpr_1e_2 is None


def test_bootstrap_intervals_cover_chance_for_equal_distributions_and_exclude_it_for_separated_ones():
    rng = np.random.default_rng(2)
    same = membership_report(rng.normal(0, 1, 400), rng.normal(0, 1, 400), seed=0)
    assert same.auc_ci[0] < 0.5 < same.auc_ci[1]
    assert same.auc_ci[1] - same.auc_ci[0] < 0.15
    apart = membership_report(rng.normal(2, 1, 400), rng.normal(0, 1, 400), seed=0)
    assert apart.auc_ci[0] > 0.85
    perfect = membership_report(np.arange(100.0) + 1000, np.arange(1000.0), seed=0, n_boot=100)
    assert perfect.auc == 1.0 and perfect.auc_ci == (1.0, 1.0) and perfect.tpr_at_fpr_1e_3 == 1.0


# --------------------------------------------------------------------------------- the decoder attack


def test_reconstruction_finds_what_the_decoder_memorised():
    stored = 0.2 + 0.6 * binary_images(300, seed=0)  # grey values: a perfect copy still has BCE > 0
    unseen = 0.2 + 0.6 * binary_images(100, seed=1)
    decoder = MemorisingDecoder(stored, seed=0)
    decoder.train()
    candidates = torch.cat([stored[:100], unseen])
    with torch.no_grad():  # the attack needs gradients for z even when the caller has them off
        scores = reconstruction_scores(decoder, LATENT, candidates, steps=100, restarts=4, seed=0)
    assert scores.shape == (200,)
    assert scores[:100].min() > scores[100:].max()
    assert decoder.training and all(p.requires_grad for p in decoder.parameters())  # left as it was
    again = reconstruction_scores(decoder, LATENT, candidates, steps=100, restarts=4, seed=0)
    assert torch.equal(scores, again)
    kl = reconstruction_scores(decoder, LATENT, candidates, steps=100, restarts=4, seed=0, distance="bce")
    assert kl[:100].min() > kl[100:].max()
    # The entropy floor is removed: a copy scores -KL, about 0 (raw BCE would give -64 H(0.2) = -32).
    assert -0.01 < kl[:100].min() and kl.max() <= 1e-4


def test_reconstruction_rejects_a_decoder_of_another_image_size():
    with pytest.raises(ValueError):
        reconstruction_scores(nn.Linear(LATENT, 10), LATENT, binary_images(4, 0), steps=1, restarts=1)


# ------------------------------------------------------------------------------------ normalised leakage


def test_normalised_leakage_separates_memorised_outliers_but_not_hubs():
    gen = torch.Generator().manual_seed(0)
    typical = torch.rand(500, 64, generator=gen) * 0.3
    members, nonmembers = 0.5 + 0.5 * torch.rand(150, 64, generator=gen), 0.5 + 0.5 * torch.rand(150, 64,
                                                                                               generator=gen)
    hub = torch.cat([members, nonmembers]).mean(dim=0, keepdim=True)  # a blurry sample near every outlier
    blurry_samples = torch.cat([typical[:200], hub.repeat(50, 1) + 0.01 * torch.randn(50, 64, generator=gen)])
    hubs = normalised_leakage(blurry_samples, members, nonmembers, typical, seed=0, n_boot=300)
    assert hubs.membership.auc_ci[0] < 0.5 < hubs.membership.auc_ci[1]
    copies = torch.cat([typical[:200], members + 0.01 * torch.randn(150, 64, generator=gen)])
    memory = normalised_leakage(copies, members, nonmembers, typical, seed=0, n_boot=300)
    assert memory.membership.auc > 0.95
    assert memory.member_median_ratio < memory.nonmember_median_ratio
    scaled = normalised_leakage(3 * copies, 3 * members, 3 * nonmembers, 3 * typical, seed=0, n_boot=300)
    assert scaled.member_median_ratio == pytest.approx(memory.member_median_ratio, rel=1e-4)
    assert scaled.membership.auc == pytest.approx(memory.membership.auc)


# ------------------------------------------------------------------------------------------ the audit


def test_audit_of_a_memorising_trainer_refutes_small_epsilon(tmp_path):
    records, pool = binary_images(200, seed=10), binary_images(1500, seed=11)
    report = run_canary_audit(memorising_trainer, records, pool, k=1000, latent_dim=LATENT, delta=1e-5, seed=0,
                              steps=60, n_boot=200)
    assert report.epsilon_bound.num_canaries == 1000
    assert report.epsilon_bound.epsilon >= 1.0
    assert report.membership.auc > 0.85
    assert len(report.member_scores) + len(report.nonmember_scores) == 1000
    restored = AuditReport.model_validate_json(report.model_dump_json())
    assert restored == report and json.loads(report.model_dump_json())["epsilon_bound"]["k_plus"] >= 1
    path = save_audit_plot(report, tmp_path / "audit.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_audit_of_a_trainer_that_ignores_its_data_finds_nothing():
    records, pool = binary_images(200, seed=10), binary_images(1500, seed=11)
    report = run_canary_audit(ignoring_trainer, records, pool, k=1000, latent_dim=LATENT, delta=1e-5, seed=0,
                              steps=30, restarts=2, n_boot=200)
    assert report.epsilon_bound.epsilon <= 0.3
    assert abs(report.membership.auc - 0.5) < 0.07  # about 5 standard errors with 500 of each


def test_roc_plot_has_honest_axes_and_the_chance_line():
    rng = np.random.default_rng(0)
    report = AuditReport(
        epsilon_bound=epsilon_lower_bound(np.arange(10.0), np.arange(10) % 2 == 0, delta=0.0),
        membership=membership_report(rng.normal(1, 1, 300), rng.normal(0, 1, 400), seed=0, n_boot=50),
        member_scores=rng.normal(1, 1, 300).tolist(), nonmember_scores=rng.normal(0, 1, 400).tolist(),
        attack="test", seed=0)
    roc = audit_figure(report).axes[0]
    assert roc.get_xscale() == roc.get_yscale() == "log"
    assert roc.get_xlim() == pytest.approx((1 / 400, 1.0)) and roc.get_ylim() == pytest.approx((1 / 400, 1.0))
    chance = [line for line in roc.get_lines() if line.get_label().startswith("chance")]
    assert len(chance) == 1 and np.allclose(chance[0].get_xdata(), chance[0].get_ydata())


def test_canary_audit_command_trains_like_the_silo_and_never_bounds_above_the_accountant(tmp_path):
    """The command end to end on a tiny recipe: both attacks per level, the table, exit 0 (no bound above epsilon)."""
    import json

    from alignfl_app.tools.canary_audit import main

    recipe = ("num-server-rounds=1 generator-layout='per-class' silo-architectures='mlp-small' dp-steps=20 "
              "local-epochs=1")
    assert main(["--run-config", recipe, "--epsilons", "2", "none", "--canaries", "200", "--records", "50",
                 "--attack-steps", "5", "--restarts", "1", "--out", str(tmp_path)]) == 0
    table = json.loads((tmp_path / "table.json").read_text())
    assert [(r["level"], r["attack"]) for r in table] == [("2", "decoder"), ("2", "whole VAE"), ("none", "decoder"),
                                                          ("none", "whole VAE")]
    assert all(r["lower-bound"] <= r["accountant-epsilon"] for r in table)
    assert table[0]["accountant-epsilon"] <= 2.0 and (tmp_path / "2.png").stat().st_size > 0
