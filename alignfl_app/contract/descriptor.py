"""The generator descriptor: what a silo's decoder is, sent beside its tensors, and nothing about its records."""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from alignfl_app.config import CLASS_NAME_PATTERN, MAX_LATENT_COMPONENTS, NAME_PATTERN, ArchitectureSpec, one_line
from alignfl_app.contract.replies import ReplyRejected
from alignfl_app.models.families import GeneratorFamily, family_of
from alignfl_app.models.features import FeatureSpec
from alignfl_app.models.vae import build_decoder

DESCRIPTOR_FORMAT = 2


class GeneratorDescriptor(BaseModel):
    """Everything the server needs to rebuild and use a silo's decoder, and nothing about the silo's records:
    every field is public configuration (under DP it travels beside the DP-trained decoder)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal[2] = DESCRIPTOR_FORMAT
    silo: str = Field(pattern=NAME_PATTERN)
    architecture: ArchitectureSpec
    layout: Literal["conditional", "per-class", "unconditional"]
    classes: tuple[Annotated[str, Field(pattern=CLASS_NAME_PATTERN)], ...] = Field(min_length=1, max_length=1000)
    """The class names the decoder generates, in the order of its label input."""
    image_shape: tuple[int, int, int]
    round: int = Field(ge=0)
    latent_components: int = Field(default=0, ge=0, le=MAX_LATENT_COMPONENTS)
    """Components per class of the mixture layer in front of the decoder (0: none): run configuration, while the
    layer's weights, fitted to the records, travel with the decoder's tensors."""
    features: FeatureSpec | None = None
    """The feature space a feature family's decoder draws in (None: a pixel family, which draws images)."""

    @model_validator(mode="after")
    def _sane(self) -> GeneratorDescriptor:
        if len(set(self.classes)) != len(self.classes):
            raise ValueError("classes must be distinct names")
        if self.latent_components == 1:
            raise ValueError("latent_components must be 0 (no mixture layer) or at least 2")
        if any(not 1 <= s <= 512 for s in self.image_shape):
            raise ValueError("image_shape sides must be in 1..512")
        if (self.features is not None) != (self.family.output == "features"):
            raise ValueError(
                f"a '{self.architecture.kind}' decoder draws {self.family.output}: features must be "
                f"{'the run feature space' if self.family.output == 'features' else 'absent'}"
            )
        if self.features is not None and self.features.is_pixels:
            raise ValueError("features must name a feature space other than pixels")
        return self

    @property
    def conditional(self) -> bool:
        """Every sample carries a class (a classifier can learn from it)."""
        return self.layout != "unconditional"

    @property
    def cond_dim(self) -> int:
        return len(self.classes) if self.conditional else 0

    @property
    def family(self) -> GeneratorFamily:
        return family_of(self.architecture.kind)

    @property
    def output_shape(self) -> tuple[int, ...]:
        """What one sample is: an image of ``image_shape``, or a point of the feature space of such images."""
        return self.image_shape if self.features is None else self.features.out_shape(self.image_shape)

    @property
    def latent_dim(self) -> int:
        """The size of the N(0, I) latent the server draws for one sample."""
        return self.architecture.latent_dim if self.family.output == "pixels" else math.prod(self.output_shape)

    def build_decoder(self) -> nn.Module:
        return build_decoder(
            self.architecture, self.layout, len(self.classes), self.output_shape, self.latent_components
        )

    def _sampling_values(self) -> tuple[int, int]:
        """Values a draw holds per sample and per pass; per class, the label's decoder draws each sample, and the
        layout holds the sample's gathered latent and its output beside it."""
        per_class = self.layout == "per-class"
        per_sample, per_pass = self.family.decoder.sampling_values(
            self.architecture, 0 if per_class else self.cond_dim, self.output_shape, self.latent_components
        )
        if per_class:
            per_sample += self.latent_dim + math.prod(self.output_shape)
        return per_sample, per_pass

    def sampling_bytes_per_sample(self) -> int:
        """Memory one sample's draw needs (float32 activations and kernel workspaces), from the descriptor alone."""
        return 4 * self._sampling_values()[0]

    def sampling_bytes_per_pass(self) -> int:
        """Memory one forward pass needs whatever its size (a kernel's copy of a weight), from the descriptor alone."""
        return 4 * self._sampling_values()[1]

    def sampling_flops_per_sample(self) -> int:
        """FLOPs of one sample's draw, from the descriptor alone (counted on the meta device): what a draw costs the
        server's compute. Per class, one class's decoder draws each sample."""
        return self.family.decoder.flops_per_sample(
            self.architecture,
            0 if self.layout == "per-class" else self.cond_dim,
            self.output_shape,
            self.latent_components,
        )

    def empty_decoder(self) -> nn.Module:
        """The decoder's shapes on the meta device: nothing allocated, nothing initialised."""
        with torch.device("meta"):
            return self.build_decoder()


def parse_descriptor(text: str) -> GeneratorDescriptor:
    try:
        return GeneratorDescriptor.model_validate_json(text)
    except ValidationError as exc:
        raise ReplyRejected(one_line(exc, "descriptor")) from exc
