"""What a DP silo may release, and who controls its budget: the silo, never the run config."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MessageType, RecordDict

from alignfl_app.config import ConfigError, parse_node_config, parse_run_config
from alignfl_app.contract import records as P
from alignfl_app.contract.replies import PrivateTrainMetrics
from alignfl_app.models.global_model import GlobalModel
from alignfl_app.privacy.dpsgd import RandomSource, calibrate
from alignfl_app.privacy.ledger import PrivacyLedger
from alignfl_app.privacy.policy import SiloPrivacyPolicy
from alignfl_app.silo.core import Silo
from client_app import app as client_module
from tests.conftest import make_context, make_message, tiny_run_config
from tests.server.test_strategy import METRICS, make_strategy, reply

PRIVATE_KEYS = {PrivateTrainMetrics.model_fields[k].alias for k in PrivateTrainMetrics.model_fields}


def dp_run(tmp_path, **extra) -> dict:
    return {**tiny_run_config(tmp_path / "results"), "dp-epsilon": 2.0, "num-server-rounds": 2, "dp-steps": 3, **extra}


def without_one_record(silo: Silo) -> Silo:
    """The same silo holding D minus its first training record."""
    d = silo.data
    smaller = dataclasses.replace(d, x_train=d.x_train[1:], y_train=d.y_train[1:], is_outlier=d.is_outlier[1:])
    other = object.__new__(Silo)
    other.__dict__.update(silo.__dict__)
    other.data = smaller
    other.groups = other.generator_groups()
    return other


def replies_of(silo: Silo, run_config: dict, monkeypatch, tmp_path, tag: str) -> tuple:
    """The silo's train reply (round 1, 2) and evaluate reply through the ClientApp, with fixed seeds."""
    monkeypatch.setattr("alignfl_app.privacy.dpsgd.secure_seed", lambda: 7)  # the same noise for D and D - 1
    monkeypatch.setattr(client_module, "silo_for", lambda context: silo)
    silo.dir = tmp_path / tag  # each dataset gets its own (empty) ledger
    ctx = make_context(run_config, 0)
    out = []
    for rnd in (1, 2):
        msg = make_message(
            RecordDict({P.CONFIG: ConfigRecord({P.SERVER_ROUND: rnd})}), MessageType.TRAIN, 1, ctx.node_id
        )
        out.append(client_module.app(msg, ctx))
    model = GlobalModel("classifier", 10)
    ask = make_message(
        RecordDict(
            {
                P.GLOBAL_MODEL: ArrayRecord(torch_state_dict=model.state()),
                P.CONFIG: ConfigRecord({P.GLOBAL_MODEL_KIND: "classifier", P.SERVER_ROUND: 1}),
            }
        ),
        MessageType.EVALUATE,
        1,
        ctx.node_id,
    )
    out.append(client_module.app(ask, ctx))
    return tuple(out)


def non_decoder_fields(msg) -> dict:
    """Everything a reply carries except the decoder's weights (its tensor names and shapes included)."""
    if msg.has_error():
        return {"error": (msg.error.code, msg.error.reason)}
    c = msg.content
    return {
        "records": sorted(c.keys()),
        "decoder-layout": sorted((k, tuple(a.shape), a.dtype) for k, a in c[P.DECODER].items()),
        "descriptor": c[P.DESCRIPTOR][P.DESCRIPTOR_JSON],
        "metrics": dict(c[P.METRICS]),
    }


@pytest.mark.parametrize("layout", ["conditional", "per-class"])
def test_dp_replies_are_identical_for_neighbouring_datasets_outside_the_decoder(tmp_path, monkeypatch, layout):
    """D and D minus one record, same seeds: every field but the decoder's weights is the same, and the metrics
    hold exactly the keys of the one private schema (no counts, timings, losses, audit figures)."""
    run_config = dp_run(tmp_path, **{"generator-layout": layout, "num-server-rounds": 2})
    silo = Silo(parse_run_config(run_config), parse_node_config({"partition-id": 0}))  # holds outliers: audited
    assert silo.data.num_outliers > 0
    full = replies_of(silo, run_config, monkeypatch, tmp_path, "d")
    minus = replies_of(without_one_record(silo), run_config, monkeypatch, tmp_path, "d-minus-one")
    for a, b in zip(full, minus, strict=True):
        assert non_decoder_fields(a) == non_decoder_fields(b)
    for train in full[:2]:
        assert not train.has_error() and set(train.content[P.METRICS].keys()) == PRIVATE_KEYS
        assert set(train.content.keys()) == {P.DECODER, P.DESCRIPTOR, P.METRICS}
    assert full[2].has_error() and "does not release evaluations" in full[2].error.reason
    # the figures computed from the records stayed on the silo
    report = json.loads((tmp_path / "d" / "reports" / "round-002.json").read_text())
    assert report["num-examples"] == len(silo.data.x_train) and "audit-mia-auc" in report


def test_server_enforces_the_private_schema_on_receipt(tmp_path):
    """In a DP run a train reply with any figure beyond the public constants is rejected, whatever its values."""
    cfg = parse_run_config(dp_run(tmp_path))
    out = Silo(cfg, parse_node_config({"partition-id": 1})).train_round("run", 1)
    state = {k: v.numpy() for k, v in out.decoder_state.items()}
    public = out.metrics.record()
    strategy = make_strategy(cfg, tmp_path)
    for leaky in (
        {**public, "num-examples": 132},
        {**public, "train-seconds": 1.0},
        METRICS,
        {k: v for k, v in public.items() if k != "dp-epsilon-spent"},
    ):
        strategy.aggregate_train(1, [reply(1001, out.descriptor, state, metrics=leaky)])
        assert strategy.core.recorder.round(1)["rejected-replies"] and "silo-1" not in strategy.core.store
    strategy.aggregate_train(1, [reply(1001, out.descriptor, state, metrics=public)])
    assert "silo-1" in strategy.core.store
    # and a DP run asks no silo to evaluate on its records
    assert strategy.configure_evaluate(1, ArrayRecord(), ConfigRecord(), grid=None) == []


def policy(tmp_path, text: str):
    d = tmp_path / "silos" / "silo-0"
    d.mkdir(parents=True, exist_ok=True)
    (d / "privacy-policy.toml").write_text(text)
    return d


def train(run_config: dict, server_round: int = 1, run: str = "run-a"):
    silo = Silo(parse_run_config(run_config), parse_node_config({"partition-id": 0}))
    return silo.train_round(run, server_round)


def test_the_run_config_cannot_raise_reset_or_disable_a_silos_budget(tmp_path):
    """Tried as a server would: more epsilon, DP off, another results-dir or run, a budget or ledger key."""
    from alignfl_app.privacy.errors import PolicyRefusal, PrivacyBudgetExceeded, PrivacyRefusal

    base = dp_run(tmp_path, **{"num-server-rounds": 1})
    first = calibrate(parse_run_config(base).privacy, 1).planned_epsilon
    policy(tmp_path, f"require-dp = true\nmax-epsilon = 2.0\nbudget-epsilon = {first * 1.05}\n")
    train(base)  # spends most of the lifetime budget: a second run would pass it
    with pytest.raises(PolicyRefusal, match="at most epsilon 2"):
        train({**base, "dp-epsilon": 8.0})
    with pytest.raises(PolicyRefusal, match="requires DP"):
        train({**base, "dp-epsilon": 0.0})
    with pytest.raises(PolicyRefusal, match="dp-delta"):
        train({**base, "dp-delta": 1e-3})
    for fresh in ({**base, "results-dir": str(tmp_path / "elsewhere")}, {**base, "run-name": "another"}):
        with pytest.raises(PrivacyBudgetExceeded, match="lifetime budget"):
            train(fresh, run="run-b")  # the same ledger, wherever the results go
    for key, value in (("dp-budget-epsilon", 100.0), ("privacy-ledger-dir", str(tmp_path / "fresh"))):
        with pytest.raises(ConfigError, match="unknown key"):
            parse_run_config({**base, key: value})
    with pytest.raises(ConfigError):
        parse_node_config({"partition-id": 0, "privacy-ledger": str(tmp_path / "fresh.json")})
    ledger = PrivacyLedger(tmp_path / "silos" / "silo-0", "silo-0")
    assert len(ledger.read().entries) == 1  # refused rounds booked nothing
    assert issubclass(PolicyRefusal, PrivacyRefusal)


def test_a_run_cannot_spend_past_its_plan_by_asking_rounds_again_or_beyond(tmp_path):
    """The server asks round 1 twice, then a round the plan does not have: refused, nothing booked."""
    from alignfl_app.privacy.errors import PrivacyBudgetExceeded

    policy(tmp_path, "budget-epsilon = 100.0\nmax-epsilon = 4.0\n")
    run_config = dp_run(tmp_path, **{"num-server-rounds": 2, "dp-epsilon": 4.0})
    silo = Silo(parse_run_config(run_config), parse_node_config({"partition-id": 0}))
    first = silo.train_round("run-a", 1)
    for again in (1, 3, 999, 0):
        with pytest.raises(PrivacyBudgetExceeded, match="trains each once"):
            silo.train_round("run-a", again, first.state)
    assert [e.round for e in PrivacyLedger(silo.dir, "silo-0").read().entries] == [1]


def test_a_silo_that_trained_privately_never_trains_or_evaluates_without_dp_again(tmp_path):
    """No policy file: the first DP run leaves a ledger, and a later run asking for no DP is refused."""
    from alignfl_app.privacy.errors import PolicyRefusal

    train(dp_run(tmp_path, **{"num-server-rounds": 1}))
    plain = {**tiny_run_config(tmp_path / "results"), "num-server-rounds": 1}
    with pytest.raises(PolicyRefusal, match="trained privately before"):
        train(plain, run="run-b")
    silo = Silo(parse_run_config(plain), parse_node_config({"partition-id": 0}))
    with pytest.raises(Exception, match="does not release evaluations"):
        silo.evaluate_global("classifier", GlobalModel("classifier", 10).state())


def test_without_a_policy_a_server_cannot_set_a_huge_first_cap(tmp_path):
    """The default policy accepts at most epsilon 8 per run: a first run planned with little noise is refused."""
    from alignfl_app.privacy.errors import PolicyRefusal

    with pytest.raises(PolicyRefusal, match="at most epsilon 8"):
        train(dp_run(tmp_path, **{"dp-epsilon": 0.0, "dp-noise-multiplier": 0.3, "num-server-rounds": 3}))
    assert not (tmp_path / "silos" / "silo-0" / "privacy-ledger.json").exists()


def test_a_train_message_cannot_switch_a_private_silo_to_weight_averaging(tmp_path, monkeypatch):
    """strategy='fedavg' in the message of a DP run: refused, nothing trained on the records without DP."""
    run_config = dp_run(tmp_path)
    ctx = make_context(run_config, 0)
    model = GlobalModel("classifier", 10)
    msg = make_message(
        RecordDict(
            {
                P.GLOBAL_MODEL: ArrayRecord(torch_state_dict=model.state()),
                P.CONFIG: ConfigRecord({P.SERVER_ROUND: 1, P.STRATEGY: "fedavg"}),
            }
        ),
        MessageType.TRAIN,
        1,
        ctx.node_id,
    )
    reply = client_module.app(msg, ctx)
    assert reply.has_error() and reply.error.code == P.STRATEGY_MISMATCH_ERROR
    silo = Silo(parse_run_config(run_config), parse_node_config({"partition-id": 0}))
    with pytest.raises(Exception, match="weight averaging without DP"):
        silo.train_global_model(1, model.state())


def test_a_failing_private_round_sends_no_exception_text(tmp_path, monkeypatch):
    run_config = dp_run(tmp_path)
    ctx = make_context(run_config, 0)
    silo = client_module.silo_for(ctx)
    monkeypatch.setattr(
        Silo, "record_figures", lambda *a: (_ for _ in ()).throw(ValueError("132 records, 12 outliers"))
    )
    msg = make_message(RecordDict({P.CONFIG: ConfigRecord({P.SERVER_ROUND: 1})}), MessageType.TRAIN, 1, ctx.node_id)
    reply = client_module.app(msg, ctx)
    assert reply.has_error() and reply.error.code == P.PRIVATE_FAILURE_ERROR and "132" not in reply.error.reason
    assert "132 records" in (silo.dir / "reports" / "failures.log").read_text()


def test_the_models_own_draws_under_dp_come_from_a_secret_seed(tmp_path):
    """The VAE's reparameterisation noise must not replay from the run's public seed."""
    from alignfl_app.seeds import vae_init_seed

    cfg = parse_run_config(dp_run(tmp_path, **{"num-server-rounds": 1}))
    Silo(cfg, parse_node_config({"partition-id": 0})).train_round("run", 1)
    assert torch.initial_seed() != vae_init_seed(cfg.run.seed, 0)


def test_without_a_policy_the_first_dp_run_sets_the_lifetime_cap(tmp_path):
    base = dp_run(tmp_path, **{"num-server-rounds": 1})
    train(base)
    from alignfl_app.privacy.errors import PrivacyBudgetExceeded

    with pytest.raises(PrivacyBudgetExceeded, match="budget-epsilon in"):
        train({**base, "dp-epsilon": 4.0}, run="run-b")


def _book_many(args) -> None:
    silo_dir, run, rounds = args
    cfg = parse_run_config({**tiny_run_config("r"), "dp-epsilon": 2.0, "dp-steps": 2, "num-server-rounds": rounds})
    plan = calibrate(cfg.privacy, rounds)
    ledger = PrivacyLedger(silo_dir, "silo-0")
    for r in range(1, rounds + 1):
        ledger.book(run, r, plan.round_mechanisms(False), plan, SiloPrivacyPolicy(budget_epsilon=1e6))


def test_two_concurrent_runs_on_one_ledger_book_every_round(tmp_path):
    with multiprocessing.get_context("fork").Pool(2) as pool:
        pool.map(_book_many, [(tmp_path, "run-a", 15), (tmp_path, "run-b", 15)])
    entries = PrivacyLedger(tmp_path, "silo-0").read().entries
    assert sorted((e.run, e.round) for e in entries) == sorted(
        [(run, r) for run in ("run-a", "run-b") for r in range(1, 16)]
    )
    spent = [e.epsilon_after for e in entries]
    assert spent == sorted(spent)  # each booking saw every earlier one


def test_secure_noise_is_standard_normal_and_trains(tmp_path):
    source = RandomSource(secure=True)
    draws = source.normal((200_000,))
    assert abs(float(draws.mean())) < 0.01 and abs(float(draws.std()) - 1) < 0.01
    u = source.uniform(100_000)
    assert float(u.min()) > 0 and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.01
    out = train(dp_run(tmp_path, **{"dp-secure-noise": True, "num-server-rounds": 1}))
    assert all(torch.isfinite(v).all() for v in out.decoder_state.values())
