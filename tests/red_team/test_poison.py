"""Red team, 3. poison (every attack class: tests/red_team/__init__.py)."""

from __future__ import annotations

import json

import numpy as np
import torch

from alignfl_app.config import parse_run_config
from alignfl_app.server.checkpoint import Checkpoint
from tests.red_team.attack_kit import (
    NODE,
    accuracy,
    honest,
    make_strategy,
    model_finite,
    one_line_reasons,
    reply,
    store_snapshot,
)


def test_3_overflowing_weights_rejected_at_trial_batch(trained, test_set, baseline, tmp_path):
    cfg, outs = trained
    desc, state = outs[0]
    overflow = {
        k: np.where(np.arange(v.size).reshape(v.shape) % 2 == 0, 3e38, -3e38).astype(np.float32)
        for k, v in state.items()
    }
    s = make_strategy(cfg, tmp_path)
    s.aggregate_train(1, honest(outs))
    before = store_snapshot(tmp_path)
    s.aggregate_train(2, [reply(NODE[0], desc, overflow), *honest(outs, (1, 2))])
    rejected = s.core.recorder.round(2)["rejected-replies"]
    assert len(rejected) == 1 and "finite" in rejected[0], rejected
    one_line_reasons(rejected)
    assert store_snapshot(tmp_path)["silo-0.npz"] == before["silo-0.npz"]
    assert model_finite(s) and accuracy(s, test_set) >= baseline["accuracy"] - 1e-6


def test_3_poisoned_generator_in_store_is_skipped_and_quarantined(trained, test_set, baseline, tmp_path):
    """It slipped past the checks (e.g. it draws NaN only for some latents): the server must contain it."""
    cfg, outs = trained
    desc, state = outs[2]
    s = make_strategy(cfg, tmp_path)
    s.aggregate_train(1, honest(outs))
    # +-3e38 alternating: inf - inf = NaN samples (all-positive 3e38 only saturates the sigmoid to finite 0/1)
    poison = {
        k: np.where(np.arange(v.size).reshape(v.shape) % 2 == 0, 3e38, -3e38).astype(np.float32)
        for k, v in state.items()
    }
    s.core.store.put(desc, poison, 1)  # bypasses check_decoder_state: the slipped-through case
    s.aggregate_train(2, honest(outs, (0, 1)))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "silo-2" in summary["quarantined"], summary.get("quarantined")
    q = summary["quarantined"]["silo-2"]
    assert q["round"] == 2 and "\n" not in q["reason"] and q["reason"]
    assert "silo-2" not in s.core.store.silos()
    assert model_finite(s)
    assert accuracy(s, test_set) >= baseline["accuracy"] - 0.15
    # the quarantined silo's later replies are refused, in one line
    s.aggregate_train(3, honest(outs))
    rejected = s.core.recorder.round(3)["rejected-replies"]
    assert len(rejected) == 1 and "quarantined" in rejected[0], rejected
    one_line_reasons(rejected)
    assert "silo-2" not in s.core.store.silos()
    ckpt = Checkpoint(tmp_path / "run")
    s.core.save_checkpoint(ckpt, 3)
    assert all(torch.isfinite(v).all() for v in ckpt.load_model(ckpt.load()).values() if v.is_floating_point())
    assert "silo-2" in ckpt.load().quarantined


def test_3_non_finite_server_round_is_rolled_back(trained, tmp_path):
    cfg, outs = trained
    hot = parse_run_config({**cfg.flat(), "server-learning-rate": 1e30})
    s = make_strategy(hot, tmp_path)
    before = {k: v.clone() for k, v in s.core.model.state().items()}
    s.aggregate_train(1, honest(outs))
    rnd = s.core.recorder.round(1)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    rolled = summary["rounds"]["1"]["rolled-back"] if "1" in summary["rounds"] else rnd.get("rolled-back")
    assert rolled and "\n" not in str(rolled), rnd
    after = s.core.model.state()
    assert all(torch.equal(before[k], after[k]) for k in before)
    ckpt = Checkpoint(tmp_path / "run")
    s.core.save_checkpoint(ckpt, 1)
    assert all(torch.isfinite(v).all() for v in ckpt.load_model(ckpt.load()).values() if v.is_floating_point())
