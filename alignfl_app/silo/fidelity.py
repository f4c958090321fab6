"""Label fidelity: does a silo's released decoder draw what its label asks for?

A judge classifier learns the silo's own classes from the silo's own records; the share of decoder samples it
assigns to the label they were drawn for is the fidelity (1: every sample looks like its class to the silo; a
decoder that mixes its classes up scores towards 1 / number of classes). It needs the records, so it runs on
the silo and is released only where figures of the records may leave (never under DP).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from alignfl_app.contract.descriptor import GeneratorDescriptor
from alignfl_app.contract.sampling import SamplingStyle, sample_generator
from alignfl_app.models.vae import Classifier
from alignfl_app.training import CrossEntropy, ShuffledBatches, Trainer, evaluate_classifier


@dataclass(frozen=True)
class LabelFidelity:
    """How the fidelity is measured: ``num_samples`` decoder samples, a judge trained ``epochs`` on the records."""

    num_samples: int
    epochs: int = 1
    batch_size: int = 128
    learning_rate: float = 1e-3

    def measure(
        self,
        desc: GeneratorDescriptor,
        decoder: nn.Module,
        records: tuple[torch.Tensor, torch.Tensor],
        style: SamplingStyle,
        seed: int,
    ) -> float | None:
        """Fidelity of ``decoder`` (drawn as the server draws it, ``style``) judged on ``records`` = (images,
        index of each image's class in the descriptor); None where there is nothing to tell apart (one class,
        or an unconditional decoder)."""
        k = len(desc.classes)
        if k < 2 or not desc.conditional:
            return None
        x, y = records
        torch.manual_seed(seed)
        judge = Classifier(k, desc.image_shape).to(x.device)
        order = ShuffledBatches(self.batch_size, self.epochs)(len(x), torch.Generator().manual_seed(seed))
        Trainer(CrossEntropy()).fit(judge, records, order, torch.optim.Adam(judge.parameters(), lr=self.learning_rate))
        samples, labels = sample_generator(desc, decoder, self.num_samples, torch.arange(k), style, seed=seed)
        return evaluate_classifier(judge, samples.to(x.device), labels.to(x.device), k).accuracy
