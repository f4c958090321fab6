"""Red team, 2. memory (every attack class: tests/red_team/__init__.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from alignfl_app.config import ArchitectureSpec, parse_run_config
from tests.red_team.attack_kit import NODE, honest, make_strategy, one_line_reasons, reply, rss_mb, store_snapshot


@pytest.mark.parametrize(
    "arch",
    [
        dict(kind="mlp", latent_dim=256, hidden=(4096, 4096, 4096, 4096)),
        dict(kind="conv", latent_dim=256, hidden=(4096, 4096)),
        dict(kind="mlp", latent_dim=10**7, hidden=(10**7,) * 4),
        dict(kind="conv", latent_dim=2**31, hidden=(2**31, 2**31)),
    ],
)
def test_2_tiny_reply_declaring_huge_decoder_is_rejected_without_allocating(trained, tmp_path, arch):
    cfg, outs = trained
    desc, state = outs[0]
    d = json.loads(desc.model_dump_json())
    d["architecture"] = {"name": "huge", **{k: (list(v) if isinstance(v, tuple) else v) for k, v in arch.items()}}
    s = make_strategy(cfg, tmp_path)
    s.aggregate_train(1, honest(outs))
    before = store_snapshot(tmp_path)
    tiny = {"w": np.zeros(1, np.float32)}
    rss0 = rss_mb()  # memory only: speed belongs in benchmarks, not in tests
    from alignfl_app.contract.replies import ReplyRejected
    from server_app.messages import train_reply

    with pytest.raises(ReplyRejected) as exc:
        s.core.accept(2, NODE[0], train_reply(reply(NODE[0], desc, tiny, desc_json=json.dumps(d)), 1 << 26))
    grown = rss_mb() - rss0
    assert "\n" not in str(exc.value) and str(exc.value)
    assert grown < 200, grown
    assert store_snapshot(tmp_path) == before and s.core.store.entry("silo-0")["stored_round"] == 1


def test_2_decoder_within_byte_limit_but_huge_activations_exceeds_max_sampling_mb(trained, tmp_path):
    cfg, outs = trained
    small = parse_run_config({**cfg.flat(), "max-sampling-mb": 64.0})
    desc, _ = outs[1]  # silo-1 is the conv silo
    # few parameters, 4096 channels at 14x14: ~6 MiB of activations per sample, 64 samples > 64 MiB
    arch = ArchitectureSpec(name="wide", kind="conv", latent_dim=desc.architecture.latent_dim, hidden=(4096, 8))
    attack = desc.model_copy(update={"architecture": arch})
    state = {
        k: (np.random.default_rng(0).standard_normal(v.shape) * 0.01).astype(np.float32)
        for k, v in attack.empty_decoder().state_dict().items()
    }
    assert sum(a.nbytes for a in state.values()) < small.server.max_decoder_mb * 2**20  # within the byte limit
    s = make_strategy(small, tmp_path)
    s.aggregate_train(1, honest(outs))  # honest silos fit the bound
    assert s.core.recorder.round(1)["accepted-replies"] == 3, s.core.recorder.round(1)
    before = store_snapshot(tmp_path)
    rss0 = rss_mb()
    s.aggregate_train(2, [reply(NODE[1], attack, state), *honest(outs, (0, 2))])
    rejected = s.core.recorder.round(2)["rejected-replies"]
    assert len(rejected) == 1 and ("max-sampling-mb" in rejected[0] or "MiB" in rejected[0]), rejected
    one_line_reasons(rejected)
    assert rss_mb() - rss0 < 200
    assert store_snapshot(tmp_path)["silo-1.npz"] == before["silo-1.npz"]
    # sampling of every stored generator runs in chunks within the bound
    for silo in s.core.store.silos():
        d = s.core.store.descriptor(silo)
        assert s.core.terms.sampling_chunk(d) * d.sampling_bytes_per_sample() <= small.server.max_sampling_mb * 2**20
