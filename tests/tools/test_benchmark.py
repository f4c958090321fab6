"""The benchmark's time to accuracy, read from the rounds a run recorded."""

from alignfl_app.tools.benchmark import costs, markdown


def summary(accuracies: list[float], dataset: str = "mnist") -> dict:
    rounds = [
        {"round": i + 1, "elapsed-seconds": 10.0 * (i + 1), "global": {"accuracy": a}} for i, a in enumerate(accuracies)
    ]
    return {
        "method": "alignfl",
        "config": {"silo-classes": "0,1;2,3", "dataset": dataset},
        "rounds": rounds,
        "final-global-accuracy": accuracies[-1],
    }


def test_time_to_accuracy_is_the_first_round_that_reaches_the_target_and_the_best():
    row = costs(summary([0.90, 0.951, 0.949, 0.97, 0.96]))
    assert row["target-accuracy"] == 0.95 and row["seconds-to-target"] == 20.0
    assert row["best-accuracy"] == 0.97 and row["seconds-to-best"] == 40.0
    assert costs(summary([0.7, 0.79, 0.81], "fashion-mnist"))["seconds-to-target"] == 30.0


def test_a_run_that_never_reaches_the_target_says_so():
    row = costs(summary([0.5, 0.6]), target=0.95)
    assert row["seconds-to-target"] is None and row["seconds-to-best"] == 20.0
    assert "| alignfl | 0.95 | - | 0.6000 | 20.0 |" in markdown([row], [])
