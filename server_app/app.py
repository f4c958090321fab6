"""The ALIGN-FL ServerApp: validate config, run the strategy, evaluate on the real global test set."""

from __future__ import annotations

import time
from logging import ERROR, INFO

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from alignfl_app.checkpoint import Checkpoint
from alignfl_app.config import ConfigError, RunConfig, parse_run_config
from alignfl_app.data import global_test_set
from alignfl_app.global_model import GlobalModel
from alignfl_app.metrics import RunRecorder
from alignfl_app.protocol import from_array_record, to_array_record
from alignfl_app.store import GeneratorStore
from alignfl_app.training import set_threads

from .baselines import averaging_strategy
from .strategy import AlignFLStrategy

app = ServerApp()


def run_directory(cfg: RunConfig, run_id: int):
    name = cfg.run_name or f"{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}-{run_id}"
    return cfg.resolved_results_dir() / name


def make_global_evaluator(cfg: RunConfig, model: GlobalModel, recorder: RunRecorder):
    """Server-side evaluation of each round's global model on the real test split of the dataset."""
    x_test, y_test = global_test_set(cfg)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        set_threads(cfg.server_threads)
        model.load_state(from_array_record(arrays))
        metrics = model.evaluate(x_test, y_test)
        if server_round > 0:
            recorder.round(server_round)["global"] = metrics
            recorder.round(server_round)["elapsed-seconds"] = time.time() - recorder.started  # round wall times
            recorder.write()
        else:
            recorder.summary["initial-eval-elapsed-seconds"] = time.time() - recorder.started
        if "accuracy" in metrics:
            log(INFO, "Round %d: global accuracy on the real %s test set: %.4f", server_round, cfg.dataset,
                metrics["accuracy"])
        return MetricRecord({k: v for k, v in metrics.items() if k != "per-class-accuracy"})

    return evaluate


def resume_point(cfg: RunConfig, checkpoint: Checkpoint, model: GlobalModel, recorder: RunRecorder,
                 strategy: AlignFLStrategy) -> int:
    """The first round to run: 1, or (resume) one past the checkpoint, whose state is loaded here."""
    if not cfg.resume:
        if checkpoint.exists():
            raise ConfigError(f"run-name '{cfg.run_name}' already has a checkpoint in {checkpoint.dir}: "
                              "set resume=true to continue it, or choose another run-name")
        return 1
    state = checkpoint.load()
    checkpoint.check_compatible(state, cfg)
    model.load_state(checkpoint.load_model(state))
    strategy.silo_of_node = {int(k): v for k, v in state.silo_of_node.items()}
    recorder.resume(state.completed_round)
    log(INFO, "Resuming after round %d: global model from the checkpoint, %d stored generators %s",
        state.completed_round, len(strategy.store), strategy.store.silos())
    return state.completed_round + 1


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        cfg = parse_run_config(context.run_config)
    except ConfigError as exc:
        log(ERROR, "alignfl: %s", exc)
        raise
    run_dir = run_directory(cfg, context.run_id)
    checkpoint = Checkpoint(run_dir)
    recorder = RunRecorder(run_dir, cfg.model_dump(by_alias=True), method=cfg.strategy)
    log(INFO, "%s run %d: results in %s", cfg.strategy, context.run_id, run_dir)
    model = GlobalModel.from_config(cfg)

    def save_checkpoint(completed_round: int) -> None:
        checkpoint.save(completed_round, model.state(), strategy.silo_of_node, cfg)

    if cfg.strategy == "alignfl":
        strategy = AlignFLStrategy(cfg, GeneratorStore(run_dir / "generators"), model, recorder)
        try:
            first_round = resume_point(cfg, checkpoint, model, recorder, strategy)
        except ConfigError as exc:
            log(ERROR, "alignfl: %s", exc)
            raise
        resumable = {"first_round": first_round, "after_round": save_checkpoint}
    else:
        strategy = averaging_strategy(cfg, recorder)
        resumable = {}
    evaluate = make_global_evaluator(cfg, model, recorder)
    try:
        result = strategy.start(
            grid=grid, initial_arrays=to_array_record(model.state()), num_rounds=cfg.num_server_rounds,
            timeout=cfg.round_timeout, train_config=ConfigRecord(), evaluate_config=ConfigRecord(),
            evaluate_fn=evaluate, **resumable,
        )
    except BaseException:
        recorder.finish("failed")
        raise
    recorder.save_model(from_array_record(result.arrays) if len(result.arrays) else model.state(), cfg.global_model)
    path = recorder.finish("completed")
    log(INFO, "%s finished: final global %s %s; summary in %s", cfg.strategy, recorder.metric,
        recorder.summary.get(f"final-global-{recorder.metric}"), path)
