"""Bad configuration gives one line that names the key and the fix."""

import pytest

from alignfl_app.config import ConfigError, load_architecture, parse_node_config, parse_run_config
from alignfl_app.resources import conf_dir


@pytest.mark.parametrize(
    "override, fragment",
    [
        ({"silo-classes": "0,1;1,2"}, "disjoint"),
        ({"silo-classes": "0,1;;2"}, "at least one class"),
        ({"silo-classes": "0,a"}, "integers"),
        ({"outlier-silos": "7"}, "out of range"),
        ({"global-model": "gan"}, "global-model"),
        ({"conditional": False}, "global-model='vae'"),
        ({"outlier-dataset": "mnist"}, "must differ"),
        ({"local-epochs": 0}, "local-epochs"),
        ({"no-such-key": 1}, "no-such-key"),
        ({"seed": -1}, "seed"),
        ({"min-silos": 4}, "min-silos"),
        ({"run-name": ".."}, "not a name"),
        ({"run-name": "a/b"}, "not a name"),
        ({"silo-architectures": "mlp;../../etc/x"}, "not a name"),
        ({"learning-rate": float("inf")}, "finite"),
        ({"sample-temperature": float("nan")}, "finite"),
        ({"seed": 2**63}, "seed"),
    ],
)
def test_bad_run_config_is_one_line(override, fragment, tiny_config):
    with pytest.raises(ConfigError) as err:
        parse_run_config({**tiny_config, **override})
    message = str(err.value)
    assert fragment in message and "\n" not in message


def test_unknown_architecture_lists_known_ones():
    with pytest.raises(ConfigError, match=r"unknown architecture 'resnet9'.*'conv'.*'mlp'") as err:
        load_architecture("resnet9")
    assert "\n" not in str(err.value)


def test_malformed_architecture_file_is_rejected(tmp_path):
    (tmp_path / "bad.toml").write_text('kind = "mlp"\nlatent_dim = 0\nhidden = [64]\n')
    with pytest.raises(ConfigError, match="latent_dim"):
        load_architecture("bad", tmp_path)


def test_every_shipped_architecture_loads():
    for path in (conf_dir() / "architectures").glob("*.toml"):
        assert load_architecture(path.stem).name == path.stem


def test_refine_layers_are_for_conv_architectures_only(tmp_path):
    (tmp_path / "mlp-refined.toml").write_text('kind = "mlp"\nlatent_dim = 8\nhidden = [64]\nrefine = 1\n')
    with pytest.raises(ConfigError, match="refine = 1 applies to conv architectures only") as err:
        load_architecture("mlp-refined", tmp_path)
    assert "\n" not in str(err.value)


def test_node_config_overrides_validate():
    node = parse_node_config({"partition-id": 2, "architecture": "conv", "silo-name": "hospital-a"})
    assert (node.partition_id, node.architecture, node.silo_name) == (2, "conv", "hospital-a")
    with pytest.raises(ConfigError, match="partition-id"):
        parse_node_config({"architecture": "conv"})
    for absurd in ({"partition-id": 10**12}, {"partition-id": 0, "num-partitions": 10**9}):
        with pytest.raises(ConfigError, match="partition") as exc:
            parse_node_config(absurd)
        assert "\n" not in str(exc.value)


def test_node_config_check_is_one_line_and_strict():
    from client_app.node_config import check_node_config

    node = check_node_config('partition-id=3 silo-name="lab-c" architecture="conv" classes="6,7"')
    assert node.classes == (6, 7) and node.silo_name == "lab-c"
    for text, needle in [
        ('partition-id=0 silo-nam="a"', "silo-nam"),
        ('partition-id=0 silo-name="a" classes="6,6"', "distinct"),
        ('partition-id=0 silo-name="a" architecture="resnet"', "unknown architecture"),
        ('partition-id=0 silo-name="a" data-root="/no/such/dir"', "not a folder"),
        ('partition-id=0 silo-name="a" data-dir="/no/such/dir"', "data-dir '/no/such/dir' is not a folder"),
        ('partition-id=0 architecture="conv"', "silo-name is missing"),
        ("partition-id=0 silo-name=a b", "quote strings"),
    ]:
        with pytest.raises(ConfigError, match=needle) as info:
            check_node_config(text)
        assert "\n" not in str(info.value)


def test_pyproject_defaults_equal_the_config_model():
    """[tool.flwr.app.config] (what Flower hands the apps) and RunConfig's defaults agree key for key."""
    from alignfl_app.config import RunConfig
    from tests.conftest import default_run_config

    pyproject, model = default_run_config(), RunConfig().flat()
    assert sorted(pyproject) == sorted(model)
    assert {k: v for k, v in pyproject.items() if model[k] != v} == {}
    assert all(type(pyproject[k]) is type(model[k]) for k in model), "a default's type differs from pyproject's"


def test_list_valued_keys_are_parsed_once_and_written_back_flat():
    cfg = parse_run_config({"silo-classes": "0,1;2,3", "outlier-silos": "1", "silo-architectures": "conv;mlp"})
    assert cfg.data.silo_classes == ((0, 1), (2, 3)) and cfg.data.outlier_silos == (1,)
    assert cfg.local.architecture_for(3) == "mlp" and cfg.data.num_silos == 2
    flat = cfg.flat()
    assert (flat["silo-classes"], flat["outlier-silos"], flat["silo-architectures"]) == ("0,1;2,3", "1", "conv;mlp")
    assert parse_run_config(flat) == cfg


def test_silo_names_take_semicolons_like_every_per_silo_key_and_commas_with_a_warning():
    cfg = parse_run_config({"silo-classes": "0,1;2,3", "silo-names": "ward-a;ward-b"})
    assert cfg.data.names == ("ward-a", "ward-b") and cfg.flat()["silo-names"] == "ward-a;ward-b"
    with pytest.warns(FutureWarning, match="separate them with ';'"):
        old = parse_run_config({"silo-classes": "0,1;2,3", "silo-names": "ward-a,ward-b"})
    assert old == cfg


def test_architecture_names_are_never_paths(tmp_path):
    (tmp_path / "evil.toml").write_text('kind = "mlp"\nlatent_dim = 4\nhidden = [8]\n')
    for name in (str(tmp_path / "evil"), "../" * 6 + str(tmp_path / "evil")[1:], ".hidden"):
        with pytest.raises(ConfigError, match="not a name"):
            load_architecture(name)
    with pytest.raises(ConfigError, match="architecture"):
        parse_node_config({"partition-id": 0, "architecture": "../conv"})


# an absurd value of every resource-sized key: far past any honest run, within what a run config can say
ABSURD = {
    "num-server-rounds": 10**6,
    "round-timeout": 1e12,
    "min-silos": 10**9,
    "silo-classes": ";".join(["0,1"] * 5000),
    "max-per-class": 10**9,
    "outliers-per-silo": 10**9,
    "image-size": "100000x100000",
    "server-validation-per-class": 10**9,
    "local-epochs": 10**6,
    "local-min-steps": 10**9,
    "batch-size": 10**9,
    "latent-components": 10**6,
    "label-fidelity-samples": 10**9,
    "client-threads": 10**6,
    "dp-steps": 10**9,
    "audit-samples": 10**9,
    "scattering-scales": 100,
    "scattering-angles": 10**4,
    "scattering-pool": 10**4,
    "synthetic-per-silo": 10**9,
    "synthetic-total": 10**12,
    "server-epochs": 10**6,
    "server-batch-size": 10**9,
    "server-threads": 10**6,
    "max-decoder-mb": 1e9,
    "max-sampling-mb": 1e12,
    "max-sample-mflops": 1e12,
    "sample-grid-per-silo": 10**6,
    "judge-samples-per-class": 10**9,
    "reference-epochs": 10**6,
}
NOT_RESOURCES = {"seed"}  # integers that size nothing


@pytest.mark.parametrize("key", sorted(ABSURD))
def test_every_resource_sized_key_refuses_an_absurd_value_in_one_line(key, tiny_config):
    with pytest.raises(ConfigError) as err:
        parse_run_config({**tiny_config, "silo-layout": "slices", key: ABSURD[key]})
    message = str(err.value)
    assert f": {key}: " in message and "\n" not in message, message


def test_every_integer_and_memory_key_has_an_absurd_value_above():
    """A new count, size or memory key must get an upper bound (and a line in ABSURD)."""
    from alignfl_app.config import RunConfig

    sized = {
        field.alias or name.replace("_", "-")
        for model in RunConfig.SECTIONS.values()
        for name, field in model.model_fields.items()
        if field.annotation is int or name.endswith("_mb")
    }
    assert sized - NOT_RESOURCES <= set(ABSURD), sorted(sized - NOT_RESOURCES - set(ABSURD))


def test_the_shipped_experiments_fit_within_the_bounds():
    from alignfl_app.experiments import load_experiment

    paths = sorted((conf_dir() / "experiments").glob("*.toml"))
    assert paths
    for path in paths:
        load_experiment(path.stem)
