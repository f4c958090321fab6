"""The server's judgement of a generator that passed the contract checks, before it is stored.

- a copy: a generator that draws (nearly) the same samples as another silo's stored one from the same latents is
  refused (each silo shares its own);
- a replay: a decoder byte-identical to the silo's own stored one brings nothing new, so nothing is stored and the
  silo counts as stale this round;
- collapse: the samples of a class that barely vary (a blank or constant decoder, one that ignores its latent,
  one image copied over and over) are refused.

With labelled data on the server, its classes are checked too (``validation.py``: recognisable, and no harm to the
other silos' classes). Each verdict is one line in the log and summary.json. What these checks cannot see (without
labelled server data: a generator that draws the wrong class; in every case a backdoor trigger) is said in
docs/deployment.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from alignfl_app.config import RunConfig
from alignfl_app.contract.descriptor import GeneratorDescriptor
from alignfl_app.contract.replies import ReplyRejected
from alignfl_app.contract.sampling import SamplingStyle, sample_generator
from alignfl_app.server.store import GeneratorStore, GeneratorTerms
from alignfl_app.server.validation import LabelledSamples, LabelValidator, LabelVerdict

COPY_DISTANCE = 0.1
"""Relative distance between two trained generators' samples drawn from the same latents, under which one is a
copy of the other (independently trained decoders map a latent to unrelated images, about 1.4 apart; a copy with
noise added to its weights stays close as long as its samples look like the original's)."""
COPY_WEIGHT_DISTANCE = 1e-3
"""The same for closed-form generators (no encoder, e.g. a Gaussian per class), by relative L2 distance of the
weights: two honest silos with records of one distribution fit nearly the same Gaussians, whose draws from the
same latents are close, so only a near bit-for-bit copy is refused."""
JUDGE_SEED = 2_147_483_629  # the latents the judge draws (fixed: every generator gets the same ones)


def weight_distance(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> float | None:
    """``||a - b|| / ||b||`` over all tensors together; None when their tensor names or shapes differ."""
    if set(a) != set(b) or any(np.shape(a[k]) != np.shape(b[k]) for k in a):
        return None
    diff = sum(float(np.sum((a[k].astype(np.float64) - b[k].astype(np.float64)) ** 2)) for k in a)
    norm = sum(float(np.sum(b[k].astype(np.float64) ** 2)) for k in b)
    return float(np.sqrt(diff / max(norm, 1e-300)))


def identical(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> bool:
    return set(a) == set(b) and all(
        np.shape(a[k]) == np.shape(b[k]) and np.asarray(a[k]).tobytes() == np.asarray(b[k]).tobytes() for k in a
    )


def sample_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """RMS of ``a - b`` over the RMS spread of ``b`` around its mean (0: the same samples)."""
    spread = float((b - b.mean(0)).pow(2).mean().sqrt())
    return float((a - b).pow(2).mean().sqrt()) / max(spread, 1e-12)


@dataclass(frozen=True)
class JudgeSamples:
    """What a generator drew from the judge's latents: samples (flattened) and their local class index."""

    key: tuple
    """(latent_dim, cond_dim, number of classes, output shape): generators with the same key draw from the same
    latents and labels, so their samples can be compared one to one."""
    x: torch.Tensor
    local: torch.Tensor


@dataclass(frozen=True)
class Judgement:
    """What the judge found in an acceptable generator."""

    replay_of: int | None
    """The round of the silo's stored generator with exactly these weights (nothing new: not stored again)."""
    spread: dict[str, float]
    """Per class: the mean over output dimensions of the samples' standard deviation."""
    samples: JudgeSamples
    labels: LabelVerdict | None = None
    """The label check's figures (None: no labelled server data, an unconditional generator, or a replay)."""


Encoder = Callable[[torch.Tensor], torch.Tensor]


class GeneratorJudge:
    """Refuses copies, collapsed generators and (given ``labels``) unrecognisable or harmful ones (ReplyRejected,
    one line), and spots replays. Keeps the judge's samples of every stored generator, so a new one is compared
    without drawing the others again. ``encode``: a feature-space run's transform of pixel samples."""

    def __init__(
        self,
        terms: GeneratorTerms,
        style: SamplingStyle,
        samples_per_class: int,
        min_spread: float,
        labels: LabelValidator | None = None,
        encode: Encoder | None = None,
    ) -> None:
        self.terms, self.style = terms, style
        self.samples_per_class, self.min_spread = max(samples_per_class, 2), min_spread
        self.check_spread = samples_per_class > 0
        self.labels, self.encode = labels, encode
        self.seen: dict[str, JudgeSamples] = {}
        self.seen_labelled: dict[str, LabelledSamples] = {}

    @classmethod
    def from_config(
        cls, cfg: RunConfig, terms: GeneratorTerms, labels: LabelValidator | None = None, encode: Encoder | None = None
    ) -> GeneratorJudge:
        s = cfg.server
        return cls(terms, SamplingStyle.of(s), s.judge_samples_per_class, s.judge_min_spread, labels, encode)

    def judge(
        self,
        desc: GeneratorDescriptor,
        decoder: nn.Module,
        state: Mapping[str, np.ndarray],
        store: GeneratorStore,
    ) -> Judgement:
        replay_of = None
        if desc.silo in store and identical(state, store.state(desc.silo)):
            replay_of = int(store.entry(desc.silo)["stored_round"])
        samples = self.draw(desc, decoder)
        spread = self.refuse_collapse(desc, samples) if self.check_spread else {}
        if replay_of is not None:
            return Judgement(replay_of, spread, samples)
        self.refuse_copies(desc, state, samples, store)
        labels = None
        if self.labels is not None and desc.conditional:
            others = {s: self.labelled(store, s) for s in store.silos() if s != desc.silo}
            labels = self.labels.check(
                self.as_labelled(desc, samples),
                {s: v for s, v in others.items() if v is not None},
            )
        return Judgement(None, spread, samples, labels)

    def remember(self, silo: str, judgement: Judgement) -> None:
        """The generator was stored: its samples are what later ones are compared with."""
        self.seen[silo] = judgement.samples
        self.seen_labelled.pop(silo, None)

    def stored_samples(self, store: GeneratorStore, silo: str) -> JudgeSamples:
        """The judge's samples of a stored generator (drawn here once if it was stored before this server process
        started: a resumed run)."""
        if silo not in self.seen:
            self.seen[silo] = self.draw(*store.load_decoder(silo))
        return self.seen[silo]

    def labelled(self, store: GeneratorStore, silo: str) -> LabelledSamples | None:
        """A stored conditional generator's judge samples as the label check sees them (encoded once)."""
        desc = store.descriptor(silo)
        if not desc.conditional:
            return None
        if silo not in self.seen_labelled:
            self.seen_labelled[silo] = self.as_labelled(desc, self.stored_samples(store, silo))
        return self.seen_labelled[silo]

    def as_labelled(self, desc: GeneratorDescriptor, samples: JudgeSamples) -> LabelledSamples:
        """A conditional generator's judge samples in the run's input space, with class ids of the run."""
        x = samples.x
        if self.encode is not None and desc.family.output == "pixels":
            x = self.encode(x.reshape(len(x), *desc.output_shape)).detach().float().cpu().flatten(1)
        return LabelledSamples(x, self.terms.class_ids(desc).cpu()[samples.local])

    def draw(self, desc: GeneratorDescriptor, decoder: nn.Module) -> JudgeSamples:
        k = len(desc.classes)
        per_class = [self.samples_per_class] * k if desc.conditional else None
        x, y = sample_generator(
            desc,
            decoder,
            self.samples_per_class * (k if desc.conditional else 1),
            self.terms.class_ids(desc),
            self.style,
            seed=JUDGE_SEED,
            per_class=per_class,
            chunk=self.terms.sampling_chunk(desc),
        )
        ids = self.terms.class_ids(desc).tolist()
        local = torch.tensor([ids.index(int(v)) if v >= 0 else 0 for v in y.cpu().tolist()])
        key = (desc.latent_dim, desc.cond_dim, k, tuple(desc.output_shape))
        return JudgeSamples(key, x.detach().float().cpu().flatten(1), local)

    def refuse_collapse(self, desc: GeneratorDescriptor, samples: JudgeSamples) -> dict[str, float]:
        names = desc.classes if desc.conditional else ("all classes",)
        spread = {name: float(samples.x[samples.local == i].std(dim=0).mean()) for i, name in enumerate(names)}
        for name, value in spread.items():
            if not value >= self.min_spread:  # NaN included
                raise ReplyRejected(
                    f"its samples of class '{name}' are collapsed (spread {value:.4f} < judge-min-spread="
                    f"{self.min_spread}): a blank or constant decoder, or one image drawn over and over"
                )
        return spread

    def refuse_copies(
        self,
        desc: GeneratorDescriptor,
        state: Mapping[str, np.ndarray],
        samples: JudgeSamples,
        store: GeneratorStore,
    ) -> None:
        for other in store.silos():
            if other == desc.silo:
                continue
            if desc.family.encoder is None:
                if store.descriptor(other).architecture != desc.architecture:
                    continue
                distance = weight_distance(state, store.state(other))
                if distance is not None and distance < COPY_WEIGHT_DISTANCE:
                    raise ReplyRejected(
                        f"its generator is a copy of silo '{other}''s stored one (relative weight distance "
                        f"{distance:.1e}): each silo must share a generator of its own records"
                    )
                continue
            theirs = self.stored_samples(store, other)
            if theirs.key != samples.key:
                continue
            distance = sample_distance(samples.x, theirs.x)
            if distance < COPY_DISTANCE:
                raise ReplyRejected(
                    f"its generator is a copy of silo '{other}''s stored one (its samples from the same latents are "
                    f"{distance:.3f} apart, under {COPY_DISTANCE}): each silo must share a generator of its own records"
                )
