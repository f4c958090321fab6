"""The ALIGN-FL ServerApp: validate config, run the strategy, evaluate on the real global test set."""

from __future__ import annotations

import time
from logging import ERROR, INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from alignfl_app.config import ConfigError, RunConfig, parse_run_config
from alignfl_app.data.datasets import evaluation_plan, global_test_set
from alignfl_app.data.folders import DataFolderError
from alignfl_app.devices import resolve_device
from alignfl_app.files import StorageError
from alignfl_app.models.global_model import GlobalModel
from alignfl_app.server.checkpoint import Checkpoint
from alignfl_app.server.core import AlignFLServer
from alignfl_app.server.metrics import RunRecorder
from alignfl_app.server.store import GeneratorStore
from alignfl_app.server.validation import LabelValidator, label_validator
from alignfl_app.training import set_threads

from .baselines import averaging_strategy
from .strategy import AlignFLStrategy

app = ServerApp()


def run_directory(cfg: RunConfig, run_id: int):
    name = cfg.run.run_name or f"{cfg.data.dataset}-{time.strftime('%Y%m%d-%H%M%S')}-{run_id}"
    return cfg.run.resolved_results_dir() / name


def finish_failed(recorder: RunRecorder) -> None:
    """Mark the run failed in summary.json; a folder that cannot be written (often why the run failed) is only
    logged, so the error that stopped the run is the one raised."""
    try:
        recorder.finish("failed")
    except StorageError as exc:
        log(WARNING, "alignfl: summary.json not updated: %s", exc)


def make_global_evaluator(cfg: RunConfig, model: GlobalModel, recorder: RunRecorder):
    """Server-side evaluation of each round's global model on the real test set (``evaluation_plan``); None when
    the run has none (a folder dataset without global-test-dir)."""
    by, detail = evaluation_plan(cfg)
    recorder.set_evaluation(by, detail)
    log(WARNING if by == "none" else INFO, "Evaluation: %s", detail)
    test = global_test_set(cfg)
    if test is None:
        return None
    x_test, y_test = (t.to(model.device) for t in test)  # moved once, judged every round
    inputs = model.encode(x_test)  # in the model's input space once: a feature transform is fixed for the run
    where = cfg.data.dataset if by == "global-test-set" else "global-test-dir"

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        set_threads(cfg.server.threads)
        model.load_state(arrays.to_torch_state_dict())
        metrics = model.evaluate_inputs(inputs, y_test)
        if server_round > 0:
            recorder.round(server_round)["global"] = metrics
            recorder.round(server_round)["elapsed-seconds"] = time.time() - recorder.started  # round wall times
            recorder.write()
        else:
            recorder.summary["initial-eval-elapsed-seconds"] = time.time() - recorder.started
        if "accuracy" in metrics:
            log(
                INFO,
                "Round %d: global accuracy on the real %s test set: %.4f",
                server_round,
                where,
                metrics["accuracy"],
            )
        return MetricRecord({k: v for k, v in metrics.items() if k != "per-class-accuracy"})

    return evaluate


def make_label_validator(cfg: RunConfig, model: GlobalModel, recorder: RunRecorder) -> LabelValidator | None:
    """The label check of every new generator's classes (``label_validator``), said in the log and summary.json."""
    validator, detail = label_validator(cfg, model.encode)
    recorder.summary["label-check"] = detail
    log(INFO if validator else WARNING, "Label check of every new generator's classes: %s", detail)
    return validator


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        cfg = parse_run_config(context.run_config)
        device = resolve_device(cfg.server.device, "server-device")
    except ConfigError as exc:
        log(ERROR, "alignfl: %s", exc)
        raise
    run_dir = run_directory(cfg, context.run_id)
    checkpoint = Checkpoint(run_dir)
    try:
        recorder = RunRecorder(run_dir, cfg.flat(), method=cfg.baselines.strategy, class_names=cfg.data.class_names)
    except ConfigError as exc:  # StorageError too: a linked or unwritable results folder
        log(ERROR, "alignfl: %s", exc)
        raise
    log(INFO, "%s run %d: results in %s; server on %s", cfg.baselines.strategy, context.run_id, run_dir, device)
    model = GlobalModel.from_config(cfg, device)

    if cfg.baselines.strategy == "alignfl":
        try:
            labels = make_label_validator(cfg, model, recorder)
            core = AlignFLServer(cfg, GeneratorStore(run_dir / "generators"), model, recorder, labels)
            first_round = core.first_round(checkpoint)
        except (ConfigError, DataFolderError) as exc:
            log(ERROR, "alignfl: %s", exc)
            raise
        strategy = AlignFLStrategy(core)
        resumable = {"first_round": first_round, "after_round": lambda rnd: core.save_checkpoint(checkpoint, rnd)}
    else:
        strategy = averaging_strategy(cfg, recorder)
        resumable = {}
    try:
        evaluate = make_global_evaluator(cfg, model, recorder)
    except DataFolderError as exc:
        log(ERROR, "alignfl: %s", exc)
        finish_failed(recorder)
        raise
    try:
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(torch_state_dict=model.state()),
            num_rounds=cfg.run.num_server_rounds,
            timeout=cfg.run.round_timeout,
            train_config=ConfigRecord(),
            evaluate_config=ConfigRecord(),
            evaluate_fn=evaluate,
            **resumable,
        )
    except ConfigError as exc:
        log(ERROR, "alignfl: %s", exc)
        finish_failed(recorder)
        raise
    except BaseException:
        finish_failed(recorder)
        raise
    if len(result.arrays):
        model.load_state(result.arrays.to_torch_state_dict())
    try:
        recorder.save_model(model.saved(cfg.data.class_names), cfg.server.global_model)
        path = recorder.finish("completed")
    except StorageError as exc:
        log(ERROR, "alignfl: %s", exc)
        raise
    metric, by = recorder.metric, recorder.summary["evaluation"]["by"]
    final = recorder.summary.get(f"final-silo-mean-{metric}" if by == "silos" else f"final-global-{metric}")
    log(
        INFO,
        "%s finished: final global %s %s (judged by: %s); summary in %s",
        cfg.baselines.strategy,
        metric,
        final,
        by,
        path,
    )
