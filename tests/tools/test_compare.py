"""The one-command comparison, tiny: a real `flwr run` of FedProx (Flower's strategy, our ClientApp
dispatching on the message config) next to the two reference classifiers, then the comparison files."""

import csv

import pytest

from alignfl_app.experiments import load_experiment
from alignfl_app.tools.compare import run_methods, write_comparison
from tests.conftest import PROJECT

pytestmark = pytest.mark.e2e

TINY = {
    "max-per-class": 50,
    "outliers-per-silo": 10,
    "local-epochs": 1,
    "num-server-rounds": 1,
    "reference-epochs": 1,
    "silo-classes": "0,1;2,3",
    "silo-names": "ward-a;ward-b",  # named silos: the tables follow the run's silo list
}


def test_compare_runs_every_kind_of_method_and_writes_the_tables(tmp_path):
    methods = ["fedprox", "local-only", "centralised"]
    summaries = run_methods("mnist-fast", methods, TINY, tmp_path, PROJECT, timeout=600)
    assert list(summaries) == methods
    fedprox = summaries["fedprox"]
    assert fedprox["flwr-status"] == "finished:completed" and fedprox["method"] == "fedprox"
    assert fedprox["config"]["proximal-mu"] == 0.01
    silos = fedprox["rounds"][0]["silos"]
    assert set(silos) == {"ward-a", "ward-b"} and silos["ward-a"]["num-outliers"] == 10
    # the full classifier travels both ways, unlike ALIGN-FL's decoder-only replies
    assert all(m["bytes-up"] == m["bytes-down-train"] > 0 for m in silos.values())
    write_comparison("mnist-fast", summaries, load_experiment("mnist-fast", TINY), tmp_path)
    rows = list(csv.DictReader((tmp_path / "comparison.csv").read_text().splitlines()))
    assert [r["method"] for r in rows] == methods
    assert all(0.0 <= float(r["global-accuracy"]) <= 1.0 for r in rows) and "class-9" in rows[0]
    text = (tmp_path / "comparison.md").read_text()
    for heading in ("Final accuracy", "Global accuracy per round", "Per-class accuracy", "Per-silo accuracy"):
        assert heading in text
    assert "| method | ward-a | ward-b |" in text and "balanced" in text
    assert (tmp_path / "accuracy.png").stat().st_size > 0


def test_every_set_option_counts(tmp_path, capsys):
    """``--set a=1 --set b=2`` applies both: a bad key in the first is refused before anything runs."""
    from alignfl_app.tools.compare import main

    code = main(
        [
            "mnist-fast",
            "--set",
            "no-such-key=1",
            "--set",
            "num-server-rounds=1",
            "--out",
            str(tmp_path / "out"),
            "--app",
            str(tmp_path / "no-app"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "no-such-key" in err and "\n" not in err
    assert not (tmp_path / "out").exists()
