"""Reference points without federation, on exactly the silos' partitions (outliers included).

- local-only: every silo trains the global model (``global-model``: the classifier, or the VAE over all
  classes) on its own data alone; judged on the real global test set (mean and per silo) and on its own
  local test set. The floor federation must beat.
- centralised: one such model on the pooled training data of all silos: the upper bound.

Both write ``summary.json`` in the RunRecorder format (one "round" holding the final model), so the
comparison reads them like the federated runs.

    alignfl reference --experiment mnist-fast [--method local-only centralised] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import torch

from alignfl_app.config import HEADLINE_METRIC, ConfigError, RunConfig
from alignfl_app.data.datasets import SiloData, evaluation_plan, federation_silo_data, global_test_set
from alignfl_app.devices import peak_rss_mb
from alignfl_app.experiments import add_overrides_option, load_experiment, parse_assignments
from alignfl_app.models.global_model import GlobalModel
from alignfl_app.server.metrics import RunRecorder
from alignfl_app.training import ShuffledBatches, set_threads

METHODS = ("local-only", "centralised")


VALIDATION_SHARE = 0.1  # of each class's training records, held out to choose the epoch


def validation_split(y: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) indices: a seeded tenth of every class held out (at least one record of a class with
    two or more)."""
    rng = np.random.default_rng([seed, 7])
    train, val = [], []
    for c in torch.unique(y).tolist():
        members = rng.permutation(np.flatnonzero(y.numpy() == c))
        n_val = min(max(int(round(len(members) * VALIDATION_SHARE)), 1), len(members) - 1)
        val.append(members[:n_val])
        train.append(members[n_val:])
    return torch.from_numpy(np.sort(np.concatenate(train))), torch.from_numpy(np.sort(np.concatenate(val)))


def _fit(cfg: RunConfig, x: torch.Tensor, y: torch.Tensor, seed: int) -> tuple[GlobalModel, dict[str, float]]:
    """The reference model: the server's own model (classifier and feature space), trained on real records for
    the epoch, of at most ``reference-epochs``, that scores best on a held-out validation tenth (balanced accuracy;
    the VAE: negative ELBO), so a reference is never over- or under-trained by a fixed schedule."""
    model = GlobalModel(
        cfg.server.global_model,
        cfg.data.num_classes,
        seed=seed,
        conditional=cfg.local.conditional,
        image_shape=cfg.data.image_shape,
        features=cfg.features.spec,
    )
    inputs = model.encode(x)
    train, val = validation_split(y.cpu(), seed)
    batches = ShuffledBatches(cfg.local.batch_size, 1)
    generator = torch.Generator().manual_seed(seed)
    best: tuple[float, int, dict] | None = None
    loss, seconds, seen = float("nan"), 0.0, 0
    for epoch in range(1, cfg.baselines.reference_epochs + 1):
        report = model.fit((inputs[train], y[train]), batches(len(train), generator), cfg.local.learning_rate)
        loss, seconds, seen = report.loss, seconds + report.seconds, seen + report.examples_seen
        figures = model.evaluate_inputs(inputs[val], y[val])
        score = figures["balanced-accuracy"] if "balanced-accuracy" in figures else -figures["neg-elbo"]
        if best is None or score > best[0]:
            best = (score, epoch, copy.deepcopy(model.model.state_dict()))
    assert best is not None  # reference-epochs >= 1
    model.model.load_state_dict(best[2])
    return model, {
        "train-loss": loss,
        "train-seconds": seconds,
        "samples-per-second": seen / max(seconds, 1e-9),
        "num-examples": len(train),
        "validation-examples": len(val),
        "chosen-epoch": best[1],
    }


def reference_test_set(cfg: RunConfig, silos: list[SiloData], rec: RunRecorder) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's global test set; without one (a folder dataset without global-test-dir) the silos' held-out
    images pooled (no federation here, so pooling them is allowed), and the summary says which."""
    test = global_test_set(cfg)
    if test is not None:
        rec.set_evaluation(*evaluation_plan(cfg))
        return test
    rec.set_evaluation("pooled-silo-test-sets", "no global-test-dir: the silos' held-out images, pooled")
    return torch.cat([d.x_test for d in silos]), torch.cat([d.y_test for d in silos])


def local_only(cfg: RunConfig, run_dir: Path) -> dict:
    """Each silo's own model; the 'global' entry is the mean over silos of their global-test metrics."""
    rec = RunRecorder(run_dir, cfg.flat(), method="local-only", class_names=cfg.data.class_names)
    key = rec.metric
    silos = [federation_silo_data(cfg, k) for k in range(cfg.data.num_silos)]
    x_test, y_test = reference_test_set(cfg, silos, rec)
    values, per_class = [], []
    for k, data in enumerate(silos):
        model, fit = _fit(cfg, data.x_train, data.y_train, seed=cfg.run.seed + k)
        glob = model.evaluate(x_test, y_test)
        local = model.evaluate(data.x_test, data.y_test)
        silo = rec.silo(1, cfg.data.names[k])
        silo.update(
            {
                **fit,
                "num-outliers": data.num_outliers,
                f"global-{key}": glob[key],
                f"eval-{key}": local[key],
                "eval-num-examples": len(data.y_test),
            }
        )
        values.append(glob[key])
        if "per-class-accuracy" in glob:
            silo["global-per-class-accuracy"] = glob["per-class-accuracy"]
            silo["global-balanced-accuracy"] = glob["balanced-accuracy"]
            per_class.append(glob["per-class-accuracy"])
    rec.round(1)["global"] = {
        key: float(np.mean(values)),
        f"{key}-std-over-silos": float(np.std(values)),
        "num-examples": len(y_test),
    }
    if per_class:
        rec.round(1)["global"]["per-class-accuracy"] = np.nanmean(np.array(per_class, dtype=float), axis=0).tolist()
        rec.round(1)["global"]["balanced-accuracy"] = float(
            np.mean([rec.silo(1, name)["global-balanced-accuracy"] for name in cfg.data.names])
        )
    rec.round(1)["server"] = {"peak-rss-mb": peak_rss_mb()}
    rec.finish()
    return rec.summary


def centralised(cfg: RunConfig, run_dir: Path) -> dict:
    """One model on the union of all silos' training records; judged on the global and local test sets."""
    rec = RunRecorder(run_dir, cfg.flat(), method="centralised", class_names=cfg.data.class_names)
    key = rec.metric
    silos = [federation_silo_data(cfg, k) for k in range(cfg.data.num_silos)]
    x = torch.cat([d.x_train for d in silos])
    y = torch.cat([d.y_train for d in silos])
    model, fit = _fit(cfg, x, y, seed=cfg.run.seed)
    x_test, y_test = reference_test_set(cfg, silos, rec)
    rec.round(1)["global"] = model.evaluate(x_test, y_test)
    rec.round(1)["server"] = {**fit, "peak-rss-mb": peak_rss_mb()}
    for d in silos:
        local = model.evaluate(d.x_test, d.y_test)
        rec.silo(1, cfg.data.names[d.silo]).update({f"eval-{key}": local[key], "eval-num-examples": len(d.y_test)})
    rec.save_model(model.saved(cfg.data.class_names), cfg.server.global_model)
    rec.finish()
    return rec.summary


RUNNERS = {"local-only": local_only, "centralised": centralised}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alignfl reference", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--experiment", default="", help="name in conf/experiments/ or a TOML file (default: pyproject)"
    )
    parser.add_argument("--method", nargs="+", default=list(METHODS), choices=METHODS)
    add_overrides_option(parser)
    parser.add_argument(
        "--out", default="", help="results folder (default: <results-dir>/<run-name or experiment>-<method>)"
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        cfg = load_experiment(args.experiment or None, parse_assignments(args.set))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    set_threads(args.threads)
    base = Path(args.out) if args.out else cfg.run.resolved_results_dir()
    stem = cfg.run.run_name or (Path(args.experiment).stem if args.experiment else cfg.data.dataset)
    key = HEADLINE_METRIC[cfg.server.global_model]
    for method in args.method:
        summary = RUNNERS[method](cfg, base / f"{stem}-{method}")
        print(f"[alignfl] {method}: global {key} {summary[f'final-global-{key}']:.4f} ({base / f'{stem}-{method}'})")
    return 0
