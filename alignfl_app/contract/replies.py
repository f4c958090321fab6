"""What a reply may hold: one schema per kind of reply, built by the silo and enforced by the server.

Every metric a silo may send is named here with its type and range. The silo builds its reply metrics through
these models (it cannot send a key they do not list); the server validates every reply against the same model
and rejects one with an unknown key, a wrong type, a non-finite value or an impossible count, in one line.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from alignfl_app.config import one_line

MAX_COUNT = 10**9  # more records than any silo holds: a larger count would only skew weighted means
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Rate = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]


class ReplyRejected(ValueError):
    """A client reply that must not enter the store or the records; the message says why in one line."""


def _dashed(name: str) -> str:
    return name.replace("_", "-")


class ReplyMetrics(BaseModel):
    """Metrics of one reply; dashed keys as they travel in a MetricRecord."""

    model_config = ConfigDict(extra="forbid", alias_generator=_dashed, populate_by_name=True, frozen=True)

    def record(self) -> dict[str, Any]:
        """The keys and values to send (absent optional figures are left out)."""
        return self.model_dump(by_alias=True, exclude_none=True)

    @classmethod
    def received(cls, raw: dict[str, Any]):
        """Validate what a reply carries; ReplyRejected names the first offending key."""
        try:
            return cls.model_validate(dict(raw))
        except ValidationError as exc:
            raise ReplyRejected(one_line(exc, "metrics")) from exc


class GeneratorTrainMetrics(ReplyMetrics):
    """A silo's train reply without DP: sizes, costs, losses, the decoder's Lipschitz figures, audit figures."""

    num_examples: Count
    num_outliers: Count
    train_seconds: NonNegative
    samples_per_second: NonNegative
    decoder_bytes: Count
    vae_bytes: Count
    peak_rss_mb: NonNegative
    lipschitz_upper_bound: Annotated[float, Field(ge=0)]  # a product of layer norms may overflow to inf
    lipschitz_empirical: NonNegative
    lipschitz_penalty: NonNegative | None = None
    train_loss: Finite | None = None
    test_neg_elbo: Finite | None = None
    label_fidelity: Rate | None = None
    audit_mapping_rate: Rate | None = None
    audit_leakage_rate: Rate | None = None
    audit_member_nearer_rate: Rate | None = None
    audit_outlier_share: Rate | None = None
    audit_mia_auc: Rate | None = None
    audit_num_outliers: Count | None = None
    audit_num_samples: Count | None = None


class PrivateTrainMetrics(ReplyMetrics):
    """A DP silo's train reply: the run's public recipe and this run's spend, nothing computed from its records
    (the same for neighbouring datasets). Every field is required: the server sees exactly this set of keys."""

    dp_epsilon: NonNegative  # this run's planned epsilon at dp-delta, by the run's accountant
    dp_delta: Rate
    dp_noise_multiplier: NonNegative
    dp_sample_rate: Rate
    dp_steps: Count
    dp_epsilon_spent: NonNegative  # what this run has spent after this round (by the run's accountant)
    decoder_bytes: Count  # a function of the architecture


def train_metrics_schema(private: bool) -> type[GeneratorTrainMetrics] | type[PrivateTrainMetrics]:
    """The one schema a run's train replies must match: private exactly when the run asks for DP."""
    return PrivateTrainMetrics if private else GeneratorTrainMetrics


class AveragedTrainMetrics(ReplyMetrics):
    """A FedAvg / FedProx silo's train reply."""

    num_examples: Count
    num_outliers: Count
    train_loss: Finite
    train_seconds: NonNegative
    samples_per_second: NonNegative
    model_bytes: Count
    peak_rss_mb: NonNegative


class EvaluateMetrics(ReplyMetrics):
    """A silo's evaluation of the global model on its own real test set."""

    num_examples: Count
    loss: Finite | None = None
    accuracy: Rate | None = None
    per_class_accuracy: list[float] | None = Field(default=None, max_length=10_000)
    neg_elbo: Finite | None = None
    silo_index: Count | None = None

    @field_validator("per_class_accuracy")
    @classmethod
    def _rates_or_absent(cls, v: list[float] | None) -> list[float] | None:
        """NaN marks a class absent from the silo's test set; every other entry is a rate."""
        if v is not None and any(not math.isnan(a) and not 0 <= a <= 1 for a in v):
            raise ValueError("per-class accuracies must be in [0, 1] (NaN: class absent)")
        return v
