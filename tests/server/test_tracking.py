"""TensorBoard tracking: what the recorder holds reaches event files a TensorBoard reads, each point once."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from alignfl_app.config import ConfigError, parse_run_config
from alignfl_app.server.metrics import RunRecorder
from alignfl_app.server.tracking import TensorBoardTracker, round_scalars

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

CONFIG = {"tracking": "tensorboard", "dataset": "mnist", "num-server-rounds": 2}
CLASSES = ("zero", "one")


def play_round(rec: RunRecorder, n: int, accuracy: float) -> None:
    """What the server records in a round, in the order it does: replies, server training, grid, evaluation."""
    rnd = rec.round(n)
    rnd.update(
        {"accepted-replies": 2, "rejected-replies": ["node 7: bad decoder"] * n, "server": {"server-seconds": n}}
    )
    rec.silo(n, "hospital-a").update({"train-loss": 1.0 / n, "dp-epsilon-spent": 0.5 * n, "classes": [0], "dp": True})
    rec.silo(n, "hospital-b").update({"train-loss": 2.0 / n, "label-recognised-min": 0.9, "bytes-up": 1000 * n})
    rec.write()
    rec.save_sample_grid(n, {"hospital-a": (torch.rand(2, 1, 8, 8), torch.tensor([0, 1]))})
    rnd["global"] = {"accuracy": accuracy, "balanced-accuracy": accuracy - 0.1, "loss": 1 - accuracy}
    rnd["global"]["per-class-accuracy"] = [accuracy, float("nan")]
    rec.write()
    rec.write()  # written again with nothing new: no point twice


def events(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def points(acc: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, pytest.approx(e.value)) for e in acc.Scalars(tag)]


def test_two_rounds_reach_tensorboard_as_scalars_and_images(tmp_path):
    rec = RunRecorder(tmp_path / "run", CONFIG, class_names=CLASSES)
    play_round(rec, 1, 0.6)
    play_round(rec, 2, 0.8)
    rec.finish()
    acc = events(tmp_path / "run")
    assert points(acc, "global/accuracy") == [(1, 0.6), (2, 0.8)]
    assert points(acc, "global/balanced-accuracy") == [(1, 0.5), (2, 0.7)]
    assert points(acc, "global/loss") == [(1, 0.4), (2, 0.2)]
    assert points(acc, "global-per-class/zero") == [(1, 0.6), (2, 0.8)]
    assert "global-per-class/one" not in acc.Tags()["scalars"]  # NaN: the class was absent
    assert points(acc, "silos/dp-epsilon-spent/hospital-a") == [(1, 0.5), (2, 1.0)]
    assert points(acc, "silos/train-loss/hospital-b") == [(1, 2.0), (2, 1.0)]
    assert points(acc, "silos/label-recognised-min/hospital-b") == [(1, 0.9), (2, 0.9)]
    assert points(acc, "silos/bytes-up/hospital-b") == [(1, 1000), (2, 2000)]
    assert points(acc, "round/accepted-replies") == [(1, 2), (2, 2)]
    assert points(acc, "round/rejected-replies") == [(1, 1), (2, 2)]  # a list of reasons: their count
    assert points(acc, "server/server-seconds") == [(1, 1), (2, 2)]
    assert not any("classes" in t or "/dp/" in t or t.endswith("/dp") for t in acc.Tags()["scalars"])
    grids = acc.Images("samples")
    assert [g.step for g in grids] == [1, 2] and all(g.width > 8 and g.height > 8 for g in grids)
    assert any(t.startswith("config") for t in acc.Tags()["tensors"])  # the run config, once, as text
    assert (tmp_path / "run" / "summary.json").exists()


def test_tracking_none_writes_no_event_files(tmp_path):
    rec = RunRecorder(tmp_path / "run", {**CONFIG, "tracking": "none"}, class_names=CLASSES)
    play_round(rec, 1, 0.6)
    rec.finish()
    assert not (tmp_path / "run" / "tensorboard").exists()
    assert not list((tmp_path / "run").rglob("events.out.tfevents.*"))


def test_a_resumed_run_logs_each_round_once_and_drops_what_followed_the_checkpoint(tmp_path):
    rec = RunRecorder(tmp_path / "run", CONFIG, class_names=CLASSES)
    for n, accuracy in ((1, 0.5), (2, 0.6), (3, 0.1)):  # round 3 was not checkpointed when the server died
        rec.round(n)["global"] = {"accuracy": accuracy}
        rec.write()
    rec.tracker.close()
    again = RunRecorder(tmp_path / "run", CONFIG, class_names=CLASSES)
    again.resume(2)
    again.round(3)["global"] = {"accuracy": 0.7}
    again.write()
    again.finish()
    assert points(events(tmp_path / "run"), "global/accuracy") == [(1, 0.5), (2, 0.6), (3, 0.7)]


def test_a_server_without_tensorboard_is_told_the_fix_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as without the package
    with pytest.raises(ConfigError, match="pip install tensorboard") as info:
        RunRecorder(tmp_path / "run", CONFIG)
    assert "\n" not in str(info.value)


def test_the_tracking_key_takes_tensorboard_or_none(tmp_path):
    assert parse_run_config({}).run.tracking == "none"
    cfg = parse_run_config({"tracking": "tensorboard"})
    assert cfg.run.tracking == "tensorboard"
    assert isinstance(RunRecorder(tmp_path / "run", cfg.flat()).tracker, TensorBoardTracker)  # as the server makes it
    with pytest.raises(ConfigError, match="tracking"):
        parse_run_config({"tracking": "wandb"})


def test_round_scalars_skip_what_is_not_a_number():
    record = {"round": 1, "silos": {"a": {"architecture": "conv", "eval-accuracy-by-class": {"cat": 0.5}}}}
    record.update({"global": {"accuracy": float("inf")}, "missing-replies": [], "status": "x"})
    assert round_scalars(record) == {"silos/eval-accuracy-by-class/a/cat": 0.5, "round/missing-replies": 0}


def test_a_linked_tensorboard_folder_is_refused_and_the_run_goes_on(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "tensorboard").symlink_to(elsewhere)
    rec = RunRecorder(tmp_path / "run", CONFIG, class_names=CLASSES)
    play_round(rec, 1, 0.6)
    rec.finish()
    assert list(elsewhere.iterdir()) == [] and (tmp_path / "run" / "summary.json").exists()
