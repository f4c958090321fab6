"""Red-team tests: each test is an attack on the ALIGN-FL server, written the way an attacker would mount it.

Every test asserts (a) the attack is rejected or ignored with a ONE-LINE reason (in the round's record /
summary.json, or the raised error), (b) stored state is unharmed (generator store index and decoders, checkpoint),
and (c) where the global model is trained, it stays finite and no worse than the same run without the attacker.

Attack classes
1. Descriptor not pinned: other image_shape (1x32x32, 3x28x28), 'unconditional' layout in a classifier run, a
   label set other than the classes the run assigned (all ten classes, another silo's classes), look-alike class
   names (unicode), duplicate classes; a second round must not be poisoned.
2. Memory: a tiny reply declaring a huge decoder (rejected without allocating: RSS < +200 MB); a decoder
   within the byte limit whose activations exceed max-sampling-mb.
3. Poison: finite +-3e38 weights (non-finite samples) rejected at the trial batch; a poisoned generator that got
   into the store is skipped, logged and quarantined; a non-finite server round is rolled back; the checkpoint
   never holds NaN.
4. Metrics: NaN/inf/1e18 num-examples, lists for numbers, wrong record kinds, extra ArrayRecord, 200k metric
   keys, a 1 MB string in the descriptor: rejected in one line, silo-mean accuracy not hijacked, summary.json small.
5. Identity: names outside silo-names, names never move (owner offline), a rejected switch keeps bindings,
   operator silo-nodes mapping, replies from nodes not asked, case-variant names, evaluate replies claiming a silo,
   operator withdrawal.
6. Config and files: path-like run-name / architecture names, huge seeds, inf/nan rates, a tampered store index,
   reuse of a run folder, corrupted dataset files, newer stored formats.
Own additions: descriptor round far in the future, zero-size / many tensors, case-variant and look-alike names,
evaluate replies from strangers with maximal counts, duplicate train / evaluate replies from one node, a node
claiming a silo's name first after a server restart (resume without silo-nodes).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MessageType, MetricRecord, RecordDict

from alignfl_app import protocol as P
from alignfl_app.checkpoint import Checkpoint
from alignfl_app.config import ArchitectureSpec, ConfigError, parse_node_config, parse_run_config
from alignfl_app.data import global_test_set
from alignfl_app.global_model import GlobalModel
from alignfl_app.metrics import RunRecorder
from alignfl_app.server import AlignFLServer
from alignfl_app.store import GeneratorStore
from server_app.strategy import AlignFLStrategy
from tests.conftest import make_message, tiny_run_config

NODE = {0: 1000, 1: 1001, 2: 1002}
METRICS = {"num-examples": 10, "num-outliers": 0, "train-seconds": 1.0, "samples-per-second": 10.0,
           "decoder-bytes": 100, "vae-bytes": 200, "peak-rss-mb": 100.0, "lipschitz-upper-bound": 5.0,
           "lipschitz-empirical": 1.0, "train-loss": 1.0}


# --------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def test_set(trained):
    cfg, _ = trained
    x, y = global_test_set(cfg)
    return x[:1000], y[:1000]


def reply(node, desc, state, *, desc_json=None, extra_records=None, metrics=None, decoder_record=None):
    content = RecordDict({
        P.DECODER: decoder_record if decoder_record is not None else
        ArrayRecord(array_dict={k: Array(np.asarray(v)) for k, v in state.items()}),
        P.DESCRIPTOR: ConfigRecord({P.DESCRIPTOR_JSON: desc_json if desc_json is not None else desc.model_dump_json()}),
        P.METRICS: MetricRecord(METRICS if metrics is None else metrics),
    })
    for k, v in (extra_records or {}).items():
        content[k] = v
    return make_message(content, MessageType.TRAIN, src=node, dst=1)


def evaluate_msg(node, metrics, record_cls=MetricRecord, silo_name=None):
    content = RecordDict({P.METRICS: record_cls(metrics)})
    if silo_name is not None:
        content[P.SILO] = ConfigRecord({"name": silo_name})
    return make_message(content, MessageType.EVALUATE, src=node, dst=1)


def make_strategy(cfg, tmp_path: Path) -> AlignFLStrategy:
    return AlignFLStrategy(AlignFLServer(cfg, GeneratorStore(tmp_path / "generators"), GlobalModel.from_config(cfg),
                                         RunRecorder(tmp_path / "run", cfg.flat())))


def honest(outs, silos=(0, 1, 2)):
    return [reply(NODE[s], *outs[s]) for s in silos]


def store_snapshot(tmp_path: Path) -> dict[str, bytes]:
    root = tmp_path / "generators"
    return {p.name: p.read_bytes() for p in sorted(root.glob("*.npz"))}


def index_entries(strategy) -> dict:
    return {s: strategy.core.store.entry(s) for s in strategy.core.store.silos()}


def one_line_reasons(reasons) -> None:
    assert reasons, "no reason recorded"
    for r in reasons:
        assert isinstance(r, str) and "\n" not in r and r.strip(), r


def model_finite(strategy) -> bool:
    return all(torch.isfinite(v).all() for v in strategy.core.model.state().values() if v.is_floating_point())


def accuracy(strategy, test_set) -> float:
    return float(strategy.core.model.evaluate(*test_set)["accuracy"])


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.fixture(scope="module")
def baseline(trained, test_set, tmp_path_factory):
    """Two honest rounds, no attacker: the model every attacked run is compared with."""
    cfg, outs = trained
    s = make_strategy(cfg, tmp_path_factory.mktemp("baseline"))
    s.aggregate_train(1, honest(outs))
    s.aggregate_train(2, honest(outs))
    return {"accuracy": accuracy(s, test_set), "state": {k: v.clone() for k, v in s.core.model.state().items()}}


def attacked_round2(cfg, outs, tmp_path, attack_msgs, *, before_round2=None):
    """Round 1 honest; round 2 = attacker's messages first, then the honest replies. Returns the strategy."""
    s = make_strategy(cfg, tmp_path)
    s.aggregate_train(1, honest(outs))
    if before_round2:
        before_round2(s)
    s.aggregate_train(2, [*attack_msgs, *honest(outs)])
    return s


def assert_unharmed(s, tmp_path, before_npz, baseline, test_set, *, rejected_at_least=1, keyword=None):
    rnd = s.core.recorder.round(2)
    rejected = rnd["rejected-replies"]
    assert len(rejected) >= rejected_at_least, rnd
    one_line_reasons(rejected)
    if keyword:
        assert any(k.lower() in " ".join(rejected).lower() for k in ([keyword] if isinstance(keyword, str) else keyword)), rejected
    assert s.core.store.silos() == ["silo-0", "silo-1", "silo-2"]
    # the honest round-2 replies were stored; nothing else changed
    assert set(store_snapshot(tmp_path)) == {"silo-0.npz", "silo-1.npz", "silo-2.npz"}
    assert store_snapshot(tmp_path) == before_npz
    assert model_finite(s)
    assert accuracy(s, test_set) >= baseline["accuracy"] - 1e-6


# ============================================================================ 1. descriptor not pinned
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


DESC_VARIANTS = ["image 1x32x32", "image 3x28x28", "unconditional", "all ten classes", "another silo's classes",
                 "superset", "subset", "fullwidth look-alike class", "duplicate classes", "trailing-space class"]


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


# ============================================================================ 2. memory
@pytest.mark.parametrize("arch", [
    dict(kind="mlp", latent_dim=256, hidden=(4096, 4096, 4096, 4096)),
    dict(kind="conv", latent_dim=256, hidden=(4096, 4096)),
    dict(kind="mlp", latent_dim=10**7, hidden=(10**7,) * 4),
    dict(kind="conv", latent_dim=2**31, hidden=(2**31, 2**31)),
])
def test_2_tiny_reply_declaring_huge_decoder_is_rejected_without_allocating(trained, tmp_path, arch):
    cfg, outs = trained
    desc, state = outs[0]
    d = json.loads(desc.model_dump_json())
    d["architecture"] = {"name": "huge", **{k: (list(v) if isinstance(v, tuple) else v) for k, v in arch.items()}}
    s = make_strategy(cfg, tmp_path)
    s.aggregate_train(1, honest(outs))
    before = store_snapshot(tmp_path)
    tiny = {"w": np.zeros(1, np.float32)}
    rss0 = rss_mb()  # memory only: speed belongs in benchmarks, not in tests
    from server_app.messages import train_reply
    from alignfl_app.replies import ReplyRejected
    with pytest.raises(ReplyRejected) as exc:
        s.core.accept(2, NODE[0], train_reply(reply(NODE[0], desc, tiny, desc_json=json.dumps(d)), 1 << 26))
    grown = rss_mb() - rss0
    assert "\n" not in str(exc.value) and str(exc.value)
    assert grown < 200, grown
    assert store_snapshot(tmp_path) == before and s.core.store.entry("silo-0")["stored_round"] == 1


def test_2_decoder_within_byte_limit_but_huge_activations_exceeds_max_sampling_mb(trained, tmp_path):
    cfg, outs = trained
    small = parse_run_config({**cfg.flat(), "max-sampling-mb": 64.0})
    desc, _ = outs[1]  # silo-1 is the conv silo
    # few parameters, 4096 channels at 14x14: ~6 MiB of activations per sample, 64 samples > 64 MiB
    arch = ArchitectureSpec(name="wide", kind="conv", latent_dim=desc.architecture.latent_dim, hidden=(4096, 8))
    attack = desc.model_copy(update={"architecture": arch})
    state = {k: (np.random.default_rng(0).standard_normal(v.shape) * 0.01).astype(np.float32)
             for k, v in attack.empty_decoder().state_dict().items()}
    assert sum(a.nbytes for a in state.values()) < small.server.max_decoder_mb * 2**20  # within the byte limit
    s = make_strategy(small, tmp_path)
    s.aggregate_train(1, honest(outs))  # honest silos fit the bound
    assert s.core.recorder.round(1)["accepted-replies"] == 3, s.core.recorder.round(1)
    before = store_snapshot(tmp_path)
    rss0 = rss_mb()
    s.aggregate_train(2, [reply(NODE[1], attack, state), *honest(outs, (0, 2))])
    rejected = s.core.recorder.round(2)["rejected-replies"]
    assert len(rejected) == 1 and ("max-sampling-mb" in rejected[0] or "MiB" in rejected[0]), rejected
    one_line_reasons(rejected)
    assert rss_mb() - rss0 < 200
    assert store_snapshot(tmp_path)["silo-1.npz"] == before["silo-1.npz"]
    # sampling of every stored generator runs in chunks within the bound
    for silo in s.core.store.silos():
        d = s.core.store.descriptor(silo)
        assert s.core.terms.sampling_chunk(d) * d.sampling_bytes_per_sample() <= small.server.max_sampling_mb * 2**20


# ============================================================================ 3. poison
def test_3_overflowing_weights_rejected_at_trial_batch(trained, test_set, baseline, tmp_path):
    cfg, outs = trained
    desc, state = outs[0]
    overflow = {k: np.where(np.arange(v.size).reshape(v.shape) % 2 == 0, 3e38, -3e38).astype(np.float32)
                for k, v in state.items()}
    s = make_strategy(cfg, tmp_path)
    s.aggregate_train(1, honest(outs))
    before = store_snapshot(tmp_path)
    s.aggregate_train(2, [reply(NODE[0], desc, overflow), *honest(outs, (1, 2))])
    rejected = s.core.recorder.round(2)["rejected-replies"]
    assert len(rejected) == 1 and "finite" in rejected[0], rejected
    one_line_reasons(rejected)
    assert store_snapshot(tmp_path)["silo-0.npz"] == before["silo-0.npz"]
    assert model_finite(s) and accuracy(s, test_set) >= baseline["accuracy"] - 1e-6


def test_3_poisoned_generator_in_store_is_skipped_and_quarantined(trained, test_set, baseline, tmp_path):
    """It slipped past the checks (e.g. it draws NaN only for some latents): the server must contain it."""
    cfg, outs = trained
    desc, state = outs[2]
    s = make_strategy(cfg, tmp_path)
    s.aggregate_train(1, honest(outs))
    # +-3e38 alternating: inf - inf = NaN samples (all-positive 3e38 only saturates the sigmoid to finite 0/1)
    poison = {k: np.where(np.arange(v.size).reshape(v.shape) % 2 == 0, 3e38, -3e38).astype(np.float32)
              for k, v in state.items()}
    s.core.store.put(desc, poison, 1)  # bypasses check_decoder_state: the slipped-through case
    s.aggregate_train(2, honest(outs, (0, 1)))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "silo-2" in summary["quarantined"], summary.get("quarantined")
    q = summary["quarantined"]["silo-2"]
    assert q["round"] == 2 and "\n" not in q["reason"] and q["reason"]
    assert "silo-2" not in s.core.store.silos()
    assert model_finite(s)
    assert accuracy(s, test_set) >= baseline["accuracy"] - 0.15
    # the quarantined silo's later replies are refused, in one line
    s.aggregate_train(3, honest(outs))
    rejected = s.core.recorder.round(3)["rejected-replies"]
    assert len(rejected) == 1 and "quarantined" in rejected[0], rejected
    one_line_reasons(rejected)
    assert "silo-2" not in s.core.store.silos()
    ckpt = Checkpoint(tmp_path / "run")
    s.core.save_checkpoint(ckpt, 3)
    assert all(torch.isfinite(v).all() for v in ckpt.load_model(ckpt.load()).values() if v.is_floating_point())
    assert "silo-2" in ckpt.load().quarantined


def test_3_non_finite_server_round_is_rolled_back(trained, tmp_path):
    cfg, outs = trained
    hot = parse_run_config({**cfg.flat(), "server-learning-rate": 1e30})
    s = make_strategy(hot, tmp_path)
    before = {k: v.clone() for k, v in s.core.model.state().items()}
    s.aggregate_train(1, honest(outs))
    rnd = s.core.recorder.round(1)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    rolled = summary["rounds"]["1"]["rolled-back"] if "1" in summary["rounds"] else rnd.get("rolled-back")
    assert rolled and "\n" not in str(rolled), rnd
    after = s.core.model.state()
    assert all(torch.equal(before[k], after[k]) for k in before)
    ckpt = Checkpoint(tmp_path / "run")
    s.core.save_checkpoint(ckpt, 1)
    assert all(torch.isfinite(v).all() for v in ckpt.load_model(ckpt.load()).values() if v.is_floating_point())


# ============================================================================ 4. metrics
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
        "extra ArrayRecord": dict(extra_records={"encoder": ArrayRecord(array_dict={"w": Array(np.zeros(3, np.float32))})}),
        "1 MB string in descriptor": dict(desc_json=json.dumps(huge_string)),
        "1 MB unknown descriptor field": dict(desc_json=json.dumps(pad)),
    }


@pytest.mark.parametrize("variant", ["NaN count", "inf count", "1e18 count", "1e18 float count", "negative count",
                                     "list for a number", "200k metric keys", "ConfigRecord for metrics",
                                     "extra ArrayRecord", "1 MB string in descriptor",
                                     "1 MB unknown descriptor field"])
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
    result = s.aggregate_evaluate(1, [
        evaluate_msg(NODE[0], good),
        evaluate_msg(NODE[1], {**good, "num-examples": float("nan"), "accuracy": 1.0}),
        evaluate_msg(NODE[2], {**good, "num-examples": 1e18, "accuracy": 1.0}),
        evaluate_msg(NODE[2], {**good, "accuracy": 1.0, **{f"k{i}": 1.0 for i in range(200_000)}}),
        evaluate_msg(NODE[1], {"accuracy": "1.0", "num-examples": "4"}, record_cls=ConfigRecord),
        # a stranger (never bound to a silo) with the largest allowed count, claiming silo-1's name
        evaluate_msg(4242, {**good, "accuracy": 1.0, "num-examples": 10**9}, silo_name="silo-1"),
        evaluate_msg(4243, {**good, "accuracy": 1.0, "num-examples": 10**9}),
    ])
    assert dict(result)["silo-mean-eval"] == pytest.approx(0.5), dict(result)
    silos = s.core.recorder.round(1)["silos"]
    assert set(silos) <= {"silo-0", "silo-1", "silo-2"}, sorted(silos)  # no 'silo-1?' or 'node-4243' entries
    s.core.recorder.write()
    assert (tmp_path / "run" / "summary.json").stat().st_size < 1_000_000


# ============================================================================ 5. identity
def test_4_bound_silo_cannot_dominate_the_silo_mean_with_a_huge_count(trained, tmp_path):
    """A silo's own node (bound, asked) reports accuracy 1.0 over the largest count the schema allows."""
    cfg, outs = trained
    s = make_strategy(cfg, tmp_path)
    s.aggregate_train(1, honest(outs))
    good = {"accuracy": 0.5, "loss": 1.0, "num-examples": 100}
    result = dict(s.aggregate_evaluate(1, [evaluate_msg(NODE[0], good), evaluate_msg(NODE[1], good),
                                           evaluate_msg(NODE[2], {**good, "accuracy": 1.0, "num-examples": 10**9})]))
    # one silo of three may move a mean of silos by at most its own share
    assert result["silo-mean-eval"] <= 0.5 + 0.5 / 3 + 1e-6, result


def test_5a_first_reply_cannot_bind_a_name_outside_the_run(trained, tmp_path):
    cfg, outs = trained
    desc, state = outs[0]
    s = make_strategy(cfg, tmp_path)
    # 41 nodes race to bind names before the real silos: silo-3..silo-43, 'SILO-0' (case), 'silo-0.' etc.
    names = [f"silo-{i}" for i in range(3, 44)] + ["SILO-0", "Silo-1", "silo-00", "silo-0."]
    attackers = [reply(5000 + i, desc.model_copy(update={"silo": n}), state) for i, n in enumerate(names)]
    s.aggregate_train(1, [*attackers, *honest(outs)])
    rnd = s.core.recorder.round(1)
    assert s.core.store.silos() == ["silo-0", "silo-1", "silo-2"], s.core.store.silos()
    assert rnd["accepted-replies"] == 3
    one_line_reasons(rnd["rejected-replies"])
    assert all("silo" in r for r in rnd["rejected-replies"] if not r.startswith("..."))
    assert set(s.core.registry.silo_of_node) == set(NODE.values())


def test_5a_custom_silo_names_pin_identity(trained, tmp_path):
    cfg, outs = trained
    named = parse_run_config({**cfg.flat(), "silo-names": "hospital-a,hospital-b,hospital-c"})
    s = make_strategy(named, tmp_path)
    desc, state = outs[0]
    s.aggregate_train(1, [reply(NODE[0], desc, state),  # 'silo-0' is not a name of this run
                          reply(NODE[1], desc.model_copy(update={"silo": "hospital-a"}), state)])
    rnd = s.core.recorder.round(1)
    assert s.core.store.silos() == ["hospital-a"] and rnd["accepted-replies"] == 1
    assert len(rnd["rejected-replies"]) == 1 and "silo" in rnd["rejected-replies"][0]


def test_5b_name_never_moves_when_owner_is_offline(trained, tmp_path):
    cfg, outs = trained
    s = make_strategy(cfg, tmp_path)
    s.core.nodes_to_ask(1, list(NODE.values()))
    s.aggregate_train(1, honest(outs))
    # round 2: silo-0's node is offline when the round starts; an attacker node connects and claims silo-0
    asked = s.core.nodes_to_ask(2, [NODE[1], NODE[2], 6666])
    before = store_snapshot(tmp_path)
    s.aggregate_train(2, [reply(6666, *outs[0]), *honest(outs, (1, 2))])
    rejected = s.core.recorder.round(2)["rejected-replies"]
    assert len(rejected) == 1 and "silo-0" in rejected[0], rejected
    one_line_reasons(rejected)
    assert store_snapshot(tmp_path)["silo-0.npz"] == before["silo-0.npz"]
    assert s.core.registry.name_of(NODE[0]) == "silo-0" and s.core.registry.name_of(6666) is None
    # round 3: the real silo is back and is still accepted
    s.core.nodes_to_ask(3, list(NODE.values()) + [6666])
    s.aggregate_train(3, honest(outs))
    assert s.core.recorder.round(3)["accepted-replies"] == 3, s.core.recorder.round(3)
    assert s.core.store.entry("silo-0")["stored_round"] == 3
    del asked


def test_5c_rejected_switch_deletes_no_binding(trained, tmp_path):
    cfg, outs = trained
    s = make_strategy(cfg, tmp_path)
    s.aggregate_train(1, honest(outs))
    bindings = dict(s.core.registry.silo_of_node)
    # node of silo-0 claims silo-1 (with silo-1's own valid decoder), then silo-2
    s.aggregate_train(2, [reply(NODE[0], *outs[1]), reply(NODE[0], *outs[2])])
    rejected = s.core.recorder.round(2)["rejected-replies"]
    assert len(rejected) == 2, rejected
    one_line_reasons(rejected)
    assert s.core.registry.silo_of_node == bindings
    # everyone is still accepted under their own names
    s.aggregate_train(3, honest(outs))
    assert s.core.recorder.round(3)["accepted-replies"] == 3


def test_5d_operator_mapping_binds_nodes(trained, tmp_path):
    cfg, outs = trained
    mapped = parse_run_config({**cfg.flat(), "silo-nodes": "silo-0=1000,silo-1=1001,silo-2=1002"})
    s = make_strategy(mapped, tmp_path)
    asked = s.core.nodes_to_ask(1, [1000, 1001, 1002, 7777])
    assert 7777 not in asked and sorted(asked) == [1000, 1001, 1002]
    before_round = [reply(7777, *outs[0]),  # a node outside the mapping, first to reply
                    reply(NODE[0], *outs[1])]  # a listed node claiming another listed name
    s.aggregate_train(1, [*before_round, *honest(outs)])
    rnd = s.core.recorder.round(1)
    assert rnd["accepted-replies"] == 3 and len(rnd["rejected-replies"]) == 2, rnd
    one_line_reasons(rnd["rejected-replies"])
    assert s.core.registry.name_of(7777) is None
    assert {s.core.store.entry(x)["descriptor"]["classes"][0] for x in s.core.store.silos()} == {"0", "2", "4"}
    assert s.core.store.descriptor("silo-0").classes == ("0", "1")


def test_5e_replies_from_nodes_not_asked_are_ignored(trained, tmp_path):
    cfg, outs = trained
    s = make_strategy(cfg, tmp_path)
    # round 1: only silo-0's and silo-1's nodes were connected and asked; silo-2's name is still unbound
    s.core.nodes_to_ask(1, [NODE[0], NODE[1]])
    s.aggregate_train(1, [*honest(outs, (0, 1)), reply(8888, *outs[2])])  # 8888 was never asked
    rnd = s.core.recorder.round(1)
    assert "silo-2" not in s.core.store.silos(), "an unasked node bound silo-2 and stored a generator"
    assert rnd["accepted-replies"] == 2 and len(rnd["rejected-replies"]) == 1, rnd
    one_line_reasons(rnd["rejected-replies"])
    assert s.core.registry.name_of(8888) is None


def test_5f_operator_withdrawal(trained, test_set, tmp_path):
    from alignfl_app.operator import withdraw

    cfg, outs = trained
    s = make_strategy(cfg, tmp_path)
    s.core.nodes_to_ask(1, list(NODE.values()))
    s.aggregate_train(1, honest(outs))
    withdraw(tmp_path / "run", "silo-1", "consent revoked")
    # withdrawing a name outside the run or a path changes nothing
    with pytest.raises(ValueError):
        withdraw(tmp_path / "run", "../silo-0")
    asked = s.core.nodes_to_ask(2, list(NODE.values()))
    assert NODE[1] not in asked
    assert "silo-1" not in s.core.store.silos() and not (tmp_path / "generators" / "silo-1.npz").exists()
    s.aggregate_train(2, honest(outs))  # silo-1 replies anyway
    rnd = s.core.recorder.round(2)
    assert rnd["accepted-replies"] == 2 and len(rnd["rejected-replies"]) == 1, rnd
    assert "withdrawn" in rnd["rejected-replies"][0]
    one_line_reasons(rnd["rejected-replies"])
    assert "silo-1" not in rnd["generators-used"] and "silo-1" not in s.core.store.silos()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["withdrawn"] == {"silo-1": 2}
    assert model_finite(s)
    ckpt = Checkpoint(tmp_path / "run")
    s.core.save_checkpoint(ckpt, 2)
    assert ckpt.load().withdrawn == {"silo-1": 2}


def test_5_evaluate_reply_claiming_a_bound_silo_name_is_not_recorded_under_it(trained, tmp_path):
    cfg, outs = trained
    s = make_strategy(cfg, tmp_path)
    s.aggregate_train(1, honest(outs))
    s.aggregate_evaluate(1, [evaluate_msg(NODE[0], {"accuracy": 0.4, "num-examples": 10}),
                             evaluate_msg(9999, {"accuracy": 1.0, "num-examples": 10}, silo_name="silo-0")])
    silos = s.core.recorder.round(1)["silos"]
    assert silos["silo-0"]["eval-accuracy"] == pytest.approx(0.4)
    assert not any(k.startswith("silo-0") and k != "silo-0" for k in silos), sorted(silos)


# ============================================================================ 6. config and files
@pytest.mark.parametrize("override", [
    {"run-name": ".."}, {"run-name": "a/b"}, {"run-name": "/etc"}, {"run-name": "."},
    {"silo-architectures": "../../x;conv"}, {"silo-architectures": "/etc/passwd;conv"},
    {"seed": 2**63 - 1 + 1}, {"seed": 2**70}, {"seed": -1},
    {"server-learning-rate": float("inf")}, {"server-learning-rate": float("nan")},
    {"sample-temperature": float("inf")}, {"sample-temperature": float("nan")},
    {"max-sampling-mb": float("nan")}, {"max-sampling-mb": float("inf")}, {"max-sampling-mb": 0.0},
    {"silo-names": "a,b"}, {"silo-names": "../x,b,c"}, {"silo-names": "a,A,b"},
    {"silo-nodes": "silo-0=1,silo-1=1"}, {"silo-nodes": "silo-9=1"}, {"silo-nodes": "silo-0=99999999999999999999999"},
])
def test_6_config_refused_in_one_line(tmp_path, override):
    raw = {**tiny_run_config(tmp_path / "results"), **override}
    with pytest.raises(ConfigError) as exc:
        parse_run_config(raw)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("override", [{"silo-name": "../silo-0"}, {"silo-name": "."}, {"partition-id": -1}])
def test_6_node_config_refused_in_one_line(override):
    with pytest.raises(ConfigError) as exc:
        parse_node_config({"partition-id": 0, **override})
    assert "\n" not in str(exc.value)


def test_6_seed_at_the_limit_is_usable(tmp_path):
    """2**63-1 is allowed by the schema: it must not crash anything derived from it (seeds are mixed)."""
    cfg = parse_run_config({**tiny_run_config(tmp_path / "results"), "seed": 2**63 - 1})
    from alignfl_app.seeds import synthesis_seed, server_training_seed
    torch.Generator().manual_seed(synthesis_seed(cfg.run.seed, 10**6, 10**3, 100))
    torch.manual_seed(server_training_seed(cfg.run.seed, 10**6, 10**3))


@pytest.mark.parametrize("target", ["../../etc/passwd", "/etc/passwd", "silo-0.npz"])
def test_6_tampered_index_file_is_never_followed(trained, tmp_path, target):
    cfg, outs = trained
    s = make_strategy(cfg, tmp_path)
    s.aggregate_train(1, honest(outs))
    index = tmp_path / "generators" / "index.json"
    tampered = json.loads(index.read_text())
    tampered["generators"]["silo-1"]["file"] = target
    index.write_text(json.dumps(tampered))
    desc, decoder = GeneratorStore(tmp_path / "generators").load_decoder("silo-1")
    assert desc.silo == "silo-1" and desc.architecture.kind == "conv"
    ref = {k: torch.from_numpy(v) for k, v in outs[1][1].items()}
    assert all(torch.equal(decoder.state_dict()[k], ref[k]) for k in ref)


def test_6_index_entry_renamed_to_a_path_is_refused(trained, tmp_path):
    cfg, outs = trained
    s = make_strategy(cfg, tmp_path)
    s.aggregate_train(1, honest(outs))
    index = tmp_path / "generators" / "index.json"
    tampered = json.loads(index.read_text())
    tampered["generators"]["../../x"] = tampered["generators"].pop("silo-1")
    index.write_text(json.dumps(tampered))
    with pytest.raises(ConfigError) as exc:
        GeneratorStore(tmp_path / "generators")
    assert "\n" not in str(exc.value)


def test_6_new_run_refuses_folder_with_stored_generators(trained, tmp_path):
    cfg, outs = trained
    s = make_strategy(cfg, tmp_path)
    s.aggregate_train(1, honest(outs))
    before = store_snapshot(tmp_path)
    again = make_strategy(cfg, tmp_path)
    with pytest.raises(ConfigError) as exc:
        again.core.first_round(Checkpoint(tmp_path / "run"))
    assert "resume" in str(exc.value) and "\n" not in str(exc.value)
    assert store_snapshot(tmp_path) == before


def test_6_newer_store_and_checkpoint_formats_refused_never_reset(trained, tmp_path):
    cfg, outs = trained
    s = make_strategy(cfg, tmp_path)
    s.aggregate_train(1, honest(outs))
    ckpt = Checkpoint(tmp_path / "run")
    s.core.save_checkpoint(ckpt, 1)
    index = tmp_path / "generators" / "index.json"
    raw = json.loads(index.read_text())
    raw["format"] = 99
    index.write_text(json.dumps(raw))
    before_index = index.read_bytes()
    with pytest.raises(ConfigError) as exc:
        GeneratorStore(tmp_path / "generators")
    assert "format" in str(exc.value) and "\n" not in str(exc.value)
    assert index.read_bytes() == before_index
    state = json.loads(ckpt.state_path.read_text())
    state["format"] = 99
    ckpt.state_path.write_text(json.dumps(state))
    before_state = ckpt.state_path.read_bytes()
    with pytest.raises(ConfigError) as exc:
        ckpt.load()
    assert "format" in str(exc.value) and "\n" not in str(exc.value)
    assert ckpt.state_path.read_bytes() == before_state


def test_6_corrupted_dataset_is_never_loaded(trained, tmp_path):
    from alignfl_app import data as D

    cfg, _ = trained
    src_root = Path(cfg.data.data_root) if hasattr(cfg.data, "data_root") else None
    if src_root is None or not D.raw_dir(src_root, "mnist").is_dir():
        src_root = Path.home() / ".cache" / "alignfl" / "data"
    src = D.raw_dir(src_root, "mnist")
    dst = D.raw_dir(tmp_path / "data", "mnist")
    dst.mkdir(parents=True)
    for name in D.FILES:
        shutil.copy(src / name, dst / name)
    victim = dst / D.FILES[0]
    blob = bytearray(victim.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    victim.write_bytes(bytes(blob))
    assert D.verify(tmp_path / "data", "mnist")
    with pytest.raises(D.DataMissingError) as exc:
        D.load_split(str(tmp_path / "data"), "mnist", True)
    assert "\n" not in str(exc.value) and "checksum" in str(exc.value)


# ============================================================================ own attacks
def test_own_descriptor_round_far_in_future_is_harmless(trained, tmp_path):
    cfg, outs = trained
    desc, state = outs[0]
    d = json.loads(desc.model_dump_json())
    d["round"] = 10**40
    s = make_strategy(cfg, tmp_path)
    s.aggregate_train(1, [reply(NODE[0], desc, state, desc_json=json.dumps(d)), *honest(outs, (1, 2))])
    rnd = s.core.recorder.round(1)
    # either refused in one line, or stored without breaking the store / summary / checkpoint
    one_line_reasons(rnd["rejected-replies"] or ["ok"])
    GeneratorStore(tmp_path / "generators")
    ckpt = Checkpoint(tmp_path / "run")
    s.core.save_checkpoint(ckpt, 1)
    ckpt.load()
    json.loads((tmp_path / "run" / "summary.json").read_text())
    s.aggregate_train(2, honest(outs))
    assert s.core.recorder.round(2)["accepted-replies"] == 3


def test_own_many_and_zero_size_tensors(trained, tmp_path):
    cfg, outs = trained
    desc, state = outs[0]
    s = make_strategy(cfg, tmp_path)
    s.aggregate_train(1, honest(outs))
    before = store_snapshot(tmp_path)
    many = {**state, **{f"t{i}": np.zeros(0, np.float32) for i in range(20_000)}}
    zero = {k: np.zeros((0,) + v.shape[1:], np.float32) for k, v in state.items()}
    s.aggregate_train(2, [reply(NODE[0], desc, many), reply(NODE[0], desc, zero), *honest(outs, (1, 2))])
    rnd = s.core.recorder.round(2)
    assert rnd["accepted-replies"] == 2 and len(rnd["rejected-replies"]) == 2, rnd
    one_line_reasons(rnd["rejected-replies"])
    assert store_snapshot(tmp_path)["silo-0.npz"] == before["silo-0.npz"]
    assert (tmp_path / "run" / "summary.json").stat().st_size < 1_000_000


def test_own_reject_flood_keeps_summary_small(trained, tmp_path):
    """500 junk replies in one round, each with a long reason: summary.json stays small, reasons stay one line."""
    cfg, outs = trained
    desc, state = outs[0]
    s = make_strategy(cfg, tmp_path)
    junk = [reply(20_000 + i, desc, state, desc_json='{"silo": "' + "\\n" * 2000 + '"}') for i in range(500)]
    s.aggregate_train(1, [*junk, *honest(outs)])
    rnd = s.core.recorder.round(1)
    assert rnd["accepted-replies"] == 3
    one_line_reasons(rnd["rejected-replies"])
    assert (tmp_path / "run" / "summary.json").stat().st_size < 1_000_000


def test_own_same_node_sends_two_replies_in_a_round(trained, tmp_path):
    """A node sending its silo's reply twice (a replay) must not count twice or replace the first silently."""
    cfg, outs = trained
    s = make_strategy(cfg, tmp_path)
    s.core.nodes_to_ask(1, list(NODE.values()))
    s.aggregate_train(1, [*honest(outs), reply(NODE[0], *outs[0])])
    rnd = s.core.recorder.round(1)
    assert rnd["accepted-replies"] == 3, rnd
    one_line_reasons(rnd["rejected-replies"])


def test_own_one_node_sending_many_evaluate_replies_counts_once(trained, tmp_path):
    """A bound silo answers an evaluate instruction five times: it must weigh as one silo, not five
    (five copies also move the median cap that is meant to stop a huge count)."""
    cfg, outs = trained
    s = make_strategy(cfg, tmp_path)
    s.aggregate_train(1, honest(outs))
    good = {"accuracy": 0.5, "loss": 1.0, "num-examples": 100}
    flood = [evaluate_msg(NODE[2], {**good, "accuracy": 1.0, "num-examples": 10**9}) for _ in range(5)]
    result = dict(s.aggregate_evaluate(1, [evaluate_msg(NODE[0], good), evaluate_msg(NODE[1], good), *flood]))
    assert result["silo-mean-eval"] <= 0.5 + 0.5 / 3 + 1e-6, result


def test_own_resume_does_not_let_the_first_node_rebind_a_silo_name(trained, tmp_path):
    """Server restart (resume=true, no silo-nodes): the checkpoint knows silo-0 is node 1000. A node that answers
    first after the restart under 'silo-0' must not take the name (and the real node be locked out)."""
    cfg, outs = trained
    named = parse_run_config({**cfg.flat(), "run-name": "study"})
    s = make_strategy(named, tmp_path)
    s.aggregate_train(1, honest(outs))
    ckpt = Checkpoint(tmp_path / "run")
    s.core.save_checkpoint(ckpt, 1)
    resumed = make_strategy(parse_run_config({**named.flat(), "resume": True}), tmp_path)
    assert resumed.core.first_round(ckpt) == 2
    desc, state = outs[0]
    constant = {k: np.zeros_like(v) for k, v in state.items()}  # finite, passes every check: grey images as '0','1'
    resumed.aggregate_train(2, [reply(6666, desc, constant), *honest(outs)])
    rnd = resumed.core.recorder.round(2)
    assert resumed.core.registry.name_of(6666) is None, "a stranger took silo-0's name after the restart"
    assert resumed.core.registry.name_of(NODE[0]) == "silo-0"
    assert rnd["accepted-replies"] == 3 and len(rnd["rejected-replies"]) == 1, rnd
    one_line_reasons(rnd["rejected-replies"])
    with np.load(tmp_path / "generators" / "silo-0.npz") as npz:
        assert any(np.abs(npz[k]).sum() > 0 for k in npz.files)  # the real silo's decoder, not the constant one
