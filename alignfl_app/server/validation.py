"""Label validation: the server checks a new generator against its own labelled images before learning from it.

Where the server holds labelled data (``server-validation-dir``; for a built-in dataset a seeded share of its
training split, never the test split results are scored on), two linear probes (ridge regression to one-hot labels,
solved in closed form: no seed, no schedule, milliseconds) judge every new generator:

- recognisable: a probe fitted once to the server's images must recognise each class the generator draws in its
  samples of it at least ``judge-min-recognition`` times as often as chance (1 / the number of classes the server
  has images of): a silo that swaps its labels, or draws another class under its own name, is refused. The check
  depends on this generator alone, not on which silos replied before it;
- leave-one-out: a probe fitted to the judge's samples of the other stored generators, with and without the new
  one, scored on the server's images: a generator that lowers its accuracy on one of the other silos' classes by
  more than ``judge-max-harm`` draws that class under its own labels; it is harmful, and its silo is quarantined
  (an honest new class lowers its look-alikes a little, a shirt the T-shirts: by 0.26 at most in our measurements).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from alignfl_app.config import RunConfig
from alignfl_app.contract.replies import ReplyRejected
from alignfl_app.data.datasets import server_validation_set

RIDGE = 1.0
"""Ridge strength relative to the mean squared norm of a (centred) sample: stable at a few dozen samples per class
in thousands of dimensions."""


@dataclass(frozen=True)
class LabelledSamples:
    """Samples in the run's input space, one row each, and their class ids in the run's label space."""

    x: torch.Tensor
    y: torch.Tensor

    @staticmethod
    def join(parts: list[LabelledSamples]) -> LabelledSamples:
        return LabelledSamples(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]))


class HarmfulGenerator(ReplyRejected):
    """A generator whose samples pull the other silos' classes down: its silo is quarantined, not just refused."""


class RidgeProbe:
    """A linear classifier over the classes present in its samples, fitted in closed form."""

    def __init__(self, samples: LabelledSamples) -> None:
        x, y = samples.x.double(), samples.y
        self.classes = torch.unique(y)
        targets = (y[:, None] == self.classes[None, :]).double()
        self.mean = x.mean(0)
        xc = x - self.mean
        n, d = xc.shape
        lam = RIDGE * float(xc.pow(2).sum()) / max(n, 1)
        if n <= d:  # the dual form: an n x n system
            alpha = torch.linalg.solve(xc @ xc.T + lam * torch.eye(n, dtype=xc.dtype), targets - targets.mean(0))
            self.weights = xc.T @ alpha
        else:
            self.weights = torch.linalg.solve(xc.T @ xc + lam * torch.eye(d, dtype=xc.dtype), xc.T @ targets)
        self.bias = targets.mean(0)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """One column per class of ``classes``: how much each row looks like that class."""
        return (x.double() - self.mean) @ self.weights + self.bias

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.classes[self.scores(x).argmax(1)]


def per_class_accuracy(probe: RidgeProbe, x: torch.Tensor, y: torch.Tensor, classes: list[int]) -> dict[int, float]:
    predicted = probe.predict(x)
    return {c: float((predicted[y == c] == c).double().mean()) for c in classes if bool((y == c).any())}


@dataclass(frozen=True)
class LabelVerdict:
    """What the label check measured for an accepted generator."""

    recognised: dict[int, float]
    """Per class the generator draws that the server has images of: the share of its samples of it that the probe
    of the server's images assigns to it."""
    harm: float | None
    """The largest drop of the probe's accuracy on one of the other silos' classes when the generator joins (None:
    no other silo's class to judge it by)."""

    def record(self) -> dict[str, float]:
        """The figures summary.json keeps per silo and round."""
        figures = {"label-recognised-min": min(self.recognised.values())} if self.recognised else {}
        return figures | ({"label-harm": self.harm} if self.harm is not None else {})


class LabelValidator:
    """Judges generators' samples against the server's labelled images (``x`` already in the run's input space)."""

    def __init__(
        self, x: torch.Tensor, y: torch.Tensor, class_names: tuple[str, ...], min_recognition: float, max_harm: float
    ) -> None:
        self.x, self.y = x.flatten(1).double(), y
        self.class_names, self.max_harm = class_names, max_harm
        self.real = RidgeProbe(LabelledSamples(self.x, y))
        self.floor = min_recognition / len(self.real.classes)  # in units of chance among the server's classes
        self.min_recognition = min_recognition

    def check(self, candidate: LabelledSamples, others: Mapping[str, LabelledSamples]) -> LabelVerdict:
        """Refuse (ReplyRejected) a generator whose classes the server does not recognise; HarmfulGenerator for one
        that pulls the other silos' classes down."""
        predicted = self.real.predict(candidate.x)
        known = set(self.real.classes.tolist())  # a class the server has no images of cannot be recognised
        recognised = {
            c: float((predicted[candidate.y == c] == c).double().mean())
            for c in sorted(set(candidate.y.tolist()) & known)
        }
        for c, share in recognised.items():
            if share < self.floor:
                raise ReplyRejected(
                    f"its samples of class '{self.class_names[c]}' are recognised as that class in only {share:.0%} "
                    f"of cases by the server's own labelled images (judge-min-recognition={self.min_recognition:g} "
                    f"x chance: {self.floor:.0%}): it draws another class, or none, under that label"
                )
        if not others:
            return LabelVerdict(recognised, None)
        rest = LabelledSamples.join(list(others.values()))
        judged = sorted(set(rest.y.tolist()))
        before = per_class_accuracy(RidgeProbe(rest), self.x, self.y, judged)
        after = per_class_accuracy(RidgeProbe(LabelledSamples.join([rest, candidate])), self.x, self.y, judged)
        if not before:
            return LabelVerdict(recognised, None)
        worst = max(before, key=lambda c: before[c] - after[c])
        harm = before[worst] - after[worst]
        if harm > self.max_harm:
            raise HarmfulGenerator(
                f"its samples lower the server's recognition of another silo's class '{self.class_names[worst]}' "
                f"from {before[worst]:.0%} to {after[worst]:.0%} (judge-max-harm={self.max_harm:g}): it draws that "
                "class under its own labels"
            )
        return LabelVerdict(recognised, harm)


def label_validator(
    cfg: RunConfig, encode: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[LabelValidator | None, str]:
    """The run's label check on the server's labelled images (``server_validation_set``, put through ``encode``
    into the global model's input space), and in words what it uses; None without labelled server images."""
    labelled = server_validation_set(cfg)
    if labelled is None:
        return None, (
            "none: generators' classes are not checked (give the server labelled images: server-validation-dir "
            "for a folder dataset, server-validation-per-class > 0 for a built-in one)"
        )
    x, y = labelled
    s = cfg.server
    validator = LabelValidator(
        encode(x).detach().float().cpu(), y, cfg.data.class_names, s.judge_min_recognition, s.judge_max_harm
    )
    return validator, f"{len(y)} labelled server images, classes {sorted(set(y.tolist()))}"
