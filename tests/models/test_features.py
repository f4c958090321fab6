"""The scattering feature space and the gaussian family that generates in it: shapes, the fit, the server's checks
and the refusals a run or a silo gets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from alignfl_app.config import ConfigError, load_architecture, parse_node_config, parse_run_config
from alignfl_app.contract.descriptor import GeneratorDescriptor
from alignfl_app.contract.replies import ReplyRejected
from alignfl_app.contract.sampling import SamplingStyle, sample_generator
from alignfl_app.models.families.gaussian import GaussianDecoder, fit_class_mixtures
from alignfl_app.models.features import FeatureSpace, FeatureSpec
from alignfl_app.server.store import GeneratorTerms, check_decoder_state
from tests.conftest import tiny_run_config

SCATTERING = {"feature-space": "scattering", "scattering-scales": 2, "silo-architectures": "gaussian"}


@pytest.mark.parametrize(
    "shape, spec",
    [
        ((1, 28, 28), FeatureSpec(space="scattering", scales=2)),
        ((3, 32, 32), FeatureSpec(space="scattering", scales=3, angles=4, pool=2)),
        ((1, 64, 64), FeatureSpec(space="scattering")),
    ],
)
def test_the_declared_feature_shape_is_what_the_transform_computes(shape, spec):
    space = FeatureSpace(spec, shape)
    out = space(torch.rand(3, *shape))
    assert tuple(out.shape) == (3, *spec.out_shape(shape)) and torch.isfinite(out).all()
    assert FeatureSpace(FeatureSpec(), shape)(x := torch.rand(2, *shape)) is x  # pixels: the images themselves


def test_a_feature_space_finer_than_the_image_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="needs image sides of at least 32") as err:
        parse_run_config({**tiny_run_config("r"), **SCATTERING, "scattering-scales": 3, "scattering-pool": 4})
    assert "\n" not in str(err.value)


def test_the_gaussian_decoder_draws_the_fitted_gaussian_of_each_class():
    spec = load_architecture("gaussian")
    g = torch.Generator().manual_seed(0)
    cov = torch.tensor([[2.0, 0.6], [0.6, 0.5]])
    data = [
        torch.randn(4000, 2, generator=g) @ torch.linalg.cholesky(cov).T + m
        for m in (torch.tensor([3.0, -1.0]), torch.tensor([-2.0, 4.0]))
    ]
    decoder = GaussianDecoder(spec, cond_dim=2, image_shape=(2,))
    fit_class_mixtures([decoder], [(torch.cat(data), torch.arange(2).repeat_interleave(4000))], seed=1)
    z, labels = _draw(decoder, 20000)
    for c, m in enumerate((torch.tensor([3.0, -1.0]), torch.tensor([-2.0, 4.0]))):
        drawn = z[labels == c]
        assert torch.allclose(drawn.mean(0), m, atol=0.05) and torch.allclose(torch.cov(drawn.T), cov, atol=0.08)
    assert decoder.slope() == pytest.approx(
        float(torch.linalg.matrix_norm(torch.linalg.cholesky(cov), ord=2)), rel=0.05
    )


def _draw(decoder, n):
    labels = torch.arange(n) % 2
    with torch.no_grad():
        return decoder(
            torch.randn(n, 2, generator=torch.Generator().manual_seed(3)),
            torch.nn.functional.one_hot(labels, 2).float(),
        ), labels


def gaussian_run(tmp_path, **extra) -> dict:
    return {**tiny_run_config(tmp_path / "results"), **SCATTERING, "generator-layout": "per-class", **extra}


def test_a_gaussian_silo_shares_features_the_server_accepts_and_draws(tmp_path):
    from alignfl_app.silo.core import Silo

    cfg = parse_run_config(gaussian_run(tmp_path))
    out = Silo(cfg, parse_node_config({"partition-id": 1})).train_round("run", 1)
    desc = out.descriptor
    assert desc.features == cfg.features.spec and desc.output_shape == (81,) and desc.latent_dim == 81
    state = {k: v.numpy() for k, v in out.decoder_state.items()}
    terms = GeneratorTerms.from_config(cfg)
    decoder = check_decoder_state(desc, state, terms)
    x, y = sample_generator(desc, decoder, 40, terms.class_ids(desc), SamplingStyle(), seed=2)
    assert x.shape == (40, 81) and torch.isfinite(x).all() and set(y.tolist()) == {2, 3}
    assert out.metrics.record()["lipschitz-upper-bound"] > 0 and out.metrics.record()["num-examples"] == 120
    # another feature space, or a pixel run, does not accept it
    other = parse_run_config(gaussian_run(tmp_path, **{"scattering-angles": 4}))
    with pytest.raises(ReplyRejected, match="feature space"):
        check_decoder_state(desc, state, GeneratorTerms.from_config(other))
    pixels = GeneratorTerms.from_config(parse_run_config(tiny_run_config(tmp_path / "results")))
    with pytest.raises(ReplyRejected, match="feature space"):
        check_decoder_state(desc, state, pixels)
    with pytest.raises(ValueError, match="draws features"):
        GeneratorDescriptor.model_validate({**desc.model_dump(), "features": None})


@pytest.mark.parametrize(
    "extra, needle",
    [
        ({"feature-space": "pixels"}, "generates features: set feature-space='scattering'"),
        ({"dp-epsilon": 2.0}, "has no DP training"),
        ({"lipschitz": "spectral"}, "lipschitz applies to VAE decoders"),
        ({"global-model": "vae", "silo-architectures": "mlp"}, "feeds a classifier"),
    ],
)
def test_a_run_the_gaussian_family_cannot_serve_is_refused_in_one_line(tmp_path, extra, needle):
    with pytest.raises(ConfigError, match=needle) as err:
        parse_run_config(gaussian_run(tmp_path, **extra))
    assert "\n" not in str(err.value)


def test_a_silo_whose_node_config_picks_gaussian_in_a_pixel_run_refuses_in_one_line(tmp_path):
    from alignfl_app.silo.core import Silo

    cfg = parse_run_config(tiny_run_config(tmp_path / "results"))
    with pytest.raises(ConfigError, match="generates features") as err:
        Silo(cfg, parse_node_config({"partition-id": 0, "architecture": "gaussian"}))
    assert "\n" not in str(err.value)


def test_a_scattering_run_trains_the_feature_classifier_on_pixel_and_feature_generators_alike(tmp_path):
    """Mixed families on two plants of (stand-in) ELPV cells: the mono plant's gaussian shares features, the poly
    plant's mlp VAE shares images that the server draws through the transform; the global model is judged on the
    real test cells through the same transform and saved with its feature space (not its filters)."""
    import json

    from tests.data.standins import elpv_standin
    from tests.local_grid import run_server

    elpv_standin(tmp_path / "data")
    run_config = {
        **tiny_run_config(tmp_path / "results"),
        **SCATTERING,
        "dataset": "elpv",
        "data-root": str(tmp_path / "data"),
        "silo-layout": "by-source",
        "silo-classes": "0,1;0,1",
        "image-size": "32x32",
        "silo-architectures": "gaussian;mlp-small",
        "num-server-rounds": 1,
        "run-name": "mixed",
        "synthetic-per-silo": 600,
        "server-epochs": 5,
        "outlier-dataset": "none",
    }
    run_server(run_config, num_silos=2)
    summary = json.loads((tmp_path / "results" / "mixed" / "summary.json").read_text())
    rnd = summary["rounds"][0]
    assert rnd["accepted-replies"] == 2 and rnd["generators-used"] == ["silo-0", "silo-1"]
    assert {s: m["architecture"] for s, m in rnd["silos"].items()} == {"silo-0": "gaussian", "silo-1": "mlp-small"}
    # cracked cells vs clean ones: far above the 0.5 of a constant answer on balanced accuracy
    assert summary["final-global-balanced-accuracy"] > 0.75, summary["final-per-class-accuracy"]
    saved = torch.load(tmp_path / "results" / "mixed" / "global_model_classifier.pt", weights_only=True)
    assert saved["features"]["space"] == "scattering" and not any("scattering" in k for k in saved["state-dict"])
    assert np.isfinite(rnd["global"]["loss"]) and not math.isnan(summary["final-global-accuracy"])
