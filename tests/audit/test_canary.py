"""The canary audit: canaries, the decoder attack, the one-run epsilon bound and its statistics."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from scipy import special, stats
from torch import nn

from alignfl_app.audit.canary import (
    GUESS_FRACTIONS,
    AuditReport,
    GradientCanaryInjection,
    GradientCanarySet,
    audit_figure,
    epsilon_for_counts,
    epsilon_lower_bound,
    gradient_canary_scores,
    guess_grid,
    last_layer_weights,
    make_canaries,
    make_gradient_canaries,
    membership_report,
    normalised_leakage,
    one_run_p_value,
    reconstruction_scores,
    run_canary_audit,
    run_gradient_canary_audit,
    save_audit_plot,
)
from alignfl_app.config import ArchitectureSpec, parse_run_config
from alignfl_app.models.vae import VAE
from alignfl_app.privacy.dpsgd import AdaptiveClipDP, GroupNoise, PoissonBatches, RandomSource, calibrate
from alignfl_app.training import NegativeELBO, PlainGradient, ShuffledBatches, Trainer
from tests.conftest import tiny_run_config

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
        return nn.Sequential(nn.Linear(LATENT, 64), nn.ReLU(), nn.Linear(64, math.prod(IMAGE)), nn.Unflatten(1, IMAGE))


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
    assert all(b >= a for a, b in itertools.pairwise(p))


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
    result = epsilon_lower_bound(
        included.astype(float) + 0.01 * np.random.default_rng(1).random(1000), included, delta=1e-5
    )
    assert result.correct == result.guesses
    assert result.grid_size == 64
    # All 1,000 guessed right at level beta/64 with delta = 0 is the most any outcome can show.
    ceiling = special.logit((0.05 / 64) ** (1 / 1000))
    assert 3.5 <= result.epsilon <= ceiling
    assert result.epsilon == pytest.approx(epsilon_for_counts(1000, result.guesses, result.correct, 1e-5, 0.05 / 64))


@pytest.mark.parametrize("epsilon", [1.0, 2.0, 4.0])
def test_bound_stays_below_the_true_epsilon_of_randomized_response(epsilon):
    bounds = np.array(
        [epsilon_lower_bound(*randomized_response(epsilon, 1000, seed), delta=1e-5).epsilon for seed in range(100)]
    )
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
    assert kl[:100].min() > -0.01 and kl.max() <= 1e-4


def test_reconstruction_rejects_a_decoder_of_another_image_size():
    with pytest.raises(ValueError):
        reconstruction_scores(nn.Linear(LATENT, 10), LATENT, binary_images(4, 0), steps=1, restarts=1)


# ------------------------------------------------------------------------------------ normalised leakage


def test_normalised_leakage_separates_memorised_outliers_but_not_hubs():
    gen = torch.Generator().manual_seed(0)
    typical = torch.rand(500, 64, generator=gen) * 0.3
    members, nonmembers = 0.5 + 0.5 * torch.rand(150, 64, generator=gen), 0.5 + 0.5 * torch.rand(150, 64, generator=gen)
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


# ---------------------------------------------------------------------------------------- gradient canaries


def test_gradient_canaries_are_distinct_seeded_fair_coins_that_push_against_the_drift():
    candidates = torch.arange(100, 5100)
    a, b = make_gradient_canaries(candidates, 2000, seed=3), make_gradient_canaries(candidates, 2000, seed=3)
    assert torch.equal(a.coordinates, b.coordinates) and torch.equal(a.included, b.included)
    assert len(set(a.coordinates.tolist())) == 2000 and set(a.coordinates.tolist()) <= set(candidates.tolist())
    assert 0.45 < a.included.float().mean() < 0.55 and set(a.directions.tolist()) == {-1.0, 1.0}
    drift = torch.randn(5100)
    drift[a.coordinates[:10]] = 0.0
    against = make_gradient_canaries(candidates, 2000, seed=3, drift=drift)
    assert torch.equal(against.included, a.included)  # the drift changes directions only, never the coins
    assert torch.equal(against.directions[10:], -torch.sign(drift[a.coordinates[10:]]))
    assert torch.equal(against.directions[:10], a.directions[:10])  # no drift: the random direction
    with pytest.raises(ValueError):
        make_gradient_canaries(candidates, 5001, seed=0)


def test_scores_are_displacements_in_the_canary_direction_minus_the_reference():
    canaries = GradientCanarySet(
        coordinates=torch.tensor([1, 3]), directions=torch.tensor([1.0, -1.0]), included=torch.tensor([True, False])
    )
    initial, released = torch.zeros(5), torch.tensor([0.0, 2.0, 0.0, 3.0, 0.0])
    assert torch.equal(gradient_canary_scores(canaries, initial, released), torch.tensor([2.0, -3.0]))
    reference = torch.tensor([0.0, 0.5, 0.0, 1.0, 0.0])
    assert torch.equal(gradient_canary_scores(canaries, initial, released, reference), torch.tensor([1.5, -2.0]))


def dirac_batch(coordinates: list[tuple[int, int]], shape: tuple[int, int], size: float, seed: int):
    """Records for ``nn.Linear(in, out, bias=False)`` whose loss ``(W x) . w`` has gradient ``size`` at W[o, i]
    only (for the listed (o, i)), then random records; returns a function of the layer giving per-record losses."""
    out_dim, in_dim = shape
    g = torch.Generator().manual_seed(seed)
    x, w = torch.rand(4, in_dim, generator=g), torch.randn(4, out_dim, generator=g)
    for o, i in coordinates:
        x = torch.cat([torch.zeros(1, in_dim).index_fill_(1, torch.tensor([i]), 1.0), x])
        w = torch.cat([torch.zeros(1, out_dim).index_fill_(1, torch.tensor([o]), size), w])
    return lambda layer: (layer(x) * w).sum(dim=1)


def private_rule(layer: nn.Module, expected_batch: float) -> AdaptiveClipDP:
    """DP-SGD with its noise switched off, so that two runs can be compared exactly."""
    plan = calibrate(parse_run_config({**tiny_run_config("r"), "dp-noise-multiplier": 1.0}).privacy, 1)
    return AdaptiveClipDP(layer, plan, GroupNoise(expected_batch, 0.0, 0.0), 1.0, RandomSource(False))


@pytest.mark.parametrize("private", [True, False])
def test_an_injected_canary_trains_exactly_as_a_record_with_a_dirac_gradient(private):
    """The wrapped rule on records + a canary leaves the same gradient (and, under DP, the same next clip bound)
    as the plain rule on records + a real record whose gradient is the canary's Dirac vector."""
    torch.manual_seed(0)
    with_record, with_canary = nn.Linear(6, 5, bias=False), nn.Linear(6, 5, bias=False)
    with_canary.load_state_dict(with_record.state_dict())
    size = 1.0 if private else 7.0  # under DP: the clip bound, the norm a canary gets
    record_losses, real_losses = dirac_batch([(2, 4)], (5, 6), size, seed=1), dirac_batch([], (5, 6), size, seed=1)
    # the canary pushes W[2, 4] down, as a descent step on that record's gradient +size does
    canaries = GradientCanarySet(
        coordinates=torch.tensor([2 * 6 + 4]), directions=torch.tensor([-1.0]), included=torch.tensor([True])
    )
    injection = GradientCanaryInjection(canaries, num_records=4, magnitude=size)
    plain_rule = private_rule(with_record, 3.0) if private else PlainGradient()
    wrapped = injection.rule(private_rule(with_canary, 3.0) if private else PlainGradient(), with_canary, with_canary)
    plain_rule.backward(record_losses(with_record))
    list(injection.batches([torch.tensor([0, 1, 2, 3, 4])]))  # records 0..3 and the canary (virtual record 4)
    wrapped.backward(real_losses(with_canary))
    assert with_canary.weight.grad[2, 4] != with_canary.weight.grad.view(-1)[:5].mean()  # the canary is there
    assert torch.allclose(with_canary.weight.grad, with_record.weight.grad, atol=1e-6)
    if private:
        assert wrapped.inner.clip == pytest.approx(plain_rule.clip, rel=1e-9)
        assert wrapped.report() == pytest.approx(plain_rule.report())
        assert plain_rule.clip != 1.0  # the bound did move, so the comparison above means something
    wrapped.close()
    if private:
        plain_rule.close()


def test_canaries_are_sampled_as_records_poisson_under_dp_once_per_epoch_without():
    n, steps, q = 300, 2000, 0.05
    canaries = make_gradient_canaries(torch.arange(10_000), 1000, seed=0)
    injection = GradientCanaryInjection(canaries, num_records=n, magnitude=1.0)
    m = injection.num_virtual
    per_step = []
    for real in injection.batches(PoissonBatches(q, steps, RandomSource(False))(n + m)):
        assert bool((real < n).all())
        per_step.append(len(injection.current))
    counts = injection.sampled.double()
    assert counts.mean() == pytest.approx(q * steps, rel=0.02)  # 100 per canary, sd 0.3 over 500 canaries
    assert counts.var() == pytest.approx(q * (1 - q) * steps, rel=0.2)  # each a Binomial(steps, q)
    assert np.mean(per_step) == pytest.approx(q * m, rel=0.03) and np.var(per_step) == pytest.approx(
        q * (1 - q) * m, rel=0.2
    )  # each step a Binomial(m, q)
    shuffled = GradientCanaryInjection(canaries, num_records=n, magnitude=1.0)
    sizes = [
        len(real) + len(shuffled.current)
        for real in shuffled.batches(ShuffledBatches(64, 3)(n + m, torch.Generator().manual_seed(0)))
    ]
    assert torch.equal(shuffled.sampled, torch.full((m,), 3))
    assert sum(sizes) == 3 * (n + m) and set(sizes) == {64, (n + m) % 64}  # batches of records and canaries


TINY_VAE = ArchitectureSpec(name="tiny", kind="mlp", latent_dim=2, hidden=(32,))


def tiny_vae_trainer(records: torch.Tensor, noise_multiplier: float | None):
    """Runs of a tiny VAE from one initialisation: shuffled epochs (None) or DP-SGD at a fixed noise multiplier."""
    plan = (
        None
        if noise_multiplier is None
        else calibrate(
            parse_run_config(
                {
                    **tiny_run_config("r"),
                    "dp-noise-multiplier": noise_multiplier,
                    "dp-sample-rate": 0.05,
                    "dp-steps": 300,
                    "num-server-rounds": 1,
                }
            ).privacy,
            1,
        )
    )

    def initial() -> VAE:
        torch.manual_seed(0)
        return VAE(TINY_VAE, 0, IMAGE)

    def train(injection: GradientCanaryInjection | None) -> nn.Module:
        vae, n = initial(), len(records)
        total = n + (injection.num_virtual if injection else 0)
        if plan is None:
            rule, batches = PlainGradient(), ShuffledBatches(32, 3)(total, torch.Generator().manual_seed(1))
        else:
            source = RandomSource(False)
            source.g.manual_seed(2)  # the test is repeatable; the silo seeds it from the OS
            rule = AdaptiveClipDP(vae, plan, GroupNoise.of(plan, total), plan.clip_init, source)
            batches = PoissonBatches(plan.sample_rate, plan.steps_per_round, source)(total)
        if injection is not None:
            rule, batches = injection.rule(rule, vae, vae.decoder), injection.batches(batches)
        Trainer(NegativeELBO(), rule).fit(
            vae, (records, torch.zeros(n, dtype=torch.long)), batches, torch.optim.Adam(vae.parameters(), lr=1e-3)
        )
        return vae.decoder

    return initial().decoder, train, plan


def test_gradient_canaries_betray_a_non_private_decoder():
    records = binary_images(200, seed=20)
    initial, train, _ = tiny_vae_trainer(records, None)
    assert len(last_layer_weights(initial)) == 32 * 64
    report = run_gradient_canary_audit(
        train, initial, len(records), 1000, delta=1e-5, seed=0, magnitude=100.0, calibrate=True, n_boot=100
    )
    assert report.epsilon_bound.epsilon >= 1.0 and report.membership.auc > 0.9
    # the scores are the canaries' own: a decoder trained without any gives nothing
    blind = run_gradient_canary_audit(
        lambda injection: train(None),
        initial,
        len(records),
        1000,
        delta=1e-5,
        seed=0,
        magnitude=100.0,
        calibrate=True,
        n_boot=100,
    )
    assert blind.epsilon_bound.epsilon == 0.0


def test_heavy_dp_noise_hides_gradient_canaries_and_the_bound_stays_below_the_accountant():
    records = binary_images(200, seed=20)
    bounds = {}
    for sigma in (1.0, 30.0):
        initial, train, plan = tiny_vae_trainer(records, sigma)
        report = run_gradient_canary_audit(
            train, initial, len(records), 1000, delta=plan.delta, seed=0, magnitude=100.0, calibrate=False, n_boot=100
        )
        assert report.epsilon_bound.epsilon <= plan.planned_epsilon
        bounds[sigma] = report
    assert bounds[30.0].epsilon_bound.epsilon == 0.0 and abs(bounds[30.0].membership.auc - 0.5) < 0.07
    assert bounds[1.0].membership.auc > bounds[30.0].membership.auc + 0.05  # the same audit sees weaker noise


# ------------------------------------------------------------------------------------------ the audit


def test_audit_of_a_memorising_trainer_refutes_small_epsilon(tmp_path):
    records, pool = binary_images(200, seed=10), binary_images(1500, seed=11)
    report = run_canary_audit(
        memorising_trainer, records, pool, k=1000, latent_dim=LATENT, delta=1e-5, seed=0, steps=60, n_boot=200
    )
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
    report = run_canary_audit(
        ignoring_trainer, records, pool, k=1000, latent_dim=LATENT, delta=1e-5, seed=0, steps=30, restarts=2, n_boot=200
    )
    assert report.epsilon_bound.epsilon <= 0.3
    assert abs(report.membership.auc - 0.5) < 0.07  # about 5 standard errors with 500 of each


def test_roc_plot_has_honest_axes_and_the_chance_line():
    rng = np.random.default_rng(0)
    report = AuditReport(
        epsilon_bound=epsilon_lower_bound(np.arange(10.0), np.arange(10) % 2 == 0, delta=0.0),
        membership=membership_report(rng.normal(1, 1, 300), rng.normal(0, 1, 400), seed=0, n_boot=50),
        member_scores=rng.normal(1, 1, 300).tolist(),
        nonmember_scores=rng.normal(0, 1, 400).tolist(),
        attack="test",
        seed=0,
    )
    roc = audit_figure(report).axes[0]
    assert roc.get_xscale() == roc.get_yscale() == "log"
    assert roc.get_xlim() == pytest.approx((1 / 400, 1.0)) and roc.get_ylim() == pytest.approx((1 / 400, 1.0))
    chance = [line for line in roc.get_lines() if line.get_label().startswith("chance")]
    assert len(chance) == 1 and np.allclose(chance[0].get_xdata(), chance[0].get_ydata())


def test_canary_audit_command_trains_like_the_silo_and_never_bounds_above_the_accountant(tmp_path):
    """The command end to end on a tiny recipe: every kind's attacks per level, the table, exit 0 (no bound above
    epsilon), and gradient canaries found without DP."""
    from alignfl_app.tools.canary_audit import main

    recipe = (
        "num-server-rounds=1 generator-layout='per-class' silo-architectures='mlp-small' dp-steps=20 local-epochs=1"
    )
    assert (
        main(
            [
                "--run-config",
                recipe,
                "--epsilons",
                "2",
                "none",
                "--canary-kind",
                "gradient",
                "image",
                "--canaries",
                "200",
                "--records",
                "50",
                "--attack-steps",
                "5",
                "--restarts",
                "1",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    table = json.loads((tmp_path / "table.json").read_text())
    assert [(r["kind"], r["level"], r["attack"]) for r in table] == [
        ("gradient", "2", "displacement"),
        ("gradient", "none", "displacement"),
        ("image", "2", "decoder"),
        ("image", "2", "whole VAE"),
        ("image", "none", "decoder"),
        ("image", "none", "whole VAE"),
    ]
    assert all(r["lower-bound"] <= r["accountant-epsilon"] for r in table)
    assert table[0]["accountant-epsilon"] <= 2.0 and table[1]["auc"] > 0.8
    assert all((tmp_path / f"{name}.png").stat().st_size > 0 for name in ("gradient-2", "image-2", "image-2-whole-vae"))
    report = AuditReport.model_validate_json((tmp_path / "gradient-none.json").read_text())
    assert report.epsilon_bound.num_canaries == 200 and "gradient canaries" in report.attack
