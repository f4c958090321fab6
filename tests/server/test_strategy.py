"""The server's side: stateful generator store, bad replies rejected without harm, global model learned."""

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, MessageType, MetricRecord, RecordDict

from alignfl_app.config import ArchitectureSpec, parse_node_config, parse_run_config
from alignfl_app.contract import records as P
from alignfl_app.contract.sampling import SamplingStyle
from alignfl_app.server.store import GeneratorStore, GeneratorTerms
from alignfl_app.server.synthesis import SyntheticBudget, synthesize
from alignfl_app.silo.core import Silo
from server_app.messages import train_reply
from tests.conftest import make_message, retrained, tiny_run_config
from tests.red_team.attack_kit import METRICS, NODE, make_strategy, reply


def test_silo_missing_a_round_still_contributes(trained, tmp_path):
    cfg, outs = trained
    strategy = make_strategy(cfg, tmp_path)
    arrays, _ = strategy.aggregate_train(1, [reply(NODE[s], *outs[s]) for s in range(3)])
    assert arrays is not None and strategy.core.store.silos() == ["silo-0", "silo-1", "silo-2"]
    # round 2: silo 1 does not answer at all
    arrays, metrics = strategy.aggregate_train(2, [reply(NODE[s], outs[s][0], retrained(outs[s][1])) for s in (0, 2)])
    rnd = strategy.core.recorder.round(2)
    assert rnd["generators-used"] == ["silo-0", "silo-1", "silo-2"] and rnd["stale-silos"] == ["silo-1"]
    assert strategy.core.store.entry("silo-1")["stored_round"] == 1
    synthetic = synthesize(
        strategy.core.store, strategy.core.terms, SyntheticBudget(30), SamplingStyle(), seed=lambda i: i
    )
    labels, counts = synthetic.y, synthetic.counts
    assert set(labels.tolist()) == {0, 1, 2, 3, 4, 5} and counts["silo-1"] == 30
    assert metrics["generators"] == 3 and arrays is not None


def test_a_synthetic_total_is_split_over_the_classes_then_over_their_silos(trained, tmp_path):
    cfg, outs = trained
    store = GeneratorStore(tmp_path / "generators")
    # silo 2 holds "1" and "5": class "1" is then held by silos 0 and 2, class "4" by none
    descs = {0: outs[0][0], 1: outs[1][0], 2: outs[2][0].model_copy(update={"classes": ("1", "5")})}
    for s, desc in descs.items():
        store.put(desc, outs[s][1], 1)
    terms = GeneratorTerms.from_config(cfg)
    synthetic = synthesize(store, terms, SyntheticBudget(per_silo=999, total=61), SamplingStyle(), seed=lambda i: i)
    x, labels, counts = synthetic.x, synthetic.y, synthetic.counts
    per_class = {c: int((labels == c).sum()) for c in range(10)}
    assert per_class == {0: 13, 1: 12, 2: 12, 3: 12, 4: 0, 5: 12, 6: 0, 7: 0, 8: 0, 9: 0} and len(x) == 61
    assert counts == {"silo-0": 13 + 6, "silo-1": 24, "silo-2": 6 + 12}  # class "1": 6 from each holder
    # a total adds no sample as silos join: the same 61 from four generators
    store.put(descs[1].model_copy(update={"silo": "silo-3"}), outs[1][1], 1)
    synthetic = synthesize(store, terms, SyntheticBudget(per_silo=999, total=61), SamplingStyle(), seed=lambda i: i)
    more, counts = synthetic.y, synthetic.counts
    assert len(more) == 61 and counts["silo-1"] == counts["silo-3"] == 12


def _bad_variants(desc, state):
    key = next(iter(state))
    nan = {**state, key: state[key].copy()}
    nan[key].flat[0] = np.nan
    inf = {**state, key: state[key].copy()}
    inf[key].flat[-1] = np.inf
    shape = {**state, key: np.zeros((3, 3), np.float32)}
    f64 = {**state, key: state[key].astype(np.float64)}
    missing = dict(list(state.items())[1:])
    extra = {**state, "encoder.mu.weight": np.zeros((2, 2), np.float32)}
    text = desc.model_dump_json()
    huge = desc.model_copy(
        update={
            "architecture": ArchitectureSpec(name="huge", kind="mlp", latent_dim=256, hidden=(4096, 4096, 4096, 4096))
        }
    )
    overflow = {k: np.full_like(v, 3e38) for k, v in state.items()}  # finite weights, infinite samples
    return {
        "NaN": dict(state=nan),
        "Inf": dict(state=inf),
        "wrong shape": dict(state=shape),
        "dtype": dict(state=f64),
        "missing tensors": dict(state=missing),
        "more tensors than the decoder": dict(state=extra),
        "encoder record": dict(state=state, extra_records={"encoder": ArrayRecord()}),
        "malformed descriptor": dict(state=state, desc_json="{not json"),
        "unknown descriptor field": dict(state=state, desc_json=text[:-1] + ', "backdoor": 1}'),
        "missing descriptor field": dict(state=state, desc_json=text.replace('"layout":"conditional",', "")),
        "labels outside dataset": dict(
            state=state, desc_json=text.replace('"classes":["0","1"]', '"classes":["0","11"]')
        ),
        "path in a class name": dict(
            state=state, desc_json=text.replace('"classes":["0","1"]', '"classes":["0","../1"]')
        ),
        "old descriptor format": dict(state=state, desc_json=text.replace('"format":2', '"format":1')),
        "other image shape": dict(
            state=state, desc_json=text.replace('"image_shape":[1,28,28]', '"image_shape":[3,28,28]')
        ),
        "unconditional in a classifier run": dict(
            state=state, desc_json=text.replace('"layout":"conditional"', '"layout":"unconditional"')
        ),
        "huge declared decoder": dict(state=state, desc_json=huge.model_dump_json()),
        "non-finite samples": dict(state=overflow),
        "unknown metric": dict(state=state, metrics={**METRICS, "backdoor": 1.0}),
        "NaN count": dict(state=state, metrics={**METRICS, "num-examples": float("nan")}),
        "huge count": dict(state=state, metrics={**METRICS, "num-examples": 10**18}),
        "list for a number": dict(state=state, metrics={**METRICS, "train-loss": [1.0, 2.0]}),
        "metric missing": dict(state=state, metrics={k: v for k, v in METRICS.items() if k != "num-examples"}),
    }


REASON = {
    "other image shape": "image_shape",
    "unconditional in a classifier run": "conditional=",
    "labels outside dataset": "assigned to silo",
    "huge declared decoder": "declares a",
    "non-finite samples": "samples are not finite",
    "unknown metric": "backdoor",
    "huge count": "num-examples",
    "NaN count": "num-examples",
}


@pytest.mark.parametrize(
    "variant",
    [
        "NaN",
        "Inf",
        "wrong shape",
        "dtype",
        "missing tensors",
        "more tensors than the decoder",
        "encoder record",
        "malformed descriptor",
        "unknown descriptor field",
        "missing descriptor field",
        "labels outside dataset",
        "path in a class name",
        "old descriptor format",
        "other image shape",
        "unconditional in a classifier run",
        "huge declared decoder",
        "non-finite samples",
        "unknown metric",
        "NaN count",
        "huge count",
        "list for a number",
        "metric missing",
    ],
)
def test_bad_reply_is_rejected_and_keeps_last_good_generator(trained, tmp_path, variant):
    cfg, outs = trained
    strategy = make_strategy(cfg, tmp_path)
    strategy.aggregate_train(1, [reply(NODE[s], *outs[s]) for s in range(3)])
    npz = tmp_path / "generators" / "silo-0.npz"
    before = npz.read_bytes()
    desc, state = outs[0]
    bad = _bad_variants(desc, state)[variant]
    arrays, metrics = strategy.aggregate_train(
        2, [reply(NODE[0], desc, **bad), reply(NODE[2], outs[2][0], retrained(outs[2][1]))]
    )
    rnd = strategy.core.recorder.round(2)
    assert rnd["accepted-replies"] == 1 and len(rnd["rejected-replies"]) == 1, rnd["rejected-replies"]
    assert rnd["rejected-replies"][0].startswith(f"node {NODE[0]}:")
    assert REASON.get(variant, "") in rnd["rejected-replies"][0]
    assert npz.read_bytes() == before and strategy.core.store.entry("silo-0")["stored_round"] == 1
    assert strategy.core.store.entry("silo-2")["stored_round"] == 2
    assert arrays is not None and metrics["rejected-replies"] == 1


def test_oversized_decoder_rejected_before_it_is_decoded(trained, tmp_path):
    cfg, outs = trained
    small = parse_run_config({**cfg.flat(), "max-decoder-mb": 0.01})
    strategy = make_strategy(small, tmp_path)
    strategy.aggregate_train(1, [reply(NODE[0], *outs[0])])
    assert "limit" in strategy.core.recorder.round(1)["rejected-replies"][0] and len(strategy.core.store) == 0


def test_error_reply_and_impostor_do_not_kill_the_round(trained, tmp_path):
    cfg, outs = trained
    strategy = make_strategy(cfg, tmp_path)
    strategy.aggregate_train(1, [reply(NODE[s], *outs[s]) for s in range(3)])
    failed = make_message(None, MessageType.TRAIN, src=NODE[1], dst=1, error=Error(code=0, reason="silo crashed"))
    impostor = reply(4242, *outs[0])  # another node claims to be silo-0
    arrays, _ = strategy.aggregate_train(2, [failed, impostor, reply(NODE[2], *outs[2])])
    reasons = " | ".join(strategy.core.recorder.round(2)["rejected-replies"])
    assert "silo crashed" in reasons and "is bound to node" in reasons
    assert arrays is not None and strategy.core.store.entry("silo-0")["stored_round"] == 1


def test_store_survives_a_restart(trained, tmp_path):
    cfg, outs = trained
    strategy = make_strategy(cfg, tmp_path)
    strategy.aggregate_train(1, [reply(NODE[s], *outs[s]) for s in range(3)])
    reopened = GeneratorStore(tmp_path / "generators")
    assert reopened.silos() == ["silo-0", "silo-1", "silo-2"]
    desc, decoder = reopened.load_decoder("silo-1")
    assert desc.classes == ("2", "3") and desc.architecture.kind == "conv"


def test_unconditional_generators_train_a_global_vae(tmp_path):
    """The paper's code path: unconditional decoders, a global VAE learned from their samples."""
    cfg = parse_run_config({**tiny_run_config(tmp_path / "results"), "conditional": False, "global-model": "vae"})
    outs = [Silo(cfg, parse_node_config({"partition-id": s})).train_round("run", 1) for s in range(2)]
    assert all(o.descriptor.cond_dim == 0 for o in outs)
    strategy = make_strategy(cfg, tmp_path)
    arrays, metrics = strategy.aggregate_train(
        1,
        [reply(NODE[s], o.descriptor, {k: v.numpy() for k, v in o.decoder_state.items()}) for s, o in enumerate(outs)],
    )
    assert arrays is not None and np.isfinite(metrics["server-train-loss"])
    from alignfl_app.data.datasets import global_test_set

    x, y = global_test_set(cfg)
    result = strategy.core.model.evaluate(x[:200], y[:200])
    assert np.isfinite(result["neg-elbo"]) and result["neg-elbo"] > 0


class _Payload:
    """Unpickling this writes a file: proof of code execution if anything ever unpickles a reply."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "pwned"))


def test_pickled_tensor_is_rejected_and_never_unpickled(trained, tmp_path):
    import io

    cfg, outs = trained
    strategy = make_strategy(cfg, tmp_path)
    strategy.aggregate_train(1, [reply(NODE[s], *outs[s]) for s in range(3)])
    desc, state = outs[0]
    marker = tmp_path / "unpickled"
    buf = io.BytesIO()
    np.save(buf, np.array([_Payload(str(marker))], dtype=object), allow_pickle=True)
    key = next(iter(state))
    msg = reply(NODE[0], desc, state)
    msg.content[P.DECODER][key] = Array(dtype="object", shape=(1,), stype="numpy.ndarray", data=buf.getvalue())
    strategy.aggregate_train(2, [msg, reply(NODE[2], *outs[2])])
    rnd = strategy.core.recorder.round(2)
    assert not marker.exists()
    assert len(rnd["rejected-replies"]) == 1 and "not a plain numpy array" in rnd["rejected-replies"][0]
    assert strategy.core.store.entry("silo-0")["stored_round"] == 1


def test_bad_evaluate_replies_are_left_out_without_harm(trained, tmp_path):
    """Evaluate metrics pass the same schema: a NaN, huge or list-valued count cannot fail the run or skew the mean."""
    cfg, outs = trained
    strategy = make_strategy(cfg, tmp_path)
    strategy.aggregate_train(1, [reply(NODE[s], *outs[s]) for s in range(3)])

    def evaluate(node: int, metrics: dict):
        return make_message(RecordDict({P.METRICS: MetricRecord(metrics)}), MessageType.EVALUATE, src=node, dst=1)

    good = {"accuracy": 0.5, "loss": 1.0, "num-examples": 4}
    result = strategy.aggregate_evaluate(
        1,
        [
            evaluate(NODE[0], good),
            evaluate(NODE[1], {**good, "num-examples": 10**18, "accuracy": 1.0}),
            evaluate(NODE[2], {**good, "num-examples": float("inf")}),
            evaluate(4242, {**good, "accuracy": [1.0]}),
            make_message(
                RecordDict({P.METRICS: ConfigRecord({"accuracy": "1.0"})}), MessageType.EVALUATE, src=4243, dst=1
            ),
        ],
    )
    assert dict(result) == {"silo-mean-eval": 0.5, "silo-median-eval": 0.5, "num-examples": 4}
    assert set(strategy.core.recorder.round(1)["silos"]["silo-0"]) >= {"eval-accuracy"}
    assert "eval-accuracy" not in strategy.core.recorder.round(1)["silos"]["silo-1"]


def test_store_never_follows_a_file_name_read_back_from_disk(trained, tmp_path):
    cfg, outs = trained
    strategy = make_strategy(cfg, tmp_path)
    strategy.aggregate_train(1, [reply(NODE[s], *outs[s]) for s in range(3)])
    index = tmp_path / "generators" / "index.json"
    tampered = json.loads(index.read_text())
    tampered["generators"]["silo-1"]["file"] = "../../elsewhere.npz"
    index.write_text(json.dumps(tampered))
    desc, decoder = GeneratorStore(tmp_path / "generators").load_decoder("silo-1")
    assert desc.silo == "silo-1" and sum(p.numel() for p in decoder.parameters()) > 0


def test_a_new_run_never_reuses_a_folder_with_stored_generators(trained, tmp_path):
    """A run killed in its first round leaves generators but no checkpoint: a new run of that name is refused."""
    from alignfl_app.config import ConfigError
    from alignfl_app.server.checkpoint import Checkpoint

    cfg, outs = trained
    strategy = make_strategy(cfg, tmp_path)
    strategy.core.accept(1, NODE[0], train_reply(reply(NODE[0], *outs[0]), 1 << 26))
    again = make_strategy(cfg, tmp_path)
    with pytest.raises(ConfigError, match="already holds a run.*resume=true"):
        again.core.first_round(Checkpoint(tmp_path / "run"))
