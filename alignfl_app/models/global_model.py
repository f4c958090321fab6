"""The global model the server learns from synthetic data, and how it is judged on real data.

Shared by the server (training, global test set), the baselines' silos (training on real data) and every
silo's evaluation, so all sides train through the same loop and compute the same metrics the same way.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from alignfl_app.config import IMAGE_SHAPE, RunConfig, load_architecture
from alignfl_app.data.folders import describe_transform
from alignfl_app.devices import on_cpu
from alignfl_app.models.features import FeatureSpace, FeatureSpec
from alignfl_app.models.vae import VAE, Classifier, FeatureClassifier
from alignfl_app.training import (
    CrossEntropy,
    NegativeELBO,
    Objective,
    StepHook,
    Trainer,
    TrainReport,
    evaluate_classifier,
    vae_test_loss,
)

GLOBAL_VAE_ARCHITECTURE = "mlp"
StateDict = dict[str, torch.Tensor]


class GlobalModel:
    """A classifier over all classes (default) or a conditional VAE over all classes (the paper's option).

    The classifier reads the run's feature space (``features``): images (a small CNN) or a fixed transform of them
    (an MLP on the features). ``fit`` takes inputs of that space; ``encode`` turns images into it, and ``evaluate``
    judges on images."""

    def __init__(
        self,
        kind: str,
        num_classes: int,
        seed: int = 0,
        conditional: bool = True,
        device: torch.device = torch.device("cpu"),
        image_shape: tuple[int, int, int] = IMAGE_SHAPE,
        features: FeatureSpec = FeatureSpec(),
    ) -> None:
        self.kind, self.num_classes, self.device = kind, num_classes, device
        self.image_shape = tuple(image_shape)
        self.features = FeatureSpace(features, self.image_shape).to(device)  # fixed: never part of the weights
        torch.manual_seed(seed)
        self.objective: Objective
        if kind == "classifier" and not features.is_pixels:
            self.model: torch.nn.Module = FeatureClassifier(math.prod(self.features.out_shape), num_classes)
            self.objective = CrossEntropy()
        elif kind == "classifier":
            self.model = Classifier(num_classes, self.image_shape)
            self.objective = CrossEntropy()
        elif kind == "vae":
            self.model = VAE(
                load_architecture(GLOBAL_VAE_ARCHITECTURE), num_classes if conditional else 0, self.image_shape
            )
            self.objective = NegativeELBO()
        else:
            raise ValueError(f"unknown global model '{kind}': use 'classifier' or 'vae'")
        # channels-last convolutions: the classifier trains about 1.3x faster on the CPU (measured), same weights
        images_in = kind == "classifier" and features.is_pixels
        self.memory_format = torch.channels_last if images_in else torch.contiguous_format
        self.model.to(device, memory_format=self.memory_format)  # built on the CPU first: the same initial weights
        self.optimizer: torch.optim.Optimizer | None = None

    @classmethod
    def from_config(cls, cfg: RunConfig, device: torch.device = torch.device("cpu")) -> GlobalModel:
        return cls(
            cfg.server.global_model,
            cfg.data.num_classes,
            cfg.run.seed,
            cfg.local.conditional,
            device,
            cfg.data.image_shape,
            cfg.features.spec,
        )

    def saved(self, class_names: Sequence[str]) -> dict:
        """The model as ``global_model_<kind>.pt`` holds it: weights, class names and input transform, enough to
        use it without the run config (``load_saved_model``)."""
        return {
            "kind": self.kind,
            "class-names": list(class_names),
            "image-shape": list(self.image_shape),
            "conditional": self.kind == "classifier" or bool(self.model.decoder.cond_dim),
            "input": describe_transform(self.image_shape),
            "features": self.features.spec.model_dump(),
            "state-dict": self.state(),
        }

    def state(self) -> StateDict:
        """The weights as CPU tensors (what is sent, checkpointed and saved)."""
        return on_cpu(self.model.state_dict())

    def load_state(self, state: StateDict) -> None:
        self.model.load_state_dict(state, strict=True)

    def snapshot(self) -> dict[str, Any]:
        """Copies of the weights and the optimiser state: what a rolled-back round returns to."""
        return {
            "model": copy.deepcopy(self.model.state_dict()),
            "optimizer": None if self.optimizer is None else copy.deepcopy(self.optimizer.state_dict()),
        }

    def restore(self, snapshot: dict[str, Any]) -> None:
        self.model.load_state_dict(snapshot["model"])
        if snapshot["optimizer"] is None:
            self.optimizer = None
        elif self.optimizer is not None:
            self.optimizer.load_state_dict(snapshot["optimizer"])

    def finite(self) -> bool:
        """Every weight is finite (a step that made one NaN or Inf must not be kept)."""
        return all(bool(torch.isfinite(t).all()) for t in self.model.state_dict().values() if t.is_floating_point())

    def optimizer_for(self, lr: float) -> torch.optim.Optimizer:
        """The model's Adam optimiser, made on first use and kept (its state carries across rounds)."""
        if self.optimizer is None:
            self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr)
        return self.optimizer

    def _targets(self, y: torch.Tensor) -> torch.Tensor:
        """Class ids for the classifier and the conditional VAE; zeros for an unconditional VAE (labels -1)."""
        if self.kind == "vae" and not self.model.decoder.cond_dim:
            return torch.zeros(len(y), dtype=torch.long, device=y.device)
        return y

    def fit(
        self,
        data: tuple[torch.Tensor, torch.Tensor],
        batches: Iterable[torch.Tensor],
        lr: float,
        hooks: Sequence[StepHook] = (),
        objective: Objective | None = None,
    ) -> TrainReport:
        """Train on (synthetic or a silo's real) data, warm-starting from the current weights and optimiser
        state. ``lr`` is used when the optimiser is made; a schedule may change it in between. ``objective``:
        instead of the model's own (the server's label-smoothed cross-entropy)."""
        x = data[0].to(self.device, memory_format=self.memory_format)  # once per call: batches are cut on the device
        y = data[1].to(self.device)
        return Trainer(objective or self.objective, hooks=hooks).fit(
            self.model, (x, self._targets(y)), batches, self.optimizer_for(lr)
        )

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in the model's input space (pixels: the same tensor)."""
        return self.features(images.to(self.device))

    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float | list[float]]:
        """Real-data metrics on images. Classifier: accuracy, balanced (mean per-class) and per-class accuracy.
        VAE: negative ELBO."""
        return self.evaluate_inputs(self.encode(x), y)

    def evaluate_inputs(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float | list[float]]:
        """``evaluate`` on inputs of the model's own space (``encode``d images)."""
        x, y = x.to(self.device), y.to(self.device)
        if self.kind == "classifier":
            ev = evaluate_classifier(self.model, x, y, self.num_classes)
            present = [a for a in ev.per_class_accuracy if not math.isnan(a)]
            return {
                "accuracy": ev.accuracy,
                "balanced-accuracy": sum(present) / len(present) if present else float("nan"),
                "loss": ev.loss,
                "per-class-accuracy": ev.per_class_accuracy,
                "num-examples": ev.num_examples,
            }
        nelbo = vae_test_loss(self.model, x, self._targets(y))
        return {"neg-elbo": nelbo, "loss": nelbo, "num-examples": len(x)}


def load_saved_model(path: Path) -> tuple[GlobalModel, dict]:
    """A saved global model (``GlobalModel.saved``) and what was saved with it (class names, input transform)."""
    saved = torch.load(path, weights_only=True)
    model = GlobalModel(
        saved["kind"],
        len(saved["class-names"]),
        conditional=saved["conditional"],
        image_shape=tuple(saved["image-shape"]),
        features=FeatureSpec.model_validate(saved.get("features", {})),
    )
    model.load_state(saved["state-dict"])
    return model, saved
