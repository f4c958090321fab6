"""What makes the released generators draw good samples: the latent fit folded into the decoder, and the
server's pixel sharpness."""

from __future__ import annotations

import pytest
import torch

from alignfl_app.config import ArchitectureSpec, parse_node_config, parse_run_config
from alignfl_app.models import GeneratorSet, LatentFit, one_hot
from alignfl_app.silo import Silo
from alignfl_app.store import GeneratorDescriptor
from alignfl_app.synthesis import SamplingStyle, sample_generator
from tests.conftest import tiny_run_config

SPECS = [ArchitectureSpec(name="m", kind="mlp", latent_dim=4, hidden=[32, 16]),
         ArchitectureSpec(name="c", kind="conv", latent_dim=3, hidden=[4, 8])]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.kind)
@pytest.mark.parametrize("layout", ["conditional", "per-class", "unconditional"])
def test_folded_decoder_draws_exactly_the_fitted_gaussian(spec, layout):
    """The released decoder fed N(0, I) latents gives what the trained decoder gives at mean_y + L z."""
    torch.manual_seed(0)
    generators = GeneratorSet(spec, layout, 2)
    x = torch.rand(40, 1, 28, 28)
    labels = torch.arange(40) % 2
    if layout == "per-class":
        groups = [(x[labels == k], torch.zeros(20, dtype=torch.long)) for k in range(2)]
    else:
        groups = [(x, labels if layout == "conditional" else torch.zeros(40, dtype=torch.long))]
    trained = [vae.decoder for vae in generators.vaes]
    generators.fit_latents(groups)
    released = generators.decoder
    z = torch.randn(6, spec.latent_dim)
    for k, (vae, fit) in enumerate(zip(generators.vaes, generators.latent_fits, strict=True)):
        assert torch.equal(vae.decoder.input_layer.weight, trained[k].input_layer.weight)  # the VAE is untouched
        cond = vae.decoder.cond_dim
        y = torch.full((6,), k if layout == "per-class" else 1) if layout != "unconditional" else None
        local = None if y is None else (y if cond else torch.zeros(6, dtype=torch.long))
        mean = fit.means[0 if local is None else local]
        expected = vae.decoder(mean + z @ fit.scale_tril.T, one_hot(local, cond) if cond else None)
        got = released(z, None if y is None else one_hot(y, 2))
        assert torch.allclose(got, expected, atol=1e-4)


def test_fit_matches_the_latent_codes_it_was_made_from():
    """Means per condition and a covariance that is the spread of the codes plus the mean posterior variance."""
    torch.manual_seed(1)
    vae = GeneratorSet(SPECS[0], "conditional", 2).vaes[0]
    x, y = torch.rand(200, 1, 28, 28), torch.arange(200) % 2
    fit = LatentFit.of(vae, x, y, batch_size=64)
    with torch.no_grad():
        mu, logvar = vae.encoder(x, one_hot(y, 2))
    for k in range(2):
        assert torch.allclose(fit.means[k], mu[y == k].mean(0), atol=1e-5)
    spread = mu - fit.means[y]
    cov = spread.T @ spread / len(mu) + torch.diag(logvar.exp().mean(0))
    assert torch.allclose(fit.scale_tril @ fit.scale_tril.T, cov, atol=1e-4)


def released_and_trained(run_config: dict) -> tuple[dict, dict]:
    cfg = parse_run_config(run_config)
    out = Silo(cfg, parse_node_config({"partition-id": 0})).train_round("run", 1)
    trained = {k.removeprefix("vaes.0.decoder."): v for k, v in out.state.generators.items()
               if k.startswith("vaes.0.decoder.")}
    return out.decoder_state, trained


def test_silo_releases_the_fitted_decoder_and_keeps_its_vae_as_trained(tmp_path):
    released, trained = released_and_trained(tiny_run_config(tmp_path))
    assert set(released) == set(trained)
    changed = [k for k in released if not torch.equal(released[k], trained[k])]
    assert changed and all(k.startswith("net.0.") for k in changed)  # only the first layer carries the fit


def test_dp_silo_releases_its_decoder_as_trained(tmp_path):
    """Under DP the fit (a statistic of the records) is not made: the decoder leaves as DP-SGD left it."""
    released, trained = released_and_trained({**tiny_run_config(tmp_path), "dp-epsilon": 2.0, "dp-steps": 2})
    assert all(torch.equal(released[k], trained[k]) for k in released)


def test_latent_fit_none_releases_the_decoder_as_trained(tmp_path):
    released, trained = released_and_trained({**tiny_run_config(tmp_path), "latent-fit": "none"})
    assert all(torch.equal(released[k], trained[k]) for k in released)


def test_sharpness_scales_the_pixel_logits():
    torch.manual_seed(2)
    desc = GeneratorDescriptor(silo="s", architecture=SPECS[0], layout="conditional", classes=("a", "b"),
                               image_shape=(1, 28, 28), round=1)
    decoder = desc.build_decoder()
    ids = torch.tensor([3, 7])
    soft, labels = sample_generator(desc, decoder, 8, ids, SamplingStyle(1.0, 1.0), seed=5)
    sharp, same = sample_generator(desc, decoder, 8, ids, SamplingStyle(1.0, 3.0), seed=5)
    assert torch.equal(labels, same)
    assert torch.allclose(sharp, torch.sigmoid(3 * torch.logit(soft, eps=0)), atol=1e-4)
    assert (sharp - 0.5).abs().mean() > (soft - 0.5).abs().mean()


def test_server_label_smoothing_reaches_the_global_classifier_loss(tmp_path):
    """The server's classifier learns with the configured label smoothing; the silos' FedAvg classifier does not."""
    from alignfl_app.global_model import GlobalModel
    from alignfl_app.server import GlobalLearner
    from alignfl_app.store import GeneratorTerms

    cfg = parse_run_config({**tiny_run_config(tmp_path), "server-label-smoothing": 0.3})
    model = GlobalModel.from_config(cfg)
    learner = GlobalLearner(cfg, model, GeneratorTerms.from_config(cfg))
    assert learner.objective.label_smoothing == 0.3
    assert model.objective.label_smoothing == 0.0
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    smoothed = learner.objective(model.model, x, y)
    assert not torch.allclose(smoothed, model.objective(model.model, x, y))
