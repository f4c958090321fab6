"""A silo continues where it was: its VAEs, optimizer moments and DP carry survive a restarted process."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from alignfl_app.config import parse_node_config, parse_run_config
from alignfl_app.privacy.errors import PrivacyBudgetExceeded
from alignfl_app.privacy.ledger import PrivacyLedger
from alignfl_app.silo.core import Silo
from alignfl_app.silo.state import SiloStateError
from tests.conftest import PROJECT, tiny_run_config
from tests.local_grid import run_server


def run_config(tmp_path, **extra) -> dict:
    return {**tiny_run_config(tmp_path / "results"), "max-per-class": 150, "audit": False, "run-name": "study", **extra}


def silo(cfg: dict, partition: int = 0) -> Silo:
    """A new Silo object: what a restarted SuperNode process builds."""
    return Silo(parse_run_config(cfg), parse_node_config({"partition-id": partition}))


def loss(out) -> float:
    return float(out.metrics.record()["train-loss"])


def test_a_restarted_silo_continues_its_vaes_and_optimizers(tmp_path):
    cfg = run_config(tmp_path)
    first = silo(cfg).continue_round("study", 1)
    restarted = silo(cfg).continue_round("study", 2)  # a new process: nothing in memory
    state = tmp_path / "silos" / "silo-0" / "state" / "study"
    header = json.loads((state / "state.json").read_text())
    assert header["format"] == 1 and header["round"] == 2 and header["identity"]["layout"] == "conditional"
    assert sorted(p.name for p in state.glob("*.pt")) == ["round-002.pt"]
    # the uninterrupted silo, state in memory: the restarted one trained exactly as it would have
    uninterrupted = silo(cfg, 0)
    one = uninterrupted.train_round("other", 1)
    two = uninterrupted.train_round("other", 2, one.state)
    assert loss(one) == pytest.approx(loss(first))
    assert loss(restarted) == pytest.approx(loss(two), rel=1e-5)
    # and far below where a fresh VAE starts: round 2 continues from round 1's level
    fresh_round_2 = silo(cfg).train_round("fresh", 2)
    assert loss(restarted) < 0.9 * loss(first) and loss(restarted) < 0.9 * loss(fresh_round_2)


def test_another_architecture_starts_fresh_with_one_line(tmp_path, caplog):
    cfg = run_config(tmp_path)
    silo(cfg).continue_round("study", 1)
    changed = run_config(tmp_path, **{"silo-architectures": "conv;conv"})
    with caplog.at_level(logging.INFO, logger="flwr.alignfl"):
        out = silo(changed).continue_round("study", 2)
    lines = [r.getMessage() for r in caplog.records if "start fresh" in r.getMessage()]
    assert len(lines) == 1 and "architecture" in lines[0] and "silo-0" in lines[0]
    assert loss(out) == pytest.approx(loss(silo(changed).train_round("x", 2)), rel=1e-5)  # a fresh round 2


def test_a_newer_or_corrupt_state_is_refused_with_the_fix(tmp_path):
    cfg = run_config(tmp_path)
    silo(cfg).continue_round("study", 1)
    header = tmp_path / "silos" / "silo-0" / "state" / "study" / "state.json"
    good = header.read_text()
    header.write_text(json.dumps({**json.loads(good), "format": 2}))
    with pytest.raises(SiloStateError) as err:
        silo(cfg).continue_round("study", 2)
    message = str(err.value)
    assert "\n" not in message and "format 2" in message and str(header) in message
    assert "delete" in message and "run-name" in message
    header.write_text(good)
    (header.parent / "round-001.pt").write_bytes(b"not a tensor file")
    with pytest.raises(SiloStateError, match="round-001.pt.*corrupt.*delete"):
        silo(cfg).continue_round("study", 2)
    header.write_text("{")
    with pytest.raises(SiloStateError, match="unreadable"):
        silo(cfg).continue_round("study", 2)


def dp_config(tmp_path) -> dict:
    return run_config(tmp_path, **{"dp-epsilon": 4.0, "num-server-rounds": 2, "dp-steps": 3})


def test_the_dp_carry_continues_and_spend_is_neither_lost_nor_double_booked(tmp_path):
    cfg = dp_config(tmp_path)
    silo(cfg).continue_round("study", 1)
    restarted = silo(cfg).continue_round("study", 2)  # no re-released counts: the carry came from disk
    ledger = PrivacyLedger(tmp_path / "silos" / "silo-0", "silo-0").read()
    assert [(e.run, e.round) for e in ledger.entries] == [("study", 1), ("study", 2)]
    uninterrupted = silo(cfg, 0)
    uninterrupted.dir = tmp_path / "elsewhere"  # its own ledger
    one = uninterrupted.train_round("study", 1)
    two = uninterrupted.train_round("study", 2, one.state)
    spent = restarted.metrics.record()["dp-epsilon-spent"]
    assert spent == pytest.approx(two.metrics.record()["dp-epsilon-spent"])
    assert spent == pytest.approx(ledger.entries[-1].epsilon_after)
    # a round asked again after a restart is refused, its spend stays booked
    with pytest.raises(PrivacyBudgetExceeded, match="trains each once"):
        silo(cfg).continue_round("study", 2)


def test_a_ledger_of_a_newer_format_is_refused_and_the_current_one_read(tmp_path):
    cfg = dp_config(tmp_path)
    silo(cfg).continue_round("study", 1)
    path = tmp_path / "silos" / "silo-0" / "privacy-ledger.json"
    raw = json.loads(path.read_text())
    assert raw["format"] == 2
    del raw["format"]  # written before the format field: read as format 1
    path.write_text(json.dumps(raw))
    assert PrivacyLedger(path.parent, "silo-0").read().format == 1
    path.write_text(json.dumps({**raw, "format": 3}))
    with pytest.raises(PrivacyBudgetExceeded) as err:
        PrivacyLedger(path.parent, "silo-0").read()
    assert "format 3" in str(err.value) and "upgrade alignfl" in str(err.value) and "\n" not in str(err.value)


def test_a_resumed_run_continues_the_silos_losses(tmp_path):
    """The server is SIGKILLed at round 3 and resumed with new node ids (a new run's nodes, their memory gone):
    round 3's silos continue from round 2's level, not from a fresh VAE's."""
    cfg = {
        **run_config(tmp_path, **{"run-name": "r"}),
        "num-server-rounds": 3,
        "server-threads": 1,
        "sample-grid-per-silo": 0,
    }
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json, sys; from tests.local_grid import run_server; "
            "run_server(json.loads(sys.argv[1]), kill_at_round=3)",
            json.dumps(cfg),
        ],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    run_server({**cfg, "resume": True}, node_base=2000)
    rounds = json.loads((tmp_path / "results" / "r" / "summary.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    for name in ("silo-0", "silo-1", "silo-2"):
        first, second, third = (r["silos"][name]["train-loss"] for r in rounds)
        assert second < 0.9 * first and third < 1.05 * second, (name, first, second, third)


def test_a_new_run_reusing_a_run_name_starts_fresh_unless_it_resumes(tmp_path):
    """Another Flower run of the same run-name continues the state only with resume=true; a SuperNode restarted
    within the same Flower run always continues."""
    cfg = run_config(tmp_path)
    first = silo(cfg).continue_round("study", 1, flower_run="101")
    same_run = silo(cfg).continue_round("study", 2, flower_run="101")
    new_run = silo(cfg).continue_round("study", 2, flower_run="202")  # resume=false: not this run's state
    resumed = silo({**cfg, "resume": True}).continue_round("study", 3, flower_run="303")
    fresh = silo(cfg).train_round("fresh", 2)
    assert loss(same_run) < 0.9 * loss(first)
    assert loss(new_run) == pytest.approx(loss(fresh), rel=1e-5)
    assert loss(resumed) < 0.9 * loss(new_run)


def test_the_ledger_books_a_resumed_run_under_its_first_flower_run_and_a_reused_name_anew(tmp_path):
    cfg = dp_config(tmp_path)
    policy = tmp_path / "silos" / "silo-0" / "privacy-policy.toml"
    policy.parent.mkdir(parents=True)
    policy.write_text("budget-epsilon = 100.0\n")  # room for a second run
    silo(cfg).continue_round("study", 1, flower_run="101")
    silo({**cfg, "resume": True}).continue_round("study", 2, flower_run="202")  # resumed: run 101's budget
    silo(cfg).continue_round("study", 1, flower_run="303")  # a new run of that name: not refused, booked apart
    ledger = PrivacyLedger(tmp_path / "silos" / "silo-0", "silo-0").read()
    assert [(e.run, e.round) for e in ledger.entries] == [("101", 1), ("101", 2), ("303", 1)]
