"""Red team, 9. generators that draw the wrong classes, caught by the server's labelled images: a silo that swaps its
labels, one that draws another silo's classes under its own names, one whose samples pull the other silos'
classes down (every attack class: tests/red_team/__init__.py)."""

from __future__ import annotations

import pytest
import torch

from alignfl_app.config import parse_node_config, parse_run_config
from alignfl_app.models.global_model import GlobalModel
from alignfl_app.server.core import AlignFLServer
from alignfl_app.server.metrics import RunRecorder
from alignfl_app.server.store import GeneratorStore
from alignfl_app.server.validation import HarmfulGenerator, LabelledSamples, LabelValidator
from alignfl_app.silo.core import Silo
from server_app.app import make_label_validator
from server_app.strategy import AlignFLStrategy
from tests.conftest import tiny_run_config
from tests.red_team.attack_kit import NODE, one_line_reasons, reply, store_snapshot

LABELLED = {
    "max-per-class": 300,
    "local-epochs": 5,
    "local-min-steps": 200,  # generators that draw their digits (a few seconds each)
    "silo-architectures": "mlp",
    "outliers-per-silo": 0,
    "server-validation-per-class": 100,
}


@pytest.fixture(scope="module")
def silos(tmp_path_factory):
    """Three honest silos trained to draw their classes, and an attacker's own honestly trained decoder of silo
    0's classes (not a copy: another seed), which it relabels."""
    root = tmp_path_factory.mktemp("labels")
    cfg = parse_run_config({**tiny_run_config(root / "results"), **LABELLED})
    other_seed = parse_run_config({**tiny_run_config(root / "results"), **LABELLED, "seed": 7})
    trained = {}
    with pytest.MonkeyPatch.context() as mp:  # a module's silos: never the machine's own silos folder
        for k, (run, partition) in enumerate([(cfg, 0), (cfg, 1), (cfg, 2), (other_seed, 0)]):
            mp.setenv("ALIGNFL_SILOS_ROOT", str(root / f"silos-{k}"))
            out = Silo(run, parse_node_config({"partition-id": partition})).train_round("run", 1)
            trained[k] = (out.descriptor, {name: v.numpy() for name, v in out.decoder_state.items()})
    return cfg, {k: trained[k] for k in range(3)}, trained[3]


def checked_strategy(cfg, tmp_path) -> AlignFLStrategy:
    """The strategy as the ServerApp builds it: with the label check of the run's validation share."""
    model = GlobalModel.from_config(cfg)
    recorder = RunRecorder(tmp_path / "run", cfg.flat())
    labels = make_label_validator(cfg, model, recorder)
    assert labels is not None
    return AlignFLStrategy(AlignFLServer(cfg, GeneratorStore(tmp_path / "generators"), model, recorder, labels))


def honest_round(strategy, outs, rnd, silos=(0, 1, 2)):
    strategy.aggregate_train(rnd, [reply(NODE[s], *outs[s]) for s in silos])


def test_honest_silos_pass_the_label_check_and_it_is_recorded(silos, tmp_path):
    cfg, outs, _ = silos
    s = checked_strategy(cfg, tmp_path)
    honest_round(s, outs, 1)
    record = s.core.recorder.round(1)
    assert record["accepted-replies"] == 3, record.get("rejected-replies")
    figures = [s.core.recorder.silo(1, f"silo-{k}") for k in range(3)]
    assert all(f["label-recognised-min"] > 0.5 for f in figures), figures  # the floor is 0.1: chance of 10 classes
    assert all(f["label-harm"] < cfg.server.judge_max_harm for f in figures[1:]), figures  # silo-0 came first
    assert "1000 labelled server images" in s.core.recorder.summary["label-check"]


def test_a_silo_that_swaps_its_labels_is_refused(silos, tmp_path):
    cfg, outs, _ = silos
    s = checked_strategy(cfg, tmp_path)
    honest_round(s, outs, 1)
    before = store_snapshot(tmp_path)
    desc, state = outs[0]
    swapped = desc.model_copy(update={"classes": tuple(reversed(desc.classes))})  # local class 0 now claims "1"
    s.aggregate_train(2, [reply(NODE[0], swapped, {k: v * 1.0001 for k, v in state.items()})])
    rejected = s.core.recorder.round(2)["rejected-replies"]
    one_line_reasons(rejected)
    assert len(rejected) == 1 and "samples of class '0' are recognised as that class in only" in rejected[0]
    assert store_snapshot(tmp_path) == before


def test_a_silo_drawing_another_silos_classes_under_its_names_is_refused(silos, tmp_path):
    """Silo 1 (classes 2 and 3) sends a decoder of 0s and 1s, trained on its own and named as its classes."""
    cfg, outs, (stolen_desc, stolen_state) = silos
    s = checked_strategy(cfg, tmp_path)
    honest_round(s, outs, 1, silos=(0, 2))
    before = store_snapshot(tmp_path)
    forged = stolen_desc.model_copy(update={"silo": outs[1][0].silo, "classes": outs[1][0].classes})
    s.aggregate_train(2, [reply(NODE[1], forged, stolen_state)])
    rejected = s.core.recorder.round(2)["rejected-replies"]
    one_line_reasons(rejected)
    assert len(rejected) == 1 and "samples of class '2' are recognised as that class in only" in rejected[0]
    assert "copy" not in rejected[0]  # an independently trained decoder: only the labels give it away
    assert store_snapshot(tmp_path) == before


def test_samples_that_pull_other_classes_down_are_harmful(silos, tmp_path):
    """A candidate whose own class is drawn well but that also draws many 0s and 1s under it: recognised often
    enough (a fifth of its '2's are 2s), yet it takes silo 0's classes away from it."""
    cfg, outs, _ = silos
    s = checked_strategy(cfg, tmp_path)
    honest_round(s, outs, 1, silos=(0, 2))
    judge = s.core.judge
    others = {silo: judge.labelled(s.core.store, silo) for silo in s.core.store.silos()}
    honest = judge.labelled(s.core.store, "silo-0")
    desc, state = outs[1]
    own = judge.as_labelled(desc, judge.draw(desc, _decoder(desc, state)))
    stolen = LabelledSamples(honest.x.repeat(4, 1), torch.full((4 * len(honest.y),), 2))  # 0s and 1s named '2'
    with pytest.raises(HarmfulGenerator, match=r"lower the server's recognition of another silo's class '[01]'"):
        judge.labels.check(LabelledSamples.join([own, stolen]), others)
    assert judge.labels.check(own, others).harm < cfg.server.judge_max_harm  # the same silo, honest


def test_a_harmful_generator_gets_its_silo_quarantined(silos, tmp_path):
    """With the recognition check off (judge-min-recognition=0), a decoder of silo 0's classes sent by silo 1 under
    its own class names is caught by leave-one-out harm: silo 1 is quarantined, its replies refused from then on."""
    cfg, outs, (stolen_desc, stolen_state) = silos
    lenient = cfg.model_copy(update={"server": cfg.server.model_copy(update={"judge_min_recognition": 0.0})})
    s = checked_strategy(lenient, tmp_path)
    honest_round(s, outs, 1, silos=(0, 2))
    forged = stolen_desc.model_copy(update={"silo": outs[1][0].silo, "classes": outs[1][0].classes})
    s.aggregate_train(2, [reply(NODE[1], forged, stolen_state)])
    assert "silo-1" in s.core.standing.quarantined
    assert "silo-1" not in s.core.store.silos()
    s.aggregate_train(3, [reply(NODE[1], *outs[1])])
    assert "quarantined since round 2" in s.core.recorder.round(3)["rejected-replies"][0]


def test_no_labelled_server_data_means_no_label_check_and_says_so(silos, tmp_path):
    cfg, _, _ = silos
    off = parse_run_config({**cfg.flat(), "server-validation-per-class": 0})
    recorder = RunRecorder(tmp_path / "run", off.flat())
    assert make_label_validator(off, GlobalModel.from_config(off), recorder) is None
    assert "not checked" in recorder.summary["label-check"]


def _decoder(desc, state):
    decoder = desc.empty_decoder().to_empty(device="cpu")
    decoder.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    return decoder


def test_a_class_the_server_has_no_images_of_is_not_judged(silos, tmp_path):
    """A server-validation-dir may hold a subset of the run's classes: silo 1's classes 2 and 3 are then neither
    recognised nor refused."""
    cfg, outs, _ = silos
    s = checked_strategy(cfg, tmp_path)
    labels = s.core.judge.labels
    only_0_and_1 = labels.y < 2
    partial = LabelValidator(labels.x[only_0_and_1], labels.y[only_0_and_1], cfg.data.class_names, 1.0, 0.35)
    desc, state = outs[1]
    judge = s.core.judge
    verdict = partial.check(judge.as_labelled(desc, judge.draw(desc, _decoder(desc, state))), {})
    assert verdict.recognised == {} and verdict.harm is None
