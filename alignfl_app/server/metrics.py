"""Run outputs: ``results/<run-name>/summary.json``, sample grids, the accuracy plot, the final model.

The summary is rewritten after every round, so an interrupted run still leaves what it measured.
"""

from __future__ import annotations

import io
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alignfl_app.config import headline_metric
from alignfl_app.files import atomic_write_bytes, real_folder, refuse_link
from alignfl_app.server.tracking import make_tracker


def feature_map(features: torch.Tensor) -> Any:
    """A feature vector laid out as a near-square grid (zero-padded), for the sample grid."""
    side = math.ceil(math.sqrt(features.numel()))
    padded = torch.zeros(side * side)
    padded[: features.numel()] = features.flatten().float()
    return padded.view(side, side).numpy()


def _jsonable(v: Any) -> Any:
    if isinstance(v, float):
        return None if math.isnan(v) or math.isinf(v) else v
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.floating, np.integer)):
        return _jsonable(v.item())
    return v


METRIC_RANGE = {"accuracy": (0.0, 1.0), "neg-elbo": (0.0, math.inf)}
"""The values a silo's evaluation can take (a negative ELBO is a sum of a cross-entropy and a KL divergence)."""
TRIM_SHARE = 0.2  # silo-mean-eval leaves out this share of the most extreme silos on each side ...
TRIM_FROM = 5  # ... once at least this many silos are counted (with fewer, trimming would leave too few)


def _number(v: Any) -> float | None:
    """``v`` as a finite float, else None (a list, a string, NaN, inf)."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _rates(values: Any, classes: int) -> bool:
    """A per-class accuracy list this run can record: one rate (or NaN, class absent) per class."""
    return (
        isinstance(values, list)
        and (not classes or len(values) == classes)
        and all((isinstance(a, float) and math.isnan(a)) or (_number(a) is not None and 0 <= a <= 1) for a in values)
    )


class RunRecorder:
    """Collects per-round metrics and writes every artefact of a run into one folder.

    The results folder, the run's folder and its samples/ must be real folders (a symbolic link would have every
    artefact land where it points), and every file is written atomically, so a full disk or a killed server leaves
    the previous file whole."""

    def __init__(
        self, run_dir: Path, config: dict[str, Any], method: str = "alignfl", class_names: tuple[str, ...] = ()
    ) -> None:
        self.run_dir = Path(run_dir)
        self.class_names = tuple(class_names)
        refuse_link(self.run_dir.parent)  # results-dir
        real_folder(self.run_dir)
        real_folder(self.run_dir / "samples")
        self.started = time.time()
        self.summary: dict[str, Any] = {
            "method": method,
            "config": dict(config),
            "status": "running",
            "rounds": [],
        }
        if class_names:
            self.summary["class-names"] = list(class_names)  # per-class lists follow this order
        self.metric = headline_metric(config)
        self.tracker = make_tracker(config.get("tracking", "none"), self.run_dir, self.summary["config"], class_names)

    def resume(self, completed_round: int) -> None:
        """Carry over the rounds an interrupted run completed (from its summary.json) into this one."""
        path = self.run_dir / "summary.json"
        previous = json.loads(path.read_text()) if path.exists() else {}
        self.summary["rounds"] = [r for r in previous.get("rounds", []) if r.get("round", 0) <= completed_round]
        self.summary["resumed-after-rounds"] = [*previous.get("resumed-after-rounds", []), completed_round]
        self.tracker.resume(completed_round)

    def set_evaluation(self, by: str, detail: str) -> None:
        """Record what judges the global model: ``global-test-set``, ``global-test-dir``, ``silos`` or ``none``."""
        self.summary["evaluation"] = {"by": by, "detail": detail}

    def round(self, server_round: int) -> dict[str, Any]:
        """The (mutable) record of ``server_round``, created on first use."""
        for r in self.summary["rounds"]:
            if r["round"] == server_round:
                return r
        r = {"round": server_round, "silos": {}}
        self.summary["rounds"].append(r)
        self.summary["rounds"].sort(key=lambda x: x["round"])
        return r

    def silo(self, server_round: int, silo: str) -> dict[str, Any]:
        return self.round(server_round)["silos"].setdefault(silo, {})

    def write(self) -> Path:
        self.summary["elapsed-seconds"] = time.time() - self.started
        key = self.metric
        rounds = [r for r in self.summary["rounds"] if r.get("global", {}).get(key) is not None]
        if rounds:
            last = rounds[-1]
            self.summary[f"final-global-{key}"] = last["global"][key]
            if key == "accuracy":
                self.summary["final-per-class-accuracy"] = last["global"].get("per-class-accuracy")
                self.summary["final-global-balanced-accuracy"] = last["global"].get("balanced-accuracy")
        evaluated = [r for r in self.summary["rounds"] if any(f"eval-{key}" in m for m in r["silos"].values())]
        if evaluated:
            self.summary[f"final-per-silo-{key}"] = {
                s: m[f"eval-{key}"] for s, m in evaluated[-1]["silos"].items() if f"eval-{key}" in m
            }
            for figure in ("mean", "median"):
                if f"silo-{figure}-eval" in evaluated[-1]:
                    self.summary[f"final-silo-{figure}-{key}"] = evaluated[-1][f"silo-{figure}-eval"]
        path = self._save("summary.json", json.dumps(_jsonable(self.summary), indent=2).encode())
        self.tracker.rounds(self.summary["rounds"])  # after summary.json: tracking shows what the run recorded
        return path

    def _save(self, name: str, data: bytes) -> Path:
        """Write ``data`` to ``name`` inside the run's folder, atomically and never through a linked folder."""
        path = self.run_dir / name
        refuse_link(path.parent)
        atomic_write_bytes(path, data)
        return path

    def _save_figure(self, fig: Any, name: str, **kwargs: Any) -> Path:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", **kwargs)
        return self._save(name, buffer.getvalue())

    def finish(self, status: str = "completed") -> Path:
        self.summary["status"] = status
        try:
            path = self.write()
            self.plot_accuracy()
        finally:
            self.tracker.close()
        return path

    def plot_accuracy(self) -> Path | None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        key = self.metric
        rounds = [
            r
            for r in self.summary["rounds"]
            if r.get("global", {}).get(key) is not None or any(f"eval-{key}" in m for m in r["silos"].values())
        ]
        if not rounds:
            return None
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [r["round"] for r in rounds]
        judged = [r for r in rounds if r.get("global", {}).get(key) is not None]
        if judged:
            ax.plot(
                [r["round"] for r in judged], [r["global"][key] for r in judged], "o-", label="global test set", lw=2
            )
        silos = sorted({s for r in rounds for s in r["silos"] if f"eval-{key}" in r["silos"][s]})
        for s in silos:
            pts = [(r["round"], r["silos"][s][f"eval-{key}"]) for r in rounds if f"eval-{key}" in r["silos"].get(s, {})]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "--", alpha=0.6, label=f"{s} local test")
        ax.set_xticks(xs)
        ax.set_xlabel("round")
        ax.set_ylabel(key if key == "accuracy" else f"{key} (lower is better)")
        if key == "accuracy":
            ax.set_ylim(0, 1)
        by = self.summary.get("evaluation", {}).get("by", "global-test-set")
        ax.set_title(f"{self.summary['method']}: global model on real test data ({by})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        try:
            return self._save_figure(fig, "accuracy.png", dpi=110)
        finally:
            plt.close(fig)

    def save_sample_grid(self, server_round: int, samples: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Path:
        """One row per silo: what its shared generator produces this round (label above each image)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = max(len(samples), 1)
        cols = max((len(x) for x, _ in samples.values()), default=1)
        fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.8 + 1.2, rows * 0.9 + 0.4), squeeze=False)
        for i, (silo, (x, y)) in enumerate(sorted(samples.items())):
            for j in range(cols):
                ax = axes[i][j]
                ax.axis("off")
                if j < len(x):
                    if x.dim() == 2:  # a feature family's sample: its features as a heat map
                        ax.imshow(feature_map(x[j]), cmap="viridis")
                    elif x.shape[1] == 3:
                        ax.imshow(x[j].permute(1, 2, 0).clamp(0, 1).numpy())
                    else:
                        ax.imshow(x[j, 0].numpy(), cmap="gray", vmin=0, vmax=1)
                    label = int(y[j])
                    ax.set_title(
                        self.class_names[label] if 0 <= label < len(self.class_names) else str(label), fontsize=7, pad=1
                    )
            axes[i][0].text(-0.3, 0.5, silo, transform=axes[i][0].transAxes, ha="right", va="center", fontsize=8)
        fig.suptitle(f"synthetic samples per silo, round {server_round}", fontsize=9)
        try:
            path = self._save_figure(fig, f"samples/round-{server_round:03d}.png", dpi=90, bbox_inches="tight")
        finally:
            plt.close(fig)
        self.tracker.image(server_round, path.read_bytes())
        return path

    def save_model(self, saved: dict[str, Any], kind: str) -> Path:
        """``saved``: ``GlobalModel.saved`` (weights, class names, input transform)."""
        buffer = io.BytesIO()
        torch.save(saved, buffer)
        return self._save(f"global_model_{kind}.pt", buffer.getvalue())

    def record_evaluations(
        self, server_round: int, results: list[tuple[str, dict[str, Any]]]
    ) -> dict[str, float] | None:
        """Each silo's evaluation of the global model on its own real test set, and two figures over the silos.

        Shared by every strategy, so ALIGN-FL and the baselines are judged and named the same way. Each figure is a
        silo's own claim, so the figures are built to hold against a colluding minority of silos:

        - a value outside the metric's range (``METRIC_RANGE``: accuracy in [0, 1]) or not finite is left out (the
          silo's record says why), so no value can drag a figure arbitrarily far;
        - a silo's weight is its example count capped at the lower median of the counted silos' counts, so no
          silo weighs more than the median silo;
        - ``silo-mean-eval``: that weighted mean without the ``TRIM_SHARE`` most extreme silos on each side (at
          least one each, from ``TRIM_FROM`` silos on). Up to that many liars are trimmed away: the mean stays
          within the honest silos' range; more liars move it by at most their share of the kept weight times
          the metric's range (accuracy: 1; a negative ELBO has no upper end, so only the median holds there);
        - ``silo-median-eval``: the median over silos, one vote each. Any minority (fewer than half of the
          counted silos) cannot move it outside the honest silos' range, whatever values and counts it sends.

        Neither figure checks that a silo's test set or its honest-looking value is real; a majority decides both.
        """
        lo, hi = METRIC_RANGE.get(self.metric, (-math.inf, math.inf))
        counted: list[tuple[str, float, int]] = []
        for silo, m in results:
            record = self.silo(server_round, silo)
            value, n = _number(m.get(self.metric)), max(int(_number(m.get("num-examples")) or 0), 0)
            if value is None or not lo <= value <= hi:
                claimed = repr(m.get(self.metric))[:40]
                record["eval-left-out"] = f"{self.metric} {claimed} is not a finite value in [{lo}, {hi}]"
                continue
            record.update({f"eval-{self.metric}": value, "eval-num-examples": n})
            per_class = m.get("per-class-accuracy")
            if _rates(per_class, len(self.class_names)):
                record["eval-per-class-accuracy"] = list(per_class)
                if self.class_names:
                    record["eval-accuracy-by-class"] = {
                        name: v for name, v in zip(self.class_names, per_class, strict=True) if not math.isnan(v)
                    }
            if n > 0:
                counted.append((silo, value, n))
        if not counted:
            return None
        cap = statistics.median_low(n for _, _, n in counted)
        ordered = sorted(counted, key=lambda c: (c[1], c[0]))
        trim = max(1, int(len(ordered) * TRIM_SHARE)) if len(ordered) >= TRIM_FROM else 0
        kept = ordered[trim : len(ordered) - trim]
        total = sum(min(n, cap) for _, _, n in kept)
        mean = sum(v * min(n, cap) for _, v, n in kept) / total
        median = statistics.median(v for _, v, _ in counted)
        rnd = self.round(server_round)
        rnd.update({"silo-mean-eval": mean, "silo-median-eval": median})
        if trim:
            rnd["silo-eval-trimmed"] = sorted(s for s, _, _ in ordered[:trim] + ordered[len(ordered) - trim :])
        return {"silo-mean-eval": mean, "silo-median-eval": median, "num-examples": total}
