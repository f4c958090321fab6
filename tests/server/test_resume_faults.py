"""Server faults: silos that die or time out mid-round, and a server killed and resumed from its checkpoint."""

import json
import logging
import subprocess
import sys

import numpy as np
import pytest

from alignfl_app.config import ConfigError
from tests.conftest import PROJECT, tiny_run_config
from tests.local_grid import run_server


@pytest.fixture
def flwr_log():
    """Lines Flower's logger emitted during the test."""
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    logger = logging.getLogger("flwr")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def config(tmp_path, **overrides) -> dict:
    return {**tiny_run_config(tmp_path / "results"), "server-threads": 1, "run-name": "r", **overrides}


def summary(tmp_path) -> dict:
    return json.loads((tmp_path / "results" / "r" / "summary.json").read_text())


def stored_rounds(tmp_path) -> dict[str, int]:
    index = json.loads((tmp_path / "results" / "r" / "generators" / "index.json").read_text())
    return {s: e["stored_round"] for s, e in index["generators"].items()}


def test_silo_that_dies_or_fails_mid_round_does_not_stop_it(tmp_path, flwr_log):
    # round 2: silo-1 never answers (dead / past round-timeout), silo-2's ClientApp raises
    run_server(
        config(tmp_path, **{"num-server-rounds": 2, "round-timeout": 5.0}), faults={(2, 1): "timeout", (2, 2): "error"}
    )
    s = summary(tmp_path)
    assert s["status"] == "completed"
    r2 = s["rounds"][1]
    assert r2["accepted-replies"] == 1 and r2["missing-replies"] == ["silo-1"]
    assert len(r2["rejected-replies"]) == 1 and "disk full" in r2["rejected-replies"][0]
    assert r2["stale-silos"] == ["silo-1", "silo-2"]
    assert r2["generators-used"] == ["silo-0", "silo-1", "silo-2"] and r2["server"]["synthetic-samples"] == 3 * 40
    assert stored_rounds(tmp_path) == {"silo-0": 2, "silo-1": 1, "silo-2": 1}
    assert any("No train reply in time" in line and "silo-1" in line for line in flwr_log)
    assert any("their stored one is used" in line and "silo-2" in line for line in flwr_log)


def test_killed_server_resumes_after_last_completed_round(tmp_path, flwr_log):
    cfg = config(tmp_path, **{"num-server-rounds": 3})
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
    assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL while asking for round 3
    ckpt = tmp_path / "results" / "r" / "checkpoint"
    assert json.loads((ckpt / "state.json").read_text())["completed_round"] == 2
    with np.load(ckpt / "global-model-round-0002.npz", allow_pickle=False) as npz:
        round2_model = {k: npz[k] for k in npz.files}
    assert stored_rounds(tmp_path) == {"silo-0": 2, "silo-1": 2, "silo-2": 2}

    with pytest.raises(ConfigError, match="already holds a run.*resume=true"):
        run_server(cfg)  # same run-name without resume must not clobber the stored state
    with pytest.raises(ConfigError, match="synthetic-per-silo"):
        run_server({**cfg, "resume": True, "synthetic-per-silo": 7})

    # resume with new node ids (as in a new simulation run); silo-2 is down in round 3, so its
    # round-2 generator must stand in for it
    grid = run_server({**cfg, "resume": True, "round-timeout": 5.0}, faults={(3, 2): "timeout"}, node_base=2000)
    assert grid.train_rounds == [3, 3, 3]
    assert any("Resuming after round 2" in line for line in flwr_log)
    s = summary(tmp_path)
    assert s["status"] == "completed" and [r["round"] for r in s["rounds"]] == [1, 2, 3]
    assert s["resumed-after-rounds"] == [2]
    r3 = s["rounds"][2]
    # node 2002 never answered in this run, so the server only knows it by id; silo-2 is stale
    assert r3["generators-used"] == ["silo-0", "silo-1", "silo-2"] and r3["missing-replies"] == ["node-2002"]
    assert r3["stale-silos"] == ["silo-2"]
    assert stored_rounds(tmp_path) == {"silo-0": 3, "silo-1": 3, "silo-2": 2}
    assert r3["rejected-replies"] == [] and r3["accepted-replies"] == 2
    assert s["rounds"][1]["global"]["accuracy"] is not None  # round 2, measured before the kill, kept
    assert json.loads((ckpt / "state.json").read_text())["completed_round"] == 3
    with np.load(ckpt / "global-model-round-0003.npz", allow_pickle=False) as npz:
        round3_model = {k: npz[k] for k in npz.files}
    assert set(round3_model) == set(round2_model)
    assert any(not np.array_equal(round3_model[k], round2_model[k]) for k in round2_model)


def test_too_few_silos_at_the_start_stop_the_run_with_the_fix(tmp_path, flwr_log):
    """No silent partial federation: 2 SuperNodes for 3 configured silos stop the run, naming num-supernodes."""
    with pytest.raises(ConfigError) as err:
        run_server(config(tmp_path, **{"round-timeout": 2.0}), num_silos=2)
    message = str(err.value)
    assert "only 2 of the 3 configured silos" in message and "num-supernodes=3" in message and "\n" not in message
    assert summary(tmp_path)["status"] == "failed"
    # min-silos lets a run start with fewer silos on purpose; the missing one is named in every round
    run_server(
        config(tmp_path, **{"round-timeout": 2.0, "min-silos": 2, "run-name": "partial", "num-server-rounds": 1}),
        num_silos=2,
    )
    partial = json.loads((tmp_path / "results" / "partial" / "summary.json").read_text())
    assert partial["status"] == "completed" and partial["rounds"][0]["generators-used"] == ["silo-0", "silo-1"]
