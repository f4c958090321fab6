"""Fixtures of the red-team modules: the test set and the model two honest rounds train."""

from __future__ import annotations

import pytest

from alignfl_app.data.datasets import global_test_set
from tests.red_team.attack_kit import accuracy, honest, make_strategy


@pytest.fixture(scope="module")
def test_set(trained):
    cfg, _ = trained
    x, y = global_test_set(cfg)
    return x[:1000], y[:1000]


@pytest.fixture(scope="module")
def baseline(trained, test_set, tmp_path_factory):
    """Two honest rounds, no attacker: the model every attacked run is compared with."""
    cfg, outs = trained
    s = make_strategy(cfg, tmp_path_factory.mktemp("baseline"))
    s.aggregate_train(1, honest(outs))
    s.aggregate_train(2, honest(outs))
    return {"accuracy": accuracy(s, test_set), "state": {k: v.clone() for k, v in s.core.model.state().items()}}
