"""Red team, 8. in-contract generators the server must not learn from: another silo's decoder (as it is, or with
noise to hide it), a blank or constant decoder, one that ignores its latent, and a silo replaying its last bytes
(every attack class: tests/red_team/__init__.py)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.red_team.attack_kit import NODE, honest, make_strategy, one_line_reasons, reply, store_snapshot


def round2(cfg, outs, tmp_path, attack):
    """Round 1 honest; round 2 the attacker (as silo 0) and the two honest silos. Returns the strategy and the
    store as round 1 left it."""
    s = make_strategy(cfg, tmp_path)
    s.aggregate_train(1, honest(outs))
    before = store_snapshot(tmp_path)
    s.aggregate_train(2, [reply(NODE[0], outs[0][0], attack), *honest(outs, (1, 2))])
    return s, before


def refused(s, tmp_path, before, *words):
    rejected = s.core.recorder.round(2)["rejected-replies"]
    assert len(rejected) == 1, rejected
    one_line_reasons(rejected)
    assert all(w in rejected[0] for w in words), rejected
    assert store_snapshot(tmp_path)["silo-0.npz"] == before["silo-0.npz"]  # the silo's last good generator stays


@pytest.mark.parametrize("noise", [0.0, 1e-5, 1e-2])
def test_another_silos_decoder_is_refused_as_a_copy(trained, tmp_path, noise):
    cfg, outs = trained
    rng = np.random.default_rng(0)
    stolen = outs[2][1]  # silo 2 has silo 0's architecture (mlp-small) and as many classes
    copy = {
        k: (v + noise * np.abs(v).mean() * rng.standard_normal(v.shape)).astype(np.float32) for k, v in stolen.items()
    }
    s, before = round2(cfg, outs, tmp_path, copy)
    refused(s, tmp_path, before, "copy of silo 'silo-2'")


def test_independently_trained_generators_are_far_from_copies(trained):
    """Silo 0 and silo 2 have one architecture and as many classes: the judge draws them from the same latents."""
    from alignfl_app.server.judging import COPY_DISTANCE, GeneratorJudge, sample_distance
    from alignfl_app.server.store import GeneratorTerms

    cfg, outs = trained
    judge = GeneratorJudge.from_config(cfg, GeneratorTerms.from_config(cfg))
    drawn = [judge.draw(outs[k][0], _decoder(outs[k])) for k in (0, 2)]
    assert drawn[0].key == drawn[1].key
    assert sample_distance(drawn[0].x, drawn[1].x) > 5 * COPY_DISTANCE


def _decoder(out):
    import torch

    desc, state = out
    decoder = desc.empty_decoder().to_empty(device="cpu")
    decoder.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    return decoder.eval()


def test_a_blank_decoder_is_refused_as_collapsed(trained, tmp_path):
    cfg, outs = trained
    blank = {k: np.zeros_like(v) for k, v in outs[0][1].items()}
    s, before = round2(cfg, outs, tmp_path, blank)
    refused(s, tmp_path, before, "collapsed")


def test_a_decoder_that_ignores_its_latent_is_refused_as_collapsed(trained, tmp_path):
    """Every weight kept except the first layer's latent inputs: each class is drawn as one fixed image."""
    cfg, outs = trained
    desc, state = outs[0]
    first = next(k for k, v in state.items() if v.ndim == 2 and v.shape[1] == desc.latent_dim + desc.cond_dim)
    deaf = dict(state)
    deaf[first] = state[first].copy()
    deaf[first][:, : desc.latent_dim] = 0.0
    s, before = round2(cfg, outs, tmp_path, deaf)
    refused(s, tmp_path, before, "collapsed", "class '")


def test_replayed_bytes_store_nothing_new_and_the_silo_is_stale(trained, tmp_path):
    cfg, outs = trained
    s = make_strategy(cfg, tmp_path)
    s.aggregate_train(1, honest(outs))
    s.aggregate_train(2, [*honest(outs, (0,)), *[reply(NODE[k], *outs[k]) for k in (1, 2)]])
    rnd = s.core.recorder.round(2)
    assert rnd["rejected-replies"] == [] and rnd["stale-silos"] == ["silo-0", "silo-1", "silo-2"]
    assert rnd["silos"]["silo-0"]["replay-of-round"] == 1
    assert {s.core.store.entry(k)["stored_round"] for k in s.core.store.silos()} == {1}


def test_honest_generators_pass_with_their_spread_recorded(trained, tmp_path):
    cfg, outs = trained
    s = make_strategy(cfg, tmp_path)
    s.aggregate_train(1, honest(outs))
    rnd = s.core.recorder.round(1)
    assert rnd["rejected-replies"] == []
    spreads = {k: m["sample-spread-min"] for k, m in rnd["silos"].items()}
    # measured 0.05 (the conv silo, one epoch on 60 records per class) to 0.11 here; 0.09 to 0.15 in the default run
    assert all(v > 3 * cfg.server.judge_min_spread for v in spreads.values()), spreads
