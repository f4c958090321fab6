"""Red team, own attacks (every attack class: tests/red_team/__init__.py)."""

from __future__ import annotations

import json

import numpy as np

from alignfl_app.config import parse_run_config
from alignfl_app.server.checkpoint import Checkpoint
from alignfl_app.server.store import GeneratorStore
from tests.red_team.attack_kit import (
    NODE,
    checkpointed_round,
    evaluate_msg,
    honest,
    make_strategy,
    one_line_reasons,
    reply,
    store_snapshot,
)


def test_own_descriptor_round_far_in_future_is_harmless(trained, tmp_path):
    cfg, outs = trained
    desc, state = outs[0]
    d = json.loads(desc.model_dump_json())
    d["round"] = 10**40
    s = make_strategy(cfg, tmp_path)
    s.aggregate_train(1, [reply(NODE[0], desc, state, desc_json=json.dumps(d)), *honest(outs, (1, 2))])
    rnd = s.core.recorder.round(1)
    # either refused in one line, or stored without breaking the store / summary / checkpoint
    one_line_reasons(rnd["rejected-replies"] or ["ok"])
    GeneratorStore(tmp_path / "generators")
    ckpt = Checkpoint(tmp_path / "run")
    s.core.save_checkpoint(ckpt, 1)
    ckpt.load()
    json.loads((tmp_path / "run" / "summary.json").read_text())
    s.aggregate_train(2, honest(outs))
    assert s.core.recorder.round(2)["accepted-replies"] == 3


def test_own_many_and_zero_size_tensors(trained, tmp_path):
    cfg, outs = trained
    desc, state = outs[0]
    s = make_strategy(cfg, tmp_path)
    s.aggregate_train(1, honest(outs))
    before = store_snapshot(tmp_path)
    many = {**state, **{f"t{i}": np.zeros(0, np.float32) for i in range(20_000)}}
    zero = {k: np.zeros((0,) + v.shape[1:], np.float32) for k, v in state.items()}
    s.aggregate_train(2, [reply(NODE[0], desc, many), reply(NODE[0], desc, zero), *honest(outs, (1, 2))])
    rnd = s.core.recorder.round(2)
    assert rnd["accepted-replies"] == 2 and len(rnd["rejected-replies"]) == 2, rnd
    one_line_reasons(rnd["rejected-replies"])
    assert store_snapshot(tmp_path)["silo-0.npz"] == before["silo-0.npz"]
    assert (tmp_path / "run" / "summary.json").stat().st_size < 1_000_000


def test_own_reject_flood_keeps_summary_small(trained, tmp_path):
    """500 junk replies in one round, each with a long reason: summary.json stays small, reasons stay one line."""
    cfg, outs = trained
    desc, state = outs[0]
    s = make_strategy(cfg, tmp_path)
    junk = [reply(20_000 + i, desc, state, desc_json='{"silo": "' + "\\n" * 2000 + '"}') for i in range(500)]
    s.aggregate_train(1, [*junk, *honest(outs)])
    rnd = s.core.recorder.round(1)
    assert rnd["accepted-replies"] == 3
    one_line_reasons(rnd["rejected-replies"])
    assert (tmp_path / "run" / "summary.json").stat().st_size < 1_000_000


def test_own_same_node_sends_two_replies_in_a_round(trained, tmp_path):
    """A node sending its silo's reply twice (a replay) must not count twice or replace the first silently."""
    cfg, outs = trained
    s = make_strategy(cfg, tmp_path)
    s.core.nodes_to_ask(1, list(NODE.values()))
    s.aggregate_train(1, [*honest(outs), reply(NODE[0], *outs[0])])
    rnd = s.core.recorder.round(1)
    assert rnd["accepted-replies"] == 3, rnd
    one_line_reasons(rnd["rejected-replies"])


def test_own_one_node_sending_many_evaluate_replies_counts_once(trained, tmp_path):
    """A bound silo answers an evaluate instruction five times: it must weigh as one silo, not five
    (five copies also move the median cap that is meant to stop a huge count)."""
    cfg, outs = trained
    s = make_strategy(cfg, tmp_path)
    s.aggregate_train(1, honest(outs))
    good = {"accuracy": 0.5, "loss": 1.0, "num-examples": 100}
    flood = [evaluate_msg(NODE[2], {**good, "accuracy": 1.0, "num-examples": 10**9}) for _ in range(5)]
    result = dict(s.aggregate_evaluate(1, [evaluate_msg(NODE[0], good), evaluate_msg(NODE[1], good), *flood]))
    assert result["silo-mean-eval"] <= 0.5 + 0.5 / 3 + 1e-6, result


def test_own_resume_does_not_let_the_first_node_rebind_a_silo_name(trained, tmp_path):
    """Server restart (resume=true, no silo-nodes): the checkpoint knows silo-0 is node 1000. A node that answers
    first after the restart under 'silo-0' must not take the name (and the real node be locked out)."""
    cfg, outs = trained
    named = parse_run_config({**cfg.flat(), "run-name": "study"})
    s, ckpt = checkpointed_round(named, outs, tmp_path)
    resumed = make_strategy(parse_run_config({**named.flat(), "resume": True}), tmp_path)
    assert resumed.core.first_round(ckpt) == 2
    desc, state = outs[0]
    constant = {k: np.zeros_like(v) for k, v in state.items()}  # finite, passes every check: grey images as '0','1'
    resumed.aggregate_train(2, [reply(6666, desc, constant), *honest(outs)])
    rnd = resumed.core.recorder.round(2)
    assert resumed.core.registry.name_of(6666) is None, "a stranger took silo-0's name after the restart"
    assert resumed.core.registry.name_of(NODE[0]) == "silo-0"
    assert rnd["accepted-replies"] == 3 and len(rnd["rejected-replies"]) == 1, rnd
    one_line_reasons(rnd["rejected-replies"])
    with np.load(tmp_path / "generators" / "silo-0.npz") as npz:
        assert any(np.abs(npz[k]).sum() > 0 for k in npz.files)  # the real silo's decoder, not the constant one
