"""What makes the released generators draw good samples: the latent fit (a Gaussian folded into the decoder, or a
mixture layer in front of it), and the server's pixel sharpness."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from alignfl_app.config import ArchitectureSpec, parse_node_config, parse_run_config
from alignfl_app.contract.descriptor import GeneratorDescriptor
from alignfl_app.contract.replies import ReplyRejected
from alignfl_app.contract.sampling import SamplingStyle, sample_generator
from alignfl_app.models.families import LatentMixture
from alignfl_app.models.latents import LatentFit, fit_gaussian_mixture, shrunk_covariance
from alignfl_app.models.vae import GeneratorSet, one_hot
from alignfl_app.server.store import GeneratorTerms, check_decoder_state
from alignfl_app.silo.core import Silo
from tests.conftest import tiny_run_config

SPECS = [
    ArchitectureSpec(name="m", kind="mlp", latent_dim=4, hidden=[32, 16]),
    ArchitectureSpec(name="c", kind="conv", latent_dim=3, hidden=[4, 8]),
    ArchitectureSpec(name="r", kind="conv", latent_dim=3, hidden=[4, 8], refine=2),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
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
    generators.fit_latents(groups, LatentFit.of)
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
    trained = {
        k.removeprefix("vaes.0.decoder."): v for k, v in out.state.generators.items() if k.startswith("vaes.0.decoder.")
    }
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


def test_mixture_layer_turns_standard_normal_latents_into_the_mixture():
    """The component is picked with its weight and the rest of the draw is that component's Gaussian: far-apart
    components, so every output's component is plain, and their frequencies, means and covariances are checked."""
    layer = LatentMixture(rows=2, components=3, latent_dim=2)
    weights = torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])
    layer.log_weights.copy_(weights.log() + 7.0)  # any offset: the layer normalises
    layer.means.copy_(torch.tensor([[-40.0, 0.0], [0.0, 40.0], [40.0, 0.0]]).expand(2, 3, 2))
    scales = torch.tensor([[[1.0, 0.0], [0.5, 2.0]], [[0.3, 0.0], [0.0, 0.3]], [[2.0, 0.0], [-1.0, 1.0]]])
    layer.scale_tril.copy_(scales.expand(2, 3, 2, 2) + torch.triu(torch.ones(2, 2), 1))  # upper part is ignored
    n = 200_000
    z = torch.randn(n, 2, generator=torch.Generator().manual_seed(0))
    for row in range(2):
        out = layer(z, torch.full((n,), row))
        assigned = torch.cdist(out, layer.means[row]).argmin(1)
        for k in range(3):
            part = out[assigned == k]
            assert abs(len(part) / n - weights[row, k].item()) < 0.01
            assert torch.allclose(part.mean(0), layer.means[row, k], atol=0.05)
            assert torch.allclose(torch.cov(part.T), scales[k] @ scales[k].T, atol=0.1)


def test_mixture_fit_recovers_a_known_mixture_and_keeps_its_shapes_with_few_records():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3000, 2, dtype=torch.float64, generator=g) * 0.3 + torch.tensor([3.0, 0.0], dtype=torch.float64)
    b = torch.randn(1000, 2, dtype=torch.float64, generator=g) * 0.5 + torch.tensor([-3.0, 1.0], dtype=torch.float64)
    log_w, means, tril = fit_gaussian_mixture(torch.cat([a, b]), 2, g)
    order = means[:, 0].argsort()
    assert torch.allclose(log_w[order].exp(), torch.tensor([0.25, 0.75], dtype=torch.float64), atol=0.01)
    assert torch.allclose(means[order], torch.tensor([[-3.0, 1.0], [3.0, 0.0]], dtype=torch.float64), atol=0.05)
    assert torch.allclose(
        tril[order].diagonal(dim1=1, dim2=2), torch.tensor([[0.5, 0.5], [0.3, 0.3]], dtype=torch.float64), atol=0.03
    )
    for n in (0, 1, 5):  # fewer records than components: fewer are fitted, the shapes and total weight stay
        log_w, means, tril = fit_gaussian_mixture(torch.randn(n, 4, dtype=torch.float64, generator=g), 10, g)
        assert log_w.shape == (10,) and means.shape == (10, 4) and tril.shape == (10, 4, 4)
        assert torch.isfinite(tril).all() and torch.isclose(log_w.exp().sum(), torch.tensor(1.0, dtype=torch.float64))


def test_a_shrunk_fit_from_fewer_points_than_dimensions_covers_new_points():
    """60 points in 100 correlated dimensions: the raw covariance is flat outside the points' span, so new points
    of the same distribution are wildly unlikely under it; the shrunk one keeps them likely. With many points
    the shrinkage vanishes and the fit is the sample covariance."""
    g = torch.Generator().manual_seed(0)
    d = 100
    mixing = torch.randn(d, 5, dtype=torch.float64, generator=g)
    true_cov = mixing @ mixing.T + torch.eye(d, dtype=torch.float64)

    def draw(n):
        return torch.randn(n, d, dtype=torch.float64, generator=g) @ torch.linalg.cholesky(true_cov).T

    train, new = draw(60), draw(500)
    fits = {shrink: fit_gaussian_mixture(train, 1, g, shrink=shrink) for shrink in (False, True)}
    held_out = {
        shrink: float(torch.distributions.MultivariateNormal(m[0], scale_tril=t[0]).log_prob(new).mean())
        for shrink, (_, m, t) in fits.items()
    }
    truth = float(
        torch.distributions.MultivariateNormal(torch.zeros(d, dtype=torch.float64), true_cov).log_prob(new).mean()
    )
    assert held_out[True] > held_out[False] + 100 and held_out[True] > truth - 60, (held_out, truth)
    many = draw(20000)
    centred = many - many.mean(0)
    assert torch.allclose(
        shrunk_covariance(centred, torch.ones(len(many), dtype=torch.float64)),
        centred.T @ centred / len(many),
        atol=0.05 * float(true_cov.diagonal().mean()),
    )


def test_silo_releases_a_mixture_decoder_the_server_accepts_and_draws_from(tmp_path):
    """latent-fit = "mixture": the descriptor declares the components, the decoder carries the layer's tensors
    (and the same network as the VAE's), the server's checks pass and it draws finite images; the same round is
    fitted the same way twice; a descriptor that misstates the layer is refused in one line."""
    config = {
        **tiny_run_config(tmp_path),
        "latent-fit": "mixture",
        "latent-components": 3,
        "generator-layout": "per-class",
    }
    cfg = parse_run_config(config)
    out = Silo(cfg, parse_node_config({"partition-id": 0})).train_round("run", 1)
    assert out.descriptor.latent_components == 3
    prior = {k for k in out.decoder_state if ".prior." in k}
    assert prior == {f"decoders.{i}.prior.{name}" for i in range(2) for name in ("log_weights", "means", "scale_tril")}
    for key, value in out.decoder_state.items():
        if key not in prior:
            assert torch.equal(
                value, out.state.generators["vaes." + key.removeprefix("decoders.").replace(".", ".decoder.", 1)]
            )
    state = {k: v.numpy() for k, v in out.decoder_state.items()}
    terms = GeneratorTerms.from_config(cfg)
    decoder = check_decoder_state(out.descriptor, state, terms)
    x, labels = sample_generator(out.descriptor, decoder, 64, terms.class_ids(out.descriptor))
    assert torch.isfinite(x).all() and len(set(labels.tolist())) == 2
    again = Silo(cfg, parse_node_config({"partition-id": 0})).train_round("run", 1)
    assert all(torch.equal(again.decoder_state[k], v) for k, v in out.decoder_state.items())
    for wrong, says in ((0, "tensors the decoder does not have"), (4, "has shape")):
        desc = out.descriptor.model_copy(update={"latent_components": wrong})
        with pytest.raises(ReplyRejected, match=says):
            check_decoder_state(desc, state, terms)
    # the layer counts towards max-decoder-mb as declared, before anything is built or the arrays are compared
    tight = dataclasses.replace(terms, max_bytes=sum(a.nbytes for a in state.values()) + 1000)
    check_decoder_state(out.descriptor, state, tight)
    with pytest.raises(ReplyRejected, match="descriptor declares"):
        check_decoder_state(out.descriptor.model_copy(update={"latent_components": 64}), state, tight)
    with pytest.raises(ValueError, match="latent_components must be 0"):
        GeneratorDescriptor.model_validate({**out.descriptor.model_dump(), "latent_components": 1})
    with pytest.raises(ValueError, match="less than or equal to 64"):
        GeneratorDescriptor.model_validate({**out.descriptor.model_dump(), "latent_components": 65})


def test_dp_silo_makes_no_mixture_fit(tmp_path):
    config = {**tiny_run_config(tmp_path), "latent-fit": "mixture", "dp-epsilon": 2.0, "dp-steps": 2}
    out = Silo(parse_run_config(config), parse_node_config({"partition-id": 0})).train_round("run", 1)
    assert out.descriptor.latent_components == 0 and not any(".prior." in k for k in out.decoder_state)


def test_sharpness_scales_the_pixel_logits():
    torch.manual_seed(2)
    desc = GeneratorDescriptor(
        silo="s", architecture=SPECS[0], layout="conditional", classes=("a", "b"), image_shape=(1, 28, 28), round=1
    )
    decoder = desc.build_decoder()
    ids = torch.tensor([3, 7])
    soft, labels = sample_generator(desc, decoder, 8, ids, SamplingStyle(1.0, 1.0), seed=5)
    sharp, same = sample_generator(desc, decoder, 8, ids, SamplingStyle(1.0, 3.0), seed=5)
    assert torch.equal(labels, same)
    assert torch.allclose(sharp, torch.sigmoid(3 * torch.logit(soft, eps=0)), atol=1e-4)
    assert (sharp - 0.5).abs().mean() > (soft - 0.5).abs().mean()


def test_server_label_smoothing_reaches_the_global_classifier_loss(tmp_path):
    """The server's classifier learns with the configured label smoothing; the silos' FedAvg classifier does not."""
    from alignfl_app.models.global_model import GlobalModel
    from alignfl_app.server.core import GlobalLearner
    from alignfl_app.server.store import GeneratorTerms

    cfg = parse_run_config({**tiny_run_config(tmp_path), "server-label-smoothing": 0.3})
    model = GlobalModel.from_config(cfg)
    learner = GlobalLearner(cfg, model, GeneratorTerms.from_config(cfg))
    assert learner.objective.label_smoothing == 0.3
    assert model.objective.label_smoothing == 0.0
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    smoothed = learner.objective(model.model, x, y)
    assert not torch.allclose(smoothed, model.objective(model.model, x, y))


def test_every_augmentation_keeps_images_valid_and_draws_per_image():
    """Each transform, alone or chained, gives images of the same shape in [0, 1], the same for the same seed,
    and a different draw for each of two identical images."""
    from alignfl_app.server.augment import TRANSFORMS, SyntheticAugmentation

    x = torch.rand(1, 3, 28, 28).repeat(2, 1, 1, 1)
    for names in [[name] for name in TRANSFORMS] + [list(TRANSFORMS)]:
        augment = SyntheticAugmentation(names)
        out = augment(x.clone(), seed=4)
        assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1, names
        assert torch.equal(out, augment(x.clone(), seed=4)), names
        assert not torch.allclose(out[0], out[1]), names


def test_blur_keeps_flat_images_and_smooths_edges():
    """Blur extends the border (a flat image stays flat, nothing darkens at the edge) and lowers the contrast of
    a one-pixel checkerboard, each image by its own amount."""
    from alignfl_app.server.augment import random_blur

    flat = torch.full((3, 1, 28, 28), 0.7)
    assert torch.allclose(random_blur(flat, torch.Generator().manual_seed(0)), flat, atol=1e-6)
    checker = ((torch.arange(28)[:, None] + torch.arange(28)[None, :]) % 2).float().expand(8, 1, 28, 28)
    blurred = random_blur(checker.clone(), torch.Generator().manual_seed(1))
    contrast = blurred.flatten(1).std(1)
    assert (contrast < checker.flatten(1).std(1)).all()
    assert contrast.max() - contrast.min() > 0.05  # widths differ between images
    assert torch.allclose(blurred.mean((1, 2, 3)), checker.mean((1, 2, 3)), atol=0.02)


def test_noise_is_centred_with_the_stated_spread():
    from alignfl_app.server.augment import random_noise

    gray = torch.full((64, 1, 28, 28), 0.5)
    noisy = random_noise(gray, torch.Generator().manual_seed(0))
    assert abs(float(noisy.mean()) - 0.5) < 0.005
    assert abs(float((noisy - gray).std()) - 0.2) < 0.005


def test_unknown_augmentation_is_refused_in_one_line(tmp_path):
    from alignfl_app.config import ConfigError

    with pytest.raises(ConfigError) as err:
        parse_run_config({**tiny_run_config(tmp_path), "server-augment": "affine,sharpen"})
    assert "\n" not in str(err.value) and "noise" in str(err.value)


class _PrototypeDecoder(torch.nn.Module):
    """Draws a noisy copy of one fixed image per label (``swap``: the other label's image)."""

    def __init__(self, prototypes: torch.Tensor, swap: bool = False) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(torch.logit(prototypes.clamp(0.05, 0.95)), requires_grad=False)
        self.swap = swap

    def forward(self, z, y_onehot):
        labels = y_onehot.argmax(1)
        return self.logits[1 - labels if self.swap else labels] + z[:, :1, None, None]


def test_label_fidelity_tells_a_faithful_decoder_from_one_that_swaps_its_labels():
    from alignfl_app.silo.fidelity import LabelFidelity

    left = torch.zeros(1, 28, 28)
    left[:, :, :14] = 1
    prototypes = torch.stack([left, left.flip(2)])
    y = torch.arange(200) % 2
    records = ((prototypes[y] + 0.2 * torch.randn(200, 1, 28, 28)).clamp(0, 1), y)
    desc = GeneratorDescriptor(
        silo="s", architecture=SPECS[0], layout="conditional", classes=("a", "b"), image_shape=(1, 28, 28), round=1
    )
    fidelity = LabelFidelity(num_samples=100)
    assert fidelity.measure(desc, _PrototypeDecoder(prototypes), records, SamplingStyle(), seed=1) > 0.95
    assert fidelity.measure(desc, _PrototypeDecoder(prototypes, swap=True), records, SamplingStyle(), seed=1) < 0.05
    one_class = desc.model_copy(update={"classes": ("a",)})
    assert fidelity.measure(one_class, _PrototypeDecoder(prototypes), records, SamplingStyle(), seed=1) is None


def test_silo_reports_label_fidelity_only_where_record_figures_may_leave(tmp_path):
    run = {**tiny_run_config(tmp_path), "label-fidelity-samples": 50}
    out = Silo(parse_run_config(run), parse_node_config({"partition-id": 0})).train_round("run", 1)
    assert 0 <= out.metrics.label_fidelity <= 1
    assert "label-fidelity" in out.metrics.record()
    private = Silo(
        parse_run_config({**run, "dp-epsilon": 2.0, "dp-steps": 2}), parse_node_config({"partition-id": 0})
    ).train_round("run", 1)
    assert "label-fidelity" not in private.metrics.record()
    plain = Silo(parse_run_config(tiny_run_config(tmp_path)), parse_node_config({"partition-id": 1})).train_round(
        "r", 1
    )
    assert plain.metrics.label_fidelity is None


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_activation_estimate_counts_every_value_a_draw_holds(spec):
    """The server bounds its sampling memory with this estimate before it builds a decoder: it must count the input
    and every layer's output of a real forward pass, refine layers included."""
    from alignfl_app.models.families import family_of

    Decoder = family_of(spec.kind).decoder
    decoder = Decoder(spec, cond_dim=2, image_shape=(1, 28, 28))
    counted = []
    for module in decoder.modules():
        if not list(module.children()):
            module.register_forward_hook(lambda m, args, out: counted.append(out[0].numel()))
    decoder(torch.randn(1, spec.latent_dim), torch.eye(2)[:1])
    functional_relu = decoder.fc.out_features if spec.kind == "conv" else 0  # applied to fc's output, not a module
    held = spec.latent_dim + 2 + sum(counted) + functional_relu
    assert held == Decoder.activations_per_sample(spec, 2, (1, 28, 28))
    with_mixture = Decoder(spec, cond_dim=2, image_shape=(1, 28, 28), latent_components=5)
    counted.clear()
    for module in with_mixture.modules():
        if not list(module.children()):
            module.register_forward_hook(lambda m, args, out: counted.append(out[0].numel()))
    with_mixture(torch.randn(1, spec.latent_dim), torch.eye(2)[:1])
    # the mixture layer's output is counted like any layer's; its float64 pick is more than that
    assert (
        Decoder.activations_per_sample(spec, 2, (1, 28, 28), 5) > spec.latent_dim + 2 + sum(counted) + functional_relu
    )


@pytest.mark.parametrize(
    "spec, components",
    [*((s, c) for s in SPECS for c in (0, 3)), (ArchitectureSpec(name="g", kind="gaussian", components=3), 0)],
    ids=lambda v: getattr(v, "name", str(v)),
)
@pytest.mark.parametrize("layout", ["conditional", "per-class"])
def test_compute_estimate_is_what_a_real_draw_counts(spec, components, layout):
    """The server bounds a decoder's compute with this estimate (meta device, one sample) before it loads it: a real
    draw of n samples must count n times as much, the mixture's affine draw counted in closed form (its additions,
    one per latent value, are what a counter of products leaves out)."""
    from torch.utils.flop_counter import FlopCounterMode

    from alignfl_app.models.features import FeatureSpec

    gaussian = spec.kind == "gaussian"  # a mixture itself: no mixture layer in front
    desc = GeneratorDescriptor(
        silo="s",
        architecture=spec,
        layout=layout,
        classes=("a", "b"),
        image_shape=(1, 28, 28),
        round=1,
        latent_components=components,
        features=FeatureSpec(space="scattering", scales=2, pool=2) if gaussian else None,
    )
    decoder = desc.build_decoder().eval()
    n = 10
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        decoder(torch.randn(n, desc.latent_dim), torch.eye(2)[torch.arange(n) % 2])
    additions = n * desc.latent_dim if gaussian or components else 0
    assert n * desc.sampling_flops_per_sample() == counter.get_total_flops() + additions > 0


def test_a_decoder_layer_without_a_lipschitz_rule_is_an_error_not_a_smaller_bound():
    from alignfl_app.config import ConfigError
    from alignfl_app.models.lipschitz import layer_bounds

    decoder = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Conv2d(1, 1, 3))
    with pytest.raises(ConfigError, match="'1' \\(Conv2d\\) has weights but no Lipschitz bound"):
        layer_bounds(decoder)


def test_an_architecture_of_an_unknown_family_is_refused_naming_the_known_ones(tmp_path):
    from alignfl_app.config import ConfigError, load_architecture

    (tmp_path / "deep.toml").write_text('kind = "resnet"\nlatent_dim = 8\nhidden = [16]\n')
    with pytest.raises(ConfigError, match="unknown kind 'resnet': use one of \\['conv', 'gaussian', 'mlp'\\]"):
        load_architecture("deep", tmp_path)
    (tmp_path / "flat.toml").write_text('kind = "mlp"\nlatent_dim = 8\nhidden = [16]\nrefine = 1\n')
    with pytest.raises(ConfigError, match="refine = 1 applies to conv architectures only"):
        load_architecture("flat", tmp_path)
