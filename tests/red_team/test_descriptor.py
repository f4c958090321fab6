"""Red team, 1. descriptor not pinned (every attack class: tests/red_team/__init__.py)."""

from __future__ import annotations

import json

import pytest

from tests.red_team.attack_kit import (
    NODE,
    honest,
    index_entries,
    make_strategy,
    model_finite,
    one_line_reasons,
    reply,
    store_snapshot,
)


def _desc_variants(desc):
    text = desc.model_dump_json()
    d = json.loads(text)

    def with_(**kw):
        return json.dumps({**d, **kw})

    return {
        "image 1x32x32": (with_(image_shape=[1, 32, 32]), "image_shape"),
        "image 3x28x28": (with_(image_shape=[3, 28, 28]), "image_shape"),
        "unconditional": (with_(layout="unconditional"), ["layout", "conditional"]),
        "all ten classes": (with_(classes=[str(c) for c in range(10)]), "classes"),
        "another silo's classes": (with_(classes=["2", "3"]), "classes"),
        "superset": (with_(classes=["0", "1", "2"]), "classes"),
        "subset": (with_(classes=["0"]), "classes"),
        "fullwidth look-alike class": (with_(classes=["0", "\uff11"]), "classes"),
        "duplicate classes": (with_(classes=["0", "0"]), "classes"),
        "trailing-space class": (with_(classes=["0", "1 "]), "classes"),
    }


DESC_VARIANTS = [
    "image 1x32x32",
    "image 3x28x28",
    "unconditional",
    "all ten classes",
    "another silo's classes",
    "superset",
    "subset",
    "fullwidth look-alike class",
    "duplicate classes",
    "trailing-space class",
]


@pytest.mark.parametrize("variant", DESC_VARIANTS)
def test_1_descriptor_not_pinned_is_rejected_and_round_2_unpoisoned(trained, test_set, baseline, tmp_path, variant):
    cfg, outs = trained
    desc, state = outs[0]
    text, keyword = _desc_variants(desc)[variant]
    s = make_strategy(cfg, tmp_path)
    s.aggregate_train(1, honest(outs))
    before_index, before_npz = index_entries(s), store_snapshot(tmp_path)
    # the attacker uses silo-0's own node, so only the descriptor check can stop it
    s.aggregate_train(2, [reply(NODE[0], desc, state, desc_json=text), *honest(outs, (1, 2))])
    rnd = s.core.recorder.round(2)
    assert rnd["accepted-replies"] == 2 and len(rnd["rejected-replies"]) == 1, rnd
    one_line_reasons(rnd["rejected-replies"])
    kws = [keyword] if isinstance(keyword, str) else keyword
    assert any(k in rnd["rejected-replies"][0] for k in kws), rnd["rejected-replies"]
    assert index_entries(s)["silo-0"] == before_index["silo-0"]
    assert store_snapshot(tmp_path)["silo-0.npz"] == before_npz["silo-0.npz"]
    # a second round is not poisoned: the real silo is still accepted and training is as without the attacker
    s.aggregate_train(3, honest(outs))
    assert s.core.recorder.round(3)["accepted-replies"] == 3 and not s.core.recorder.round(3)["rejected-replies"]
    assert model_finite(s)
