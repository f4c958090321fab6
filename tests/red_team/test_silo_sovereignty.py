"""A silo's identity, data, policy and budget are its own: attacks by a run config and on the ledger.

Attacker's plan, written before reading the defence:
1. Re-home a silo through the run config: other ``silo-names`` (a fresh folder, no policy, no ledger), another
   ``run-name``, other ``silo-data-dirs`` (train on a folder the server picked), another ``data-root``; then ask
   for more epsilon or no DP in the new home.
2. A deployed node whose operator forgot ``silo-name``: let the run config name it.
3. A simulated silo's own file that tries to move it (``silo-dir``, ``partition-id``).
4. Reset a silo's budget by its ledger: delete it, replace it by a dangling symlink, restore an older copy, lower an
   entry's noise, raise the header's first-run cap, rewrite the whole chain with fresh hashes, move another silo's
   ledger in.
Every refusal is one line naming the file, and leaves the ledger as it was.
"""

from __future__ import annotations

import json
import shutil

import pytest

from alignfl_app.config import ConfigError, parse_run_config, silos_root
from alignfl_app.contract import records as P
from alignfl_app.privacy.ledger import LedgerState, PrivacyLedger
from alignfl_app.silo.setup import provision_simulated_silos, silo_node_config
from client_app.app import _silo
from tests.conftest import make_context, tiny_run_config
from tests.data.test_folders import make_folder
from tests.silo.test_client_reply import train_reply


@pytest.fixture(autouse=True)
def fresh_processes():
    """Each attack sees the silo as a new ClientApp process would."""
    _silo.cache_clear()
    yield
    _silo.cache_clear()


def dp_config(tmp_path, **extra) -> dict:
    return {
        **tiny_run_config(tmp_path / "results"),
        "dp-epsilon": 2.0,
        "num-server-rounds": 2,
        "dp-steps": 3,
        "audit": False,
        **extra,
    }


def silo0():
    return silos_root() / "silo-0"


def descriptor(reply) -> dict:
    return json.loads(reply.content[P.DESCRIPTOR][P.DESCRIPTOR_JSON])


def refused(reply, *needles: str) -> str:
    assert reply.has_error(), "the attack was accepted"
    reason = reply.error.reason
    assert "\n" not in reason and all(n in reason for n in needles), reason
    return reason


# ------------------------------------------------------------------------ 1-3: who says where a silo lives
def test_silo_names_and_run_name_in_the_run_config_never_re_home_a_silo(tmp_path):
    policy = silo0() / "privacy-policy.toml"
    policy.parent.mkdir(parents=True)
    policy.write_text("require-dp = true\nmax-epsilon = 2.0\n")
    base = dp_config(tmp_path, **{"run-name": "study"})
    assert not train_reply(base, 0)[0].has_error()
    ledger_before = (silo0() / "privacy-ledger.json").read_text()
    for attack in ({"silo-names": "h0;h1;h2"}, {"silo-names": "h0;h1;h2", "run-name": "other"}):
        _silo.cache_clear()
        refused(train_reply({**base, **attack, "dp-epsilon": 8.0}, 0)[0], "silo 'silo-0'", "at most epsilon 2")
        _silo.cache_clear()
        refused(train_reply({**base, **attack, "dp-epsilon": 0.0}, 0)[0], "silo 'silo-0'", "requires DP")
    assert (silo0() / "privacy-ledger.json").read_text() == ledger_before
    assert sorted(p.name for p in silos_root().iterdir()) == ["silo-0"]  # no new home was made


def test_a_simulated_silo_answers_under_its_own_name_whatever_silo_names_say(tmp_path):
    cfg = tiny_run_config(tmp_path / "results")
    provision_simulated_silos(silos_root(), parse_run_config({**cfg, "silo-names": "site-a;site-b;site-c"}))
    reply, _ = train_reply({**cfg, "silo-names": "evil-0;evil-1;evil-2"}, 0)
    assert descriptor(reply)["silo"] == "site-a"  # the server of that run rejects it: not one of its names
    assert (silos_root() / "silo-0" / "state").is_dir() and not (silos_root() / "evil-0").exists()


def test_silo_data_dirs_in_the_run_config_never_pick_a_silos_data(tmp_path):
    own, planted = tmp_path / "own", tmp_path / "planted"
    make_folder(own, {"cat": 6, "dog": 6})
    make_folder(planted, {"cat": 30, "dog": 30})
    cfg = {
        **tiny_run_config(tmp_path / "results"),
        "dataset": "folder",
        "silo-classes": "cat,dog",
        "outlier-dataset": "none",
        "silo-architectures": "mlp-small",
        "image-size": "28x28",
    }
    provision_simulated_silos(silos_root(), parse_run_config({**cfg, "silo-data-dirs": str(own)}))
    reply, _ = train_reply({**cfg, "silo-data-dirs": str(planted)}, 0)
    assert reply.content[P.METRICS]["num-examples"] == 10  # its own 12 images less the held-out fifth
    _silo.cache_clear()
    (silo0() / "node-config.toml").unlink()  # a silo without its own data folder refuses; it never borrows one
    refused(train_reply({**cfg, "silo-data-dirs": str(planted)}, 0)[0], "no data folder", "node-config.toml")


def test_a_deployed_node_without_silo_name_refuses_in_one_line(tmp_path):
    cfg = {**tiny_run_config(tmp_path / "results"), "silo-names": "ward-a;ward-b;ward-c"}
    ctx = make_context(cfg, 0, **{"silo-dir": str(tmp_path / "mine")})
    reason = refused(train_reply(cfg, 0, context=ctx)[0], "silo-name is missing")
    assert "ward-a" not in reason and not (tmp_path / "mine").exists()  # the run's name for it is not taken
    named = make_context(cfg, 0, **{"silo-name": "ward-a", "silo-dir": str(tmp_path / "mine")})
    assert descriptor(train_reply(cfg, 0, context=named)[0])["silo"] == "ward-a"


@pytest.mark.parametrize("line", ['silo-dir = "/tmp/elsewhere"', "partition-id = 3", "num-partitions = 9"])
def test_a_simulated_silos_own_file_cannot_move_it(tmp_path, line):
    (silo0()).mkdir(parents=True)
    (silo0() / "node-config.toml").write_text(line + "\n")
    with pytest.raises(ConfigError, match="comes from the machine") as err:
        silo_node_config({"partition-id": 0, "num-partitions": 3})
    assert "\n" not in str(err.value)


def test_a_reused_silos_folder_refuses_a_launch_that_renames_or_re_homes_its_silos(tmp_path):
    cfg = parse_run_config(tiny_run_config(tmp_path / "results"))
    provision_simulated_silos(tmp_path / "fed", cfg)
    provision_simulated_silos(tmp_path / "fed", cfg)  # the same federation again: fine
    for other in ({"silo-names": "a;b;c"}, {"data-root": str(tmp_path)}):
        with pytest.raises(ConfigError, match="fresh silos") as err:
            provision_simulated_silos(tmp_path / "fed", parse_run_config({**cfg.flat(), **other}))
        assert "\n" not in str(err.value) and "silo-0" in str(err.value)
    # a silo folder with history but no node config is silo-<k>: it is never renamed either
    (tmp_path / "old" / "silo-0" / "reports").mkdir(parents=True)
    with pytest.raises(ConfigError, match="silo-name='silo-0'"):
        provision_simulated_silos(tmp_path / "old", parse_run_config({**cfg.flat(), "silo-names": "a;b;c"}))


def test_every_launch_of_alignfl_run_gets_fresh_silos_unless_it_keeps_them(tmp_path, monkeypatch):
    from alignfl_app.tools.local_superlink import launch_silos

    monkeypatch.delenv("ALIGNFL_SILOS_ROOT")
    first, second = launch_silos(tmp_path, ""), launch_silos(tmp_path, "")
    assert first != second and first.parent == second.parent == tmp_path / "silos"
    named = launch_silos(tmp_path, "run-name='study'")
    assert named == tmp_path / "silos" / "study"
    (named / "silo-0").mkdir(parents=True)
    with pytest.raises(ConfigError, match="resume=true to continue it"):
        launch_silos(tmp_path, "run-name='study'")
    assert launch_silos(tmp_path, "run-name='study' resume=true") == named
    with pytest.raises(ConfigError, match="--silos DIR"):
        launch_silos(tmp_path, "run-name='lost' resume=true")
    assert launch_silos(tmp_path, "", str(tmp_path / "kept")) == tmp_path / "kept"
    monkeypatch.setenv("ALIGNFL_SILOS_ROOT", str(tmp_path / "env"))
    assert launch_silos(tmp_path, "run-name='study'") == tmp_path / "env"


# ------------------------------------------------------------------------------------- 4: the ledger
def trained_private_silo(tmp_path) -> dict:
    """Silo 0 after two private rounds (policy: budget for one more run); returns its run config."""
    policy = silo0() / "privacy-policy.toml"
    policy.parent.mkdir(parents=True)
    policy.write_text("budget-epsilon = 100.0\n")
    cfg = dp_config(tmp_path)
    ctx = make_context(cfg, 0)
    for rnd in (1, 2):
        assert not train_reply(cfg, 0, context=ctx, server_round=rnd)[0].has_error()
    return cfg


def next_run(cfg: dict):
    """A train request of a new run (another Flower run id) on the same silo."""
    _silo.cache_clear()
    ctx = make_context(cfg, 0)
    ctx.run_id = 2
    return train_reply(cfg, 0, context=ctx)[0]


def rewrite(path, change) -> None:
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))


def rehash(path) -> None:
    """What an attacker who knows the format does: recompute every hash so the chain holds again."""
    state = LedgerState.model_validate_json(path.read_text())
    entries, state.entries = state.entries, []
    for e in entries:
        state.append(e)
    path.write_text(state.model_dump_json())


def test_an_intact_ledger_books_the_next_run(tmp_path):
    cfg = trained_private_silo(tmp_path)
    assert not next_run(cfg).has_error()
    assert len(PrivacyLedger(silo0(), "silo-0").read().entries) == 3


@pytest.mark.parametrize(
    "attack, needles",
    [
        ("delete", ("is missing although", "reports/round-002.json")),
        ("dangling symlink", ("is missing although",)),
        ("delete with reports gone", ("is missing although", "state/")),
        ("older copy", ("holds 1 entries but", "recorded 2", "rolled back")),
        ("less noise in an entry", ("was edited", "entry 2 of 2")),
        ("larger first-run cap", ("was edited", "entry 1 of 2")),
        ("edit and rehash", ("does not match the head hash", "recorded after entry 2")),
        ("another silo's ledger", ("belongs to silo 'silo-1'",)),
    ],
)
def test_a_lost_rolled_back_or_edited_ledger_refuses_training_in_one_line(tmp_path, attack, needles):
    cfg = trained_private_silo(tmp_path)
    ledger = silo0() / "privacy-ledger.json"
    if attack == "older copy":
        older = tmp_path / "older.json"
        rewrite(ledger, lambda raw: None)
        state = LedgerState.model_validate_json(ledger.read_text())
        state.entries = state.entries[:1]  # a valid ledger: as it was after round 1
        older.write_text(state.model_dump_json())
        shutil.copy(older, ledger)
    elif attack in ("delete", "delete with reports gone"):
        ledger.unlink()
        if attack == "delete with reports gone":
            shutil.rmtree(silo0() / "reports")
    elif attack == "dangling symlink":
        ledger.unlink()
        ledger.symlink_to(tmp_path / "nowhere.json")
    elif attack == "less noise in an entry":
        rewrite(ledger, lambda raw: raw["entries"][1]["mechanisms"][0].__setitem__(0, 1e6))
    elif attack == "larger first-run cap":
        rewrite(ledger, lambda raw: raw.__setitem__("first_run_epsilon", 1e6))
    elif attack == "edit and rehash":
        rewrite(ledger, lambda raw: raw["entries"][1]["mechanisms"][0].__setitem__(0, 1e6))
        rehash(ledger)
    else:
        rewrite(ledger, lambda raw: raw.__setitem__("silo", "silo-1"))
        rehash(ledger)
    before = ledger.read_bytes() if ledger.exists() else None
    for request in (cfg, {**cfg, "dp-epsilon": 0.0}):  # a private round, and a round without DP
        reason = refused(next_run(request), "silo 'silo-0'", *needles)
        assert str(tmp_path) not in reason  # no path of the silo's machine
    assert (ledger.read_bytes() if ledger.exists() else None) == before  # nothing was booked or reset


def test_a_private_silo_without_its_ledger_neither_evaluates(tmp_path):
    from alignfl_app.models.global_model import GlobalModel
    from alignfl_app.privacy.errors import PrivacyRefusal

    cfg = trained_private_silo(tmp_path)
    (silo0() / "privacy-ledger.json").unlink()
    _silo.cache_clear()
    silo = _silo(
        json.dumps({**cfg, "dp-epsilon": 0.0}, sort_keys=True),
        json.dumps({"num-partitions": 3, "partition-id": 0}, sort_keys=True),
    )
    with pytest.raises(PrivacyRefusal, match="is missing although"):
        silo.evaluate_global("classifier", GlobalModel("classifier", 10).state())
