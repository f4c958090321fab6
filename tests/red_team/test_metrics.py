"""Red team, 4. metrics (every attack class: tests/red_team/__init__.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord

from alignfl_app.contract import records as P
from tests.red_team.attack_kit import (
    METRICS,
    NODE,
    accuracy,
    evaluate_msg,
    honest,
    make_strategy,
    model_finite,
    one_line_reasons,
    reply,
    store_snapshot,
)


def _metric_attacks(outs):
    desc, state = outs[0]
    huge_string = json.loads(desc.model_dump_json())
    huge_string["silo"] = "silo-0"
    huge_string["architecture"]["name"] = "x" * 1_000_000
    pad = json.loads(desc.model_dump_json())
    pad["padding"] = "y" * 1_000_000
    return {
        "NaN count": dict(metrics={**METRICS, "num-examples": float("nan")}),
        "inf count": dict(metrics={**METRICS, "num-examples": float("inf")}),
        "1e18 count": dict(metrics={**METRICS, "num-examples": 10**18}),
        "1e18 float count": dict(metrics={**METRICS, "num-examples": 1e18}),
        "negative count": dict(metrics={**METRICS, "num-examples": -5}),
        "list for a number": dict(metrics={**METRICS, "num-examples": [1, 2, 3]}),
        "200k metric keys": dict(metrics={**METRICS, **{f"k{i}": 1.0 for i in range(200_000)}}),
        "ConfigRecord for metrics": dict(extra_records={P.METRICS: ConfigRecord({"num-examples": "10"})}),
        "extra ArrayRecord": dict(
            extra_records={"encoder": ArrayRecord(array_dict={"w": Array(np.zeros(3, np.float32))})}
        ),
        "1 MB string in descriptor": dict(desc_json=json.dumps(huge_string)),
        "1 MB unknown descriptor field": dict(desc_json=json.dumps(pad)),
    }


@pytest.mark.parametrize(
    "variant",
    [
        "NaN count",
        "inf count",
        "1e18 count",
        "1e18 float count",
        "negative count",
        "list for a number",
        "200k metric keys",
        "ConfigRecord for metrics",
        "extra ArrayRecord",
        "1 MB string in descriptor",
        "1 MB unknown descriptor field",
    ],
)
def test_4_bad_train_metrics_rejected_in_one_line_summary_small(trained, test_set, baseline, tmp_path, variant):
    cfg, outs = trained
    desc, state = outs[0]
    s = make_strategy(cfg, tmp_path)
    s.aggregate_train(1, honest(outs))
    before = store_snapshot(tmp_path)
    try:
        msg = reply(NODE[0], desc, state, **_metric_attacks(outs)[variant])
    except Exception:  # Flower itself refuses to build such a record: the attack cannot be sent
        return
    s.aggregate_train(2, [msg, *honest(outs, (1, 2))])
    rnd = s.core.recorder.round(2)
    assert rnd["accepted-replies"] == 2 and len(rnd["rejected-replies"]) == 1, rnd
    one_line_reasons(rnd["rejected-replies"])
    assert store_snapshot(tmp_path)["silo-0.npz"] == before["silo-0.npz"]
    assert s.core.store.entry("silo-0")["stored_round"] == 1
    summary = tmp_path / "run" / "summary.json"
    assert summary.stat().st_size < 1_000_000
    assert model_finite(s) and accuracy(s, test_set) >= baseline["accuracy"] - 1e-6


def test_4_evaluate_floods_do_not_hijack_silo_mean(trained, tmp_path):
    cfg, outs = trained
    s = make_strategy(cfg, tmp_path)
    s.aggregate_train(1, honest(outs))
    good = {"accuracy": 0.5, "loss": 1.0, "num-examples": 4}
    result = s.aggregate_evaluate(
        1,
        [
            evaluate_msg(NODE[0], good),
            evaluate_msg(NODE[1], {**good, "num-examples": float("nan"), "accuracy": 1.0}),
            evaluate_msg(NODE[2], {**good, "num-examples": 1e18, "accuracy": 1.0}),
            evaluate_msg(NODE[2], {**good, "accuracy": 1.0, **{f"k{i}": 1.0 for i in range(200_000)}}),
            evaluate_msg(NODE[1], {"accuracy": "1.0", "num-examples": "4"}, record_cls=ConfigRecord),
            # a stranger (never bound to a silo) with the largest allowed count, claiming silo-1's name
            evaluate_msg(4242, {**good, "accuracy": 1.0, "num-examples": 10**9}, silo_name="silo-1"),
            evaluate_msg(4243, {**good, "accuracy": 1.0, "num-examples": 10**9}),
        ],
    )
    assert dict(result)["silo-mean-eval"] == pytest.approx(0.5), dict(result)
    silos = s.core.recorder.round(1)["silos"]
    assert set(silos) <= {"silo-0", "silo-1", "silo-2"}, sorted(silos)  # no 'silo-1?' or 'node-4243' entries
    s.core.recorder.write()
    assert (tmp_path / "run" / "summary.json").stat().st_size < 1_000_000


HONEST = [("silo-0", 0.80, 1000), ("silo-1", 0.82, 900), ("silo-2", 0.85, 1100)]


def _figures(tmp_path, silos, metric="accuracy"):
    from alignfl_app.server.metrics import RunRecorder

    recorder = RunRecorder(tmp_path / "run", {"global-model": "vae" if metric == "neg-elbo" else "classifier"})
    return recorder, recorder.record_evaluations(1, [(s, {metric: v, "num-examples": n}) for s, v, n in silos])


@pytest.mark.parametrize("claim", [0.0, 1.0, 1e9, -1e9, float("nan"), float("inf")])
def test_4_two_colluding_silos_of_five_move_the_median_at_most_by_the_honest_spread(tmp_path, claim):
    """Two liars (the largest count the reply schema allows) against three honest silos: the median stays in the
    honest range; the trimmed mean moves by at most the liar the trim keeps, never past the metric's range."""
    honest_values = [v for _, v, _ in HONEST]
    spread = max(honest_values) - min(honest_values)
    _, clean = _figures(tmp_path / "clean", HONEST)
    liars = [("liar-a", claim, 10**9), ("liar-b", claim, 10**9)]
    recorder, attacked = _figures(tmp_path / "attacked", [*HONEST, *liars])
    assert abs(attacked["silo-median-eval"] - clean["silo-median-eval"]) <= spread + 1e-12, attacked
    assert min(honest_values) <= attacked["silo-median-eval"] <= max(honest_values)
    assert 0.0 <= attacked["silo-mean-eval"] <= 1.0
    # trimming one silo each side leaves at most one liar of three, weighing no more than the median count (1100)
    share = 1100 / (900 + 1100 + 1100)
    assert abs(attacked["silo-mean-eval"] - clean["silo-mean-eval"]) <= share + 1e-12
    silos = recorder.round(1)["silos"]
    if not 0 <= claim <= 1:  # out of range or not finite: left out, with the reason, never recorded as a value
        assert attacked == clean and "eval-accuracy" not in silos["liar-a"], attacked
        assert "eval-left-out" in silos["liar-a"]


@pytest.mark.parametrize("claim", [0.0, 1.0])
def test_4_one_liar_of_five_is_trimmed_out_of_the_mean(tmp_path, claim):
    honest = [*HONEST, ("silo-3", 0.81, 950)]
    _, result = _figures(tmp_path, [*honest, ("liar", claim, 10**9)])
    values = [v for _, v, _ in honest]
    assert min(values) <= result["silo-mean-eval"] <= max(values), result
    assert min(values) <= result["silo-median-eval"] <= max(values), result


def test_4_negative_elbo_claims_outside_its_range_are_left_out(tmp_path):
    recorder, result = _figures(
        tmp_path, [("silo-0", 120.0, 10), ("silo-1", -5.0, 10), ("silo-2", float("nan"), 10)], metric="neg-elbo"
    )
    assert result == {"silo-mean-eval": 120.0, "silo-median-eval": 120.0, "num-examples": 10}
    assert "eval-left-out" in recorder.round(1)["silos"]["silo-1"]


def test_4_a_per_class_list_of_the_wrong_length_is_left_out_not_fatal(tmp_path):
    from alignfl_app.server.metrics import RunRecorder

    recorder = RunRecorder(tmp_path / "run", {}, class_names=("0", "1", "2"))
    result = recorder.record_evaluations(
        1,
        [
            ("silo-0", {"accuracy": 0.5, "num-examples": 4, "per-class-accuracy": [0.5, 0.5]}),
            ("silo-1", {"accuracy": 0.5, "num-examples": 4, "per-class-accuracy": [0.5, float("nan"), 7.0]}),
            ("silo-2", {"accuracy": 0.5, "num-examples": 4, "per-class-accuracy": [0.5, float("nan"), 1.0]}),
        ],
    )
    assert result["silo-mean-eval"] == 0.5
    silos = recorder.round(1)["silos"]
    assert "eval-per-class-accuracy" not in silos["silo-0"] and "eval-per-class-accuracy" not in silos["silo-1"]
    assert silos["silo-2"]["eval-accuracy-by-class"] == {"0": 0.5, "2": 1.0}
