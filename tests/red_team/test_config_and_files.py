"""Red team, 6. config and files (every attack class: tests/red_team/__init__.py)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from alignfl_app.config import ConfigError, parse_node_config, parse_run_config
from alignfl_app.files import StorageError
from alignfl_app.server.checkpoint import Checkpoint
from alignfl_app.server.store import GeneratorStore
from tests.conftest import tiny_run_config
from tests.red_team.attack_kit import NODE, checkpointed_round, honest, make_strategy, reply, store_snapshot


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
    s, ckpt = checkpointed_round(cfg, outs, tmp_path)
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


def _linked(tmp_path: Path, name: str) -> Path:
    """``tmp_path/name`` as a symbolic link to an empty folder elsewhere (where writes must never land)."""
    target = tmp_path / "elsewhere" / name
    target.mkdir(parents=True)
    link = tmp_path / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target, target_is_directory=True)
    return link


def _refused_in_one_line(exc: pytest.ExceptionInfo, path: Path) -> None:
    message = str(exc.value)
    assert isinstance(exc.value, StorageError) and "\n" not in message, message
    assert str(path) in message and "symbolic link" in message, message


@pytest.mark.parametrize("linked", ["generators", "run", "run/samples", "results"])
def test_6_linked_run_folders_are_refused_never_written_through(tmp_path, linked):
    from alignfl_app.server.metrics import RunRecorder

    link = _linked(tmp_path, linked)
    with pytest.raises(ConfigError) as exc:
        if linked == "generators":
            GeneratorStore(link)
        elif linked == "results":
            RunRecorder(link / "run", {})
        else:
            RunRecorder(tmp_path / "run", {})
    _refused_in_one_line(exc, link)
    assert not any((tmp_path / "elsewhere").rglob("*.*")), list((tmp_path / "elsewhere").rglob("*"))


def test_6_linked_checkpoint_folder_is_neither_written_nor_resumed(trained, tmp_path):
    cfg, outs = trained
    s = make_strategy(cfg, tmp_path)
    s.aggregate_train(1, honest(outs))
    link = _linked(tmp_path, "run/checkpoint")
    with pytest.raises(ConfigError) as exc:
        s.core.save_checkpoint(Checkpoint(tmp_path / "run"), 1)
    _refused_in_one_line(exc, link)
    assert not any((tmp_path / "elsewhere").rglob("*.*"))
    with pytest.raises(ConfigError) as exc:
        Checkpoint(tmp_path / "run").load()
    _refused_in_one_line(exc, link)


def test_6_linked_results_folder_stops_the_server_app_in_one_line(tmp_path):
    """The real ServerApp: a linked run folder stops it before anything is trained or written."""
    from tests.local_grid import run_server

    link = _linked(tmp_path, "results/r")
    with pytest.raises(ConfigError) as exc:
        run_server({**tiny_run_config(tmp_path / "results"), "run-name": "r", "server-threads": 1})
    _refused_in_one_line(exc, link)
    assert not any((tmp_path / "elsewhere").rglob("*.*"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_6_read_only_results_folder_is_one_line(tmp_path):
    from alignfl_app.server.metrics import RunRecorder

    results = tmp_path / "results"
    results.mkdir()
    results.chmod(0o500)
    try:
        with pytest.raises(StorageError) as exc:
            RunRecorder(results / "run", {})
    finally:
        results.chmod(0o700)
    assert "\n" not in str(exc.value) and "not writable" in str(exc.value)


@pytest.mark.parametrize(
    "code, fix", [(errno.EROFS, "read-only"), (errno.EACCES, "not writable"), (errno.ENOSPC, "full disk")]
)
def test_6_refused_writes_are_one_line_naming_the_folder_and_the_fix(tmp_path, monkeypatch, code, fix):
    from alignfl_app.server.metrics import RunRecorder

    recorder = RunRecorder(tmp_path / "run", {})
    recorder.write()
    before = (tmp_path / "run" / "summary.json").read_bytes()
    _disk_refuses(monkeypatch, code)
    recorder.summary["status"] = "changed"
    with pytest.raises(StorageError) as exc:
        recorder.write()
    message = str(exc.value)
    assert "\n" not in message and str(tmp_path / "run") in message and fix in message, message
    assert (tmp_path / "run" / "summary.json").read_bytes() == before
    assert _leftovers(tmp_path) == []


def _disk_refuses(monkeypatch, code: int, only: str = "") -> None:
    """Every new file whose name starts with ``only`` fails as the machine would fail it (errno ``code``)."""
    real = tempfile.mkstemp

    def mkstemp(*args, prefix: str = "", **kwargs):
        if prefix.startswith(f".{only}"):
            raise OSError(code, os.strerror(code))
        return real(*args, prefix=prefix, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


def _leftovers(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.rglob(".*") if p.is_file())


def _retrained(outs):
    """Round-2 replies: each silo's decoder a little changed (the same bytes again would be a replay, not stored)."""
    return [reply(NODE[s], outs[s][0], {k: v * np.float32(1.001) for k, v in outs[s][1].items()}) for s in outs]


def _resumed(cfg, tmp_path):
    s = make_strategy(parse_run_config({**cfg.flat(), "run-name": "study", "resume": True}), tmp_path)
    return s, s.core.first_round(Checkpoint(tmp_path / "run"))


@pytest.mark.parametrize("full_at", ["generator", "index.json", "state.json"])
def test_6_a_full_disk_mid_round_leaves_a_resumable_checkpoint(trained, tmp_path, monkeypatch, full_at):
    """Round 2 fails on a full disk while storing a generator (its file or the store's index), or while
    checkpointing: the run stops in one line, the store and the round-1 checkpoint are as they were, and
    resume=true continues at round 2."""
    cfg, outs = trained
    cfg = parse_run_config({**cfg.flat(), "run-name": "study"})
    s, ckpt = checkpointed_round(cfg, outs, tmp_path)
    round1 = {k: v.clone() for k, v in s.core.model.state().items()}
    stored, stored_silos = store_snapshot(tmp_path), s.core.store.silos()
    with monkeypatch.context() as m:
        if full_at != "state.json":
            _disk_refuses(m, errno.ENOSPC, only="" if full_at == "generator" else full_at)
            with pytest.raises(StorageError) as exc:
                s.aggregate_train(2, _retrained(outs))
            assert store_snapshot(tmp_path) == stored
            assert {x: s.core.store.entry(x)["stored_round"] for x in s.core.store.silos()} == dict.fromkeys(
                stored_silos, 1
            )
        else:
            s.aggregate_train(2, _retrained(outs))
            _disk_refuses(m, errno.ENOSPC, only="state.json")
            with pytest.raises(StorageError) as exc:
                s.core.save_checkpoint(ckpt, 2)
    assert "\n" not in str(exc.value) and "full disk" in str(exc.value) and "resume=true" in str(exc.value)
    assert ckpt.load().completed_round == 1 and _leftovers(tmp_path) == []
    resumed, first = _resumed(cfg, tmp_path)
    assert first == 2
    assert all(torch.equal(resumed.core.model.state()[k], round1[k]) for k in round1)
    assert json.loads((tmp_path / "generators" / "index.json").read_text())["generators"].keys() == set(stored_silos)
    resumed.aggregate_train(2, _retrained(outs))
    assert resumed.core.recorder.round(2)["accepted-replies"] == 3
    assert {x: resumed.core.store.entry(x)["stored_round"] for x in stored_silos} == dict.fromkeys(stored_silos, 2)


def test_6_a_run_stopped_before_its_first_checkpoint_resumes_at_round_1(trained, tmp_path, monkeypatch):
    """A full disk at the first checkpoint leaves stored generators and no checkpoint: a plain rerun is refused
    (it would mix two runs), and resume=true starts round 1 again with them."""
    cfg, outs = trained
    cfg = parse_run_config({**cfg.flat(), "run-name": "study"})
    s = make_strategy(cfg, tmp_path)
    s.aggregate_train(1, honest(outs))
    with monkeypatch.context() as m:
        _disk_refuses(m, errno.ENOSPC, only="state.json")
        with pytest.raises(StorageError):
            s.core.save_checkpoint(Checkpoint(tmp_path / "run"), 1)
    with pytest.raises(ConfigError, match="resume=true"):
        make_strategy(cfg, tmp_path).core.first_round(Checkpoint(tmp_path / "run"))
    resumed, first = _resumed(cfg, tmp_path)
    assert first == 1 and resumed.core.store.silos() == ["silo-0", "silo-1", "silo-2"]


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d.update(classes=["0", "1"]),  # another silo's classes
        lambda d: d["architecture"].update(hidden=[8]),  # a decoder other than the stored tensors
        lambda d: d.update(silo="silo-2"),  # the entry names another silo
    ],
)
def test_6_an_edited_store_index_is_refused_on_resume(trained, tmp_path, edit):
    cfg, outs = trained
    cfg = parse_run_config({**cfg.flat(), "run-name": "study"})
    s, _ = checkpointed_round(cfg, outs, tmp_path)
    index = tmp_path / "generators" / "index.json"
    tampered = json.loads(index.read_text())
    edit(tampered["generators"]["silo-1"]["descriptor"])
    index.write_text(json.dumps(tampered))
    with pytest.raises(ConfigError) as exc:
        _resumed(cfg, tmp_path)
    assert "\n" not in str(exc.value) and "silo-1" in str(exc.value), exc.value
