"""The attack bench as a user runs it: a small federation, an attacker, the server's verdicts and figures in a table."""

import json

import torch

from alignfl_app.cli import main
from alignfl_app.tools.attack_bench import PATCH, patched


def test_the_patch_is_a_bright_corner_and_nothing_else():
    x = torch.zeros(2, 1, 28, 28)
    p = patched(x)
    assert float(p.sum()) == 2 * PATCH * PATCH and float(p[..., -PATCH:, -PATCH:].min()) == 1.0
    assert float(x.sum()) == 0.0  # the test images are left as they were


def test_attack_bench_reports_what_the_server_did_with_each_attack(tmp_path, capsys):
    small = ["max-per-class=150", "local-min-steps=150", "synthetic-per-silo=300", "server-epochs=2"]
    code = main(
        ["attack-bench", "--set", *small, "--rounds", "2", "--attacks", "label-swap", "replay", "--out", str(tmp_path)]
    )
    assert code == 0
    report = json.loads((tmp_path / "attack-bench.json").read_text())
    rows = {r["attack"]: r for r in report["rows"]}
    assert set(rows) == {"honest", "label-swap", "replay"}
    assert rows["honest"]["attacker-verdicts"] == ["accepted", "accepted"]
    assert all(v.startswith("refused: its samples of class") for v in rows["label-swap"]["attacker-verdicts"])
    assert rows["replay"]["attacker-verdicts"] == ["accepted", "stale (replay of round 1)"]
    assert rows["honest"]["honest-classes-change"] == 0.0
    assert rows["honest"]["accuracy"] > 0.5  # the generators draw their digits: the bench measures something
    table = (tmp_path / "attack-bench.md").read_text()
    assert "| label-swap | refused: its samples of class '2'" in table
    assert "backdoor success" in capsys.readouterr().out
