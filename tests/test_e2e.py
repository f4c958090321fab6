"""End to end: `flwr run .` on a private SuperLink (Ray simulation), as a user runs it."""

import json

import pytest

from alignfl_app.tools.local_superlink import simulation_superlink
from tests.conftest import PROJECT

pytestmark = pytest.mark.e2e


def test_flwr_run_completes_and_writes_summary(tmp_path):
    results = tmp_path / "results"
    run_config = (
        f"results-dir='{results}' run-name='e2e' num-server-rounds=2 max-per-class=100 outliers-per-silo=20 "
        "local-epochs=1 synthetic-per-silo=100 server-epochs=1 silo-classes='0,1;2,3;4,5' "
        "silo-architectures='mlp-small;conv' sample-grid-per-silo=4"
    )
    with simulation_superlink(tmp_path, PROJECT) as link:
        run, log = link.run_app(run_config, num_supernodes=3)
    assert run["status"] == "finished:completed", log[-4000:]
    run_dir = results / "e2e"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and [r["round"] for r in summary["rounds"]] == [1, 2]
    last = summary["rounds"][-1]
    assert 0.0 <= summary["final-global-accuracy"] <= 1.0
    assert len(summary["final-per-class-accuracy"]) == 10
    assert set(summary["final-per-silo-accuracy"]) == {"silo-0", "silo-1", "silo-2"}
    assert last["generators-used"] == ["silo-0", "silo-1", "silo-2"] and last["rejected-replies"] == []
    archs = {s: m["architecture"] for s, m in last["silos"].items()}
    assert archs == {"silo-0": "mlp-small", "silo-1": "conv", "silo-2": "mlp-small"}
    assert all(m["bytes-up"] > 0 and m["bytes-down-eval"] > 0 for m in last["silos"].values())
    assert last["silos"]["silo-0"]["num-outliers"] == 20
    # silo 0's outlier audit reached the summary; the stored generator reproduces its decoder-only numbers
    from alignfl_app.audit import audit_run

    audit = last["silos"]["silo-0"]
    assert 0.0 <= audit["audit-mapping-rate"] <= 1.0 and 0.0 <= audit["audit-member-nearer-rate"] <= 1.0
    again = audit_run(run_dir)["silo-0"]
    for key in ("audit-leakage-rate", "audit-member-nearer-rate", "audit-mia-auc"):
        assert again[key] == pytest.approx(audit[key]), key
    for name in ("accuracy.png", "samples/round-001.png", "samples/round-002.png", "global_model_classifier.pt"):
        assert (run_dir / name).stat().st_size > 0, name


def test_bad_run_config_fails_the_run_with_a_clear_reason(tmp_path):
    with simulation_superlink(tmp_path, PROJECT) as link:
        run, log = link.run_app(f"results-dir='{tmp_path}' silo-classes='0,1;1,2'", num_supernodes=2, timeout=300)
    assert run["status"] != "finished:completed"
    assert "disjoint" in log, log[-3000:]
