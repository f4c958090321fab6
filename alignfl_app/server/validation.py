"""Label validation: the server checks a new generator against its own labelled images before learning from it.

Where the server holds labelled data (``server-validation-dir``; for a built-in dataset a seeded share of its
training split, never the test split results are scored on), two linear probes (ridge regression to one-hot labels,
solved in closed form: no seed, no schedule, milliseconds) judge every new generator:

- recognisable: a probe fitted once to the server's images must recognise each class the generator draws in its
  samples of it at least ``judge-min-recognition`` times as often as chance (1 / the number of classes the server
  has images of): a silo that swaps its labels, or draws another class under its own name, is refused. The check
  depends on this generator alone, not on which silos replied before it;
- leave-one-out: a probe fitted to the judge's samples of the other stored generators plus the new one's, scored
  on the server's images of the other silos' classes, against the same probe with the server's own images of the
  new generator's classes in place of its samples: a new class lowers its look-alikes anyway (a coat the
  pullovers), so only a drop beyond that, of more than ``judge-max-harm`` on one class, is harm: the generator
  draws that class under its own labels, and its silo is quarantined.
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
    """The largest drop of the probe's accuracy on one of the other silos' classes when the generator's samples
    stand in for the server's images of its classes (None: nothing to judge it by)."""

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
        judged = sorted(set(rest.y.tolist()) - set(recognised))
        stand_in = self.real_images_like(candidate)
        if not judged or stand_in is None:
            return LabelVerdict(recognised, None)
        # the other classes' accuracy with the server's own images of the new classes in place of the samples: a
        # new class lowers its look-alikes anyway (a coat the pullovers), only what the samples take beyond counts
        honest = per_class_accuracy(RidgeProbe(LabelledSamples.join([rest, stand_in])), self.x, self.y, judged)
        after = per_class_accuracy(RidgeProbe(LabelledSamples.join([rest, candidate])), self.x, self.y, judged)
        worst = max(honest, key=lambda c: honest[c] - after[c])
        harm = honest[worst] - after[worst]
        if harm > self.max_harm:
            raise HarmfulGenerator(
                f"its samples lower the server's recognition of another silo's class '{self.class_names[worst]}' "
                f"to {after[worst]:.0%}, where its classes drawn as the server's own images leave {honest[worst]:.0%} "
                f"(judge-max-harm={self.max_harm:g}): it draws that class under its own labels"
            )
        return LabelVerdict(recognised, harm)

    def real_images_like(self, candidate: LabelledSamples) -> LabelledSamples | None:
        """As many of the server's images of each of the candidate's classes as it drew samples of (None: the server
        has no images of some of them, so the candidate cannot be compared with its classes drawn well)."""
        parts = []
        for c in sorted(set(candidate.y.tolist())):
            mine = self.x[self.y == c][: int((candidate.y == c).sum())]
            if not len(mine):
                return None
            parts.append(LabelledSamples(mine, torch.full((len(mine),), c, dtype=candidate.y.dtype)))
        return LabelledSamples.join(parts)


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
