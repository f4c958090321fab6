"""Red team, 5. identity (every attack class: tests/red_team/__init__.py)."""

from __future__ import annotations

import json

import pytest

from alignfl_app.config import parse_run_config
from alignfl_app.server.checkpoint import Checkpoint
from tests.conftest import retrained
from tests.red_team.attack_kit import (
    NODE,
    evaluate_msg,
    honest,
    make_strategy,
    model_finite,
    one_line_reasons,
    reply,
    store_snapshot,
)


def test_4_bound_silo_cannot_dominate_the_silo_mean_with_a_huge_count(trained, tmp_path):
    """A silo's own node (bound, asked) reports accuracy 1.0 over the largest count the schema allows."""
    cfg, outs = trained
    s = make_strategy(cfg, tmp_path)
    s.aggregate_train(1, honest(outs))
    good = {"accuracy": 0.5, "loss": 1.0, "num-examples": 100}
    result = dict(
        s.aggregate_evaluate(
            1,
            [
                evaluate_msg(NODE[0], good),
                evaluate_msg(NODE[1], good),
                evaluate_msg(NODE[2], {**good, "accuracy": 1.0, "num-examples": 10**9}),
            ],
        )
    )
    # one silo of three may move a mean of silos by at most its own share
    assert result["silo-mean-eval"] <= 0.5 + 0.5 / 3 + 1e-6, result


def test_5a_first_reply_cannot_bind_a_name_outside_the_run(trained, tmp_path):
    cfg, outs = trained
    desc, state = outs[0]
    s = make_strategy(cfg, tmp_path)
    # 41 nodes race to bind names before the real silos: silo-3..silo-43, 'SILO-0' (case), 'silo-0.' etc.
    names = [f"silo-{i}" for i in range(3, 44)] + ["SILO-0", "Silo-1", "silo-00", "silo-0."]
    attackers = [reply(5000 + i, desc.model_copy(update={"silo": n}), state) for i, n in enumerate(names)]
    s.aggregate_train(1, [*attackers, *honest(outs)])
    rnd = s.core.recorder.round(1)
    assert s.core.store.silos() == ["silo-0", "silo-1", "silo-2"], s.core.store.silos()
    assert rnd["accepted-replies"] == 3
    one_line_reasons(rnd["rejected-replies"])
    assert all("silo" in r for r in rnd["rejected-replies"] if not r.startswith("..."))
    assert set(s.core.registry.silo_of_node) == set(NODE.values())


def test_5a_custom_silo_names_pin_identity(trained, tmp_path):
    cfg, outs = trained
    named = parse_run_config({**cfg.flat(), "silo-names": "hospital-a;hospital-b;hospital-c"})
    s = make_strategy(named, tmp_path)
    desc, state = outs[0]
    s.aggregate_train(
        1,
        [
            reply(NODE[0], desc, state),  # 'silo-0' is not a name of this run
            reply(NODE[1], desc.model_copy(update={"silo": "hospital-a"}), state),
        ],
    )
    rnd = s.core.recorder.round(1)
    assert s.core.store.silos() == ["hospital-a"] and rnd["accepted-replies"] == 1
    assert len(rnd["rejected-replies"]) == 1 and "silo" in rnd["rejected-replies"][0]


def test_5b_name_never_moves_when_owner_is_offline(trained, tmp_path):
    cfg, outs = trained
    s = make_strategy(cfg, tmp_path)
    s.core.nodes_to_ask(1, list(NODE.values()))
    s.aggregate_train(1, honest(outs))
    # round 2: silo-0's node is offline when the round starts; an attacker node connects and claims silo-0
    asked = s.core.nodes_to_ask(2, [NODE[1], NODE[2], 6666])
    before = store_snapshot(tmp_path)
    s.aggregate_train(2, [reply(6666, *outs[0]), *honest(outs, (1, 2))])
    rejected = s.core.recorder.round(2)["rejected-replies"]
    assert len(rejected) == 1 and "silo-0" in rejected[0], rejected
    one_line_reasons(rejected)
    assert store_snapshot(tmp_path)["silo-0.npz"] == before["silo-0.npz"]
    assert s.core.registry.name_of(NODE[0]) == "silo-0" and s.core.registry.name_of(6666) is None
    # round 3: the real silo is back and is still accepted
    s.core.nodes_to_ask(3, list(NODE.values()) + [6666])
    s.aggregate_train(3, [reply(NODE[0], outs[0][0], retrained(outs[0][1])), *honest(outs, (1, 2))])
    assert s.core.recorder.round(3)["accepted-replies"] == 3, s.core.recorder.round(3)
    assert s.core.store.entry("silo-0")["stored_round"] == 3
    del asked


def test_5c_rejected_switch_deletes_no_binding(trained, tmp_path):
    cfg, outs = trained
    s = make_strategy(cfg, tmp_path)
    s.aggregate_train(1, honest(outs))
    bindings = dict(s.core.registry.silo_of_node)
    # node of silo-0 claims silo-1 (with silo-1's own valid decoder), then silo-2
    s.aggregate_train(2, [reply(NODE[0], *outs[1]), reply(NODE[0], *outs[2])])
    rejected = s.core.recorder.round(2)["rejected-replies"]
    assert len(rejected) == 2, rejected
    one_line_reasons(rejected)
    assert s.core.registry.silo_of_node == bindings
    # everyone is still accepted under their own names
    s.aggregate_train(3, honest(outs))
    assert s.core.recorder.round(3)["accepted-replies"] == 3


def test_5d_operator_mapping_binds_nodes(trained, tmp_path):
    cfg, outs = trained
    mapped = parse_run_config({**cfg.flat(), "silo-nodes": "silo-0=1000,silo-1=1001,silo-2=1002"})
    s = make_strategy(mapped, tmp_path)
    asked = s.core.nodes_to_ask(1, [1000, 1001, 1002, 7777])
    assert 7777 not in asked and sorted(asked) == [1000, 1001, 1002]
    before_round = [
        reply(7777, *outs[0]),  # a node outside the mapping, first to reply
        reply(NODE[0], *outs[1]),
    ]  # a listed node claiming another listed name
    s.aggregate_train(1, [*before_round, *honest(outs)])
    rnd = s.core.recorder.round(1)
    assert rnd["accepted-replies"] == 3 and len(rnd["rejected-replies"]) == 2, rnd
    one_line_reasons(rnd["rejected-replies"])
    assert s.core.registry.name_of(7777) is None
    assert {s.core.store.entry(x)["descriptor"]["classes"][0] for x in s.core.store.silos()} == {"0", "2", "4"}
    assert s.core.store.descriptor("silo-0").classes == ("0", "1")


def test_5e_replies_from_nodes_not_asked_are_ignored(trained, tmp_path):
    cfg, outs = trained
    s = make_strategy(cfg, tmp_path)
    # round 1: only silo-0's and silo-1's nodes were connected and asked; silo-2's name is still unbound
    s.core.nodes_to_ask(1, [NODE[0], NODE[1]])
    s.aggregate_train(1, [*honest(outs, (0, 1)), reply(8888, *outs[2])])  # 8888 was never asked
    rnd = s.core.recorder.round(1)
    assert "silo-2" not in s.core.store.silos(), "an unasked node bound silo-2 and stored a generator"
    assert rnd["accepted-replies"] == 2 and len(rnd["rejected-replies"]) == 1, rnd
    one_line_reasons(rnd["rejected-replies"])
    assert s.core.registry.name_of(8888) is None


def test_5f_operator_withdrawal(trained, test_set, tmp_path):
    from alignfl_app.server.operator import withdraw

    cfg, outs = trained
    s = make_strategy(cfg, tmp_path)
    s.core.nodes_to_ask(1, list(NODE.values()))
    s.aggregate_train(1, honest(outs))
    withdraw(tmp_path / "run", "silo-1", "consent revoked")
    # withdrawing a name outside the run or a path changes nothing
    with pytest.raises(ValueError):
        withdraw(tmp_path / "run", "../silo-0")
    asked = s.core.nodes_to_ask(2, list(NODE.values()))
    assert NODE[1] not in asked
    assert "silo-1" not in s.core.store.silos() and not (tmp_path / "generators" / "silo-1.npz").exists()
    s.aggregate_train(2, honest(outs))  # silo-1 replies anyway
    rnd = s.core.recorder.round(2)
    assert rnd["accepted-replies"] == 2 and len(rnd["rejected-replies"]) == 1, rnd
    assert "withdrawn" in rnd["rejected-replies"][0]
    one_line_reasons(rnd["rejected-replies"])
    assert "silo-1" not in rnd["generators-used"] and "silo-1" not in s.core.store.silos()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["withdrawn"] == {"silo-1": 2}
    assert model_finite(s)
    ckpt = Checkpoint(tmp_path / "run")
    s.core.save_checkpoint(ckpt, 2)
    assert ckpt.load().withdrawn == {"silo-1": 2}


def test_5_evaluate_reply_claiming_a_bound_silo_name_is_not_recorded_under_it(trained, tmp_path):
    cfg, outs = trained
    s = make_strategy(cfg, tmp_path)
    s.aggregate_train(1, honest(outs))
    s.aggregate_evaluate(
        1,
        [
            evaluate_msg(NODE[0], {"accuracy": 0.4, "num-examples": 10}),
            evaluate_msg(9999, {"accuracy": 1.0, "num-examples": 10}, silo_name="silo-0"),
        ],
    )
    silos = s.core.recorder.round(1)["silos"]
    assert silos["silo-0"]["eval-accuracy"] == pytest.approx(0.4)
    assert not any(k.startswith("silo-0") and k != "silo-0" for k in silos), sorted(silos)
