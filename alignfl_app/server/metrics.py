"""Run outputs: ``results/<run-name>/summary.json``, sample grids, the accuracy plot, the final model.

The summary is rewritten after every round, so an interrupted run still leaves what it measured.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alignfl_app.config import headline_metric
from alignfl_app.files import atomic_write_text


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


class RunRecorder:
    """Collects per-round metrics and writes every artefact of a run into one folder."""

    def __init__(
        self, run_dir: Path, config: dict[str, Any], method: str = "alignfl", class_names: tuple[str, ...] = ()
    ) -> None:
        self.run_dir = Path(run_dir)
        self.class_names = tuple(class_names)
        (self.run_dir / "samples").mkdir(parents=True, exist_ok=True)
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

    def resume(self, completed_round: int) -> None:
        """Carry over the rounds an interrupted run completed (from its summary.json) into this one."""
        path = self.run_dir / "summary.json"
        previous = json.loads(path.read_text()) if path.exists() else {}
        self.summary["rounds"] = [r for r in previous.get("rounds", []) if r.get("round", 0) <= completed_round]
        self.summary["resumed-after-rounds"] = [*previous.get("resumed-after-rounds", []), completed_round]

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
            if "silo-mean-eval" in evaluated[-1]:
                self.summary[f"final-silo-mean-{key}"] = evaluated[-1]["silo-mean-eval"]
        path = self.run_dir / "summary.json"
        atomic_write_text(path, json.dumps(_jsonable(self.summary), indent=2))
        return path

    def finish(self, status: str = "completed") -> Path:
        self.summary["status"] = status
        path = self.write()
        self.plot_accuracy()
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
        path = self.run_dir / "accuracy.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

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
        path = self.run_dir / "samples" / f"round-{server_round:03d}.png"
        fig.savefig(path, dpi=90, bbox_inches="tight")
        plt.close(fig)
        return path

    def save_model(self, saved: dict[str, Any], kind: str) -> Path:
        """``saved``: ``GlobalModel.saved`` (weights, class names, input transform)."""
        path = self.run_dir / f"global_model_{kind}.pt"
        torch.save(saved, path)
        return path

    def record_evaluations(
        self, server_round: int, results: list[tuple[str, dict[str, Any]]]
    ) -> dict[str, float] | None:
        """Each silo's evaluation of the global model on its own real test set; the mean weighted by examples.

        Shared by every strategy, so ALIGN-FL and the baselines are judged and named the same way. A silo's weight
        is its example count capped at the lower median of the round's counts: one silo claiming a huge count
        cannot take over the mean."""
        total, weighted = 0, 0.0
        counts = [int(m.get("num-examples", 0)) for _, m in results]
        cap = statistics.median_low(counts) if counts else 0
        for silo, m in results:
            value, n = float(m.get(self.metric, float("nan"))), min(int(m.get("num-examples", 0)), cap)
            record = self.silo(server_round, silo)
            record.update({f"eval-{self.metric}": value, "eval-num-examples": n})
            if "per-class-accuracy" in m:
                record["eval-per-class-accuracy"] = list(m["per-class-accuracy"])
                if self.class_names:
                    record["eval-accuracy-by-class"] = {
                        name: v
                        for name, v in zip(self.class_names, m["per-class-accuracy"], strict=True)
                        if not math.isnan(v)
                    }
            total += n
            weighted += value * n
        if total == 0:
            return None
        self.round(server_round)["silo-mean-eval"] = weighted / total
        return {"silo-mean-eval": weighted / total, "num-examples": total}
