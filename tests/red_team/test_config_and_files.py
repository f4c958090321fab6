"""Red team, 6. config and files (every attack class: tests/red_team/__init__.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from alignfl_app.config import ConfigError, parse_node_config, parse_run_config
from alignfl_app.server.checkpoint import Checkpoint
from alignfl_app.server.store import GeneratorStore
from tests.conftest import tiny_run_config
from tests.red_team.attack_kit import honest, make_strategy, store_snapshot


@pytest.mark.parametrize(
    "override",
    [
        {"run-name": ".."},
        {"run-name": "a/b"},
        {"run-name": "/etc"},
        {"run-name": "."},
        {"silo-architectures": "../../x;conv"},
        {"silo-architectures": "/etc/passwd;conv"},
        {"seed": 2**63 - 1 + 1},
        {"seed": 2**70},
        {"seed": -1},
        {"server-learning-rate": float("inf")},
        {"server-learning-rate": float("nan")},
        {"sample-temperature": float("inf")},
        {"sample-temperature": float("nan")},
        {"max-sampling-mb": float("nan")},
        {"max-sampling-mb": float("inf")},
        {"max-sampling-mb": 0.0},
        {"silo-names": "a;b"},
        {"silo-names": "../x;b;c"},
        {"silo-names": "a;A;b"},
        {"silo-nodes": "silo-0=1,silo-1=1"},
        {"silo-nodes": "silo-9=1"},
        {"silo-nodes": "silo-0=99999999999999999999999"},
    ],
)
def test_6_config_refused_in_one_line(tmp_path, override):
    raw = {**tiny_run_config(tmp_path / "results"), **override}
    with pytest.raises(ConfigError) as exc:
        parse_run_config(raw)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("override", [{"silo-name": "../silo-0"}, {"silo-name": "."}, {"partition-id": -1}])
def test_6_node_config_refused_in_one_line(override):
    with pytest.raises(ConfigError) as exc:
        parse_node_config({"partition-id": 0, **override})
    assert "\n" not in str(exc.value)


def test_6_seed_at_the_limit_is_usable(tmp_path):
    """2**63-1 is allowed by the schema: it must not crash anything derived from it (seeds are mixed)."""
    cfg = parse_run_config({**tiny_run_config(tmp_path / "results"), "seed": 2**63 - 1})
    from alignfl_app.seeds import server_training_seed, synthesis_seed

    torch.Generator().manual_seed(synthesis_seed(cfg.run.seed, 10**6, 10**3, 100))
    torch.manual_seed(server_training_seed(cfg.run.seed, 10**6, 10**3))


@pytest.mark.parametrize("target", ["../../etc/passwd", "/etc/passwd", "silo-0.npz"])
def test_6_tampered_index_file_is_never_followed(trained, tmp_path, target):
    cfg, outs = trained
    s = make_strategy(cfg, tmp_path)
    s.aggregate_train(1, honest(outs))
    index = tmp_path / "generators" / "index.json"
    tampered = json.loads(index.read_text())
    tampered["generators"]["silo-1"]["file"] = target
    index.write_text(json.dumps(tampered))
    desc, decoder = GeneratorStore(tmp_path / "generators").load_decoder("silo-1")
    assert desc.silo == "silo-1" and desc.architecture.kind == "conv"
    ref = {k: torch.from_numpy(v) for k, v in outs[1][1].items()}
    assert all(torch.equal(decoder.state_dict()[k], ref[k]) for k in ref)


def test_6_index_entry_renamed_to_a_path_is_refused(trained, tmp_path):
    cfg, outs = trained
    s = make_strategy(cfg, tmp_path)
    s.aggregate_train(1, honest(outs))
    index = tmp_path / "generators" / "index.json"
    tampered = json.loads(index.read_text())
    tampered["generators"]["../../x"] = tampered["generators"].pop("silo-1")
    index.write_text(json.dumps(tampered))
    with pytest.raises(ConfigError) as exc:
        GeneratorStore(tmp_path / "generators")
    assert "\n" not in str(exc.value)


def test_6_new_run_refuses_folder_with_stored_generators(trained, tmp_path):
    cfg, outs = trained
    s = make_strategy(cfg, tmp_path)
    s.aggregate_train(1, honest(outs))
    before = store_snapshot(tmp_path)
    again = make_strategy(cfg, tmp_path)
    with pytest.raises(ConfigError) as exc:
        again.core.first_round(Checkpoint(tmp_path / "run"))
    assert "resume" in str(exc.value) and "\n" not in str(exc.value)
    assert store_snapshot(tmp_path) == before


def test_6_newer_store_and_checkpoint_formats_refused_never_reset(trained, tmp_path):
    cfg, outs = trained
    s = make_strategy(cfg, tmp_path)
    s.aggregate_train(1, honest(outs))
    ckpt = Checkpoint(tmp_path / "run")
    s.core.save_checkpoint(ckpt, 1)
    index = tmp_path / "generators" / "index.json"
    raw = json.loads(index.read_text())
    raw["format"] = 99
    index.write_text(json.dumps(raw))
    before_index = index.read_bytes()
    with pytest.raises(ConfigError) as exc:
        GeneratorStore(tmp_path / "generators")
    assert "format" in str(exc.value) and "\n" not in str(exc.value)
    assert index.read_bytes() == before_index
    state = json.loads(ckpt.state_path.read_text())
    state["format"] = 99
    ckpt.state_path.write_text(json.dumps(state))
    before_state = ckpt.state_path.read_bytes()
    with pytest.raises(ConfigError) as exc:
        ckpt.load()
    assert "format" in str(exc.value) and "\n" not in str(exc.value)
    assert ckpt.state_path.read_bytes() == before_state


def test_6_corrupted_dataset_is_never_loaded(trained, tmp_path):
    from alignfl_app.data import datasets as D
    from alignfl_app.data import mnist

    cfg, _ = trained
    src_root = Path(cfg.data.data_root) if hasattr(cfg.data, "data_root") else None
    if src_root is None or not mnist.raw_dir(src_root, "mnist").is_dir():
        src_root = Path.home() / ".cache" / "alignfl" / "data"
    src = mnist.raw_dir(src_root, "mnist")
    dst = mnist.raw_dir(tmp_path / "data", "mnist")
    dst.mkdir(parents=True)
    for name in mnist.FILES:
        shutil.copy(src / name, dst / name)
    victim = dst / mnist.FILES[0]
    blob = bytearray(victim.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    victim.write_bytes(bytes(blob))
    assert D.verify(tmp_path / "data", "mnist")
    with pytest.raises(D.DataMissingError) as exc:
        D.load_split(str(tmp_path / "data"), "mnist", True)
    assert "\n" not in str(exc.value) and "checksum" in str(exc.value)
