"""The global model the server learns from synthetic data, and how it is judged on real data.

Shared by the server (training, global test set) and the silos (evaluation on their local test set),
so both sides compute the same metrics the same way.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .config import IMAGE_SHAPE, RunConfig, load_architecture
from .models import VAE, Classifier
from .training import evaluate_classifier, train_classifier, train_vae, vae_test_loss

GLOBAL_VAE_ARCHITECTURE = "mlp"


class GlobalModel:
    """A classifier over all classes (default) or a conditional VAE over all classes (the paper's option)."""

    def __init__(self, kind: str, num_classes: int, seed: int = 0, conditional: bool = True) -> None:
        self.kind, self.num_classes = kind, num_classes
        torch.manual_seed(seed)
        if kind == "classifier":
            self.model: torch.nn.Module = Classifier(num_classes, IMAGE_SHAPE)
        elif kind == "vae":
            self.model = VAE(load_architecture(GLOBAL_VAE_ARCHITECTURE), num_classes if conditional else 0, IMAGE_SHAPE)
        else:
            raise ValueError(f"unknown global model '{kind}': use 'classifier' or 'vae'")
        self.optimizer: torch.optim.Optimizer | None = None  # created on first fit, kept across rounds

    @classmethod
    def from_config(cls, cfg: RunConfig) -> GlobalModel:
        return cls(cfg.global_model, cfg.num_classes, cfg.seed, cfg.conditional)

    def state(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy().copy() for k, v in self.model.state_dict().items()}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, strict=True)

    def fit(self, x: torch.Tensor, y: torch.Tensor, *, epochs: int, batch_size: int, lr: float, seed: int,
            proximal_mu: float = 0.0) -> float:
        """Train on (synthetic or a silo's real) data, warm-starting from the current weights and optimiser
        state; returns the mean training loss of the last epoch. ``proximal_mu``: FedProx's term."""
        if self.optimizer is None:
            self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.kind == "classifier":
            return train_classifier(self.model, x, y, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                                    optimizer=self.optimizer, proximal_mu=proximal_mu)
        labels = tuple(range(self.num_classes))
        return train_vae(self.model, x, y, labels, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                         optimizer=self.optimizer, proximal_mu=proximal_mu).loss

    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float | list[float]]:
        """Real-data metrics. Classifier: accuracy + per-class accuracy. VAE: negative ELBO."""
        if self.kind == "classifier":
            ev = evaluate_classifier(self.model, x, y, self.num_classes)
            return {"accuracy": ev.accuracy, "loss": ev.loss, "per-class-accuracy": ev.per_class_accuracy,
                    "num-examples": ev.num_examples}
        nelbo = vae_test_loss(self.model, x, y, tuple(range(self.num_classes)))
        return {"neg-elbo": nelbo, "loss": nelbo, "num-examples": len(x)}


def cosine_lr(base: float, step: int, total: int, floor: float = 0.01) -> float:
    """Learning rate annealed over the planned server epochs of the whole run (stable final model)."""
    frac = min(max(step / max(total, 1), 0.0), 1.0)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac)))
