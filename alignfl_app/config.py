"""Every config surface of alignfl as a pydantic model.

Flower hands us flat ``run_config`` / ``node_config`` dicts (bool/int/float/str values, dashed keys);
these models turn them into typed, validated objects and turn any problem into a one-line
``ConfigError`` that names the offending key and how to fix it.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ARCHITECTURES_DIR = PROJECT_ROOT / "conf" / "architectures"
NUM_CLASSES = {"mnist": 10, "fashion-mnist": 10}
IMAGE_SHAPE = (1, 28, 28)
# how each kind of global model is judged on real test data (summary keys: global.<m>, eval-<m>, final-global-<m>)
HEADLINE_METRIC = {"classifier": "accuracy", "vae": "neg-elbo"}


def headline_metric(run_config: dict[str, Any]) -> str:
    """The metric that judges a run, from its (flat, hyphenated) run config: see HEADLINE_METRIC."""
    return HEADLINE_METRIC[str(run_config.get("global-model", "classifier"))]


class ConfigError(ValueError):
    """A configuration problem, phrased as one line that names the fix."""


def _dashed(name: str) -> str:
    return name.replace("_", "-")


def one_line(err: ValidationError, source: str) -> str:
    """Flatten a pydantic error into one line: ``source: key: message``."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(root)"
    msg = first["msg"].removeprefix("Value error, ")
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{source}: {loc}: {msg}{more}"


class ArchitectureSpec(BaseModel):
    """A silo's VAE architecture; the decoder half travels to the server inside the descriptor."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    kind: Literal["mlp", "conv"]
    latent_dim: int = Field(ge=1, le=256)
    hidden: tuple[int, ...] = Field(min_length=1, max_length=4)
    """MLP: widths of the hidden layers (encoder order). Conv: channels of the stride-2 stages."""

    @field_validator("hidden")
    @classmethod
    def _widths_in_range(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(w < 1 or w > 4096 for w in v):
            raise ValueError("every hidden width must be in 1..4096")
        return v


def load_architecture(name: str, directory: Path = ARCHITECTURES_DIR) -> ArchitectureSpec:
    """Read ``conf/architectures/<name>.toml``; unknown names list what exists."""
    path = directory / f"{name}.toml"
    if not path.is_file():
        known = sorted(p.stem for p in directory.glob("*.toml"))
        raise ConfigError(
            f"unknown architecture '{name}': add {path} or use one of {known}"
        )
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc}); fix the file") from exc
    raw.setdefault("name", name)
    try:
        return ArchitectureSpec.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(one_line(exc, str(path))) from exc


def _int_list(text: str, sep: str = ",") -> list[int]:
    parts = [p.strip() for p in text.split(sep) if p.strip()]
    try:
        return [int(p) for p in parts]
    except ValueError as exc:
        raise ValueError(f"expected integers separated by '{sep}', got '{text}'") from exc


class RunConfig(BaseModel):
    """The run config of ``[tool.flwr.app.config]``, validated (see pyproject.toml for the meaning)."""

    model_config = ConfigDict(extra="forbid", alias_generator=_dashed, populate_by_name=True, frozen=True)

    run_name: str = Field(default="", pattern=r"^[A-Za-z0-9_.-]{0,100}$")
    results_dir: str = "results"
    data_root: str = ""
    seed: int = 42
    num_server_rounds: int = Field(default=4, ge=1, le=1000)
    round_timeout: float = Field(default=3600.0, gt=0)

    dataset: Literal["mnist", "fashion-mnist"] = "mnist"
    silo_classes: str = "0,1;2,3;4,5;6,7;8,9"
    max_per_class: int = Field(default=6000, ge=1)
    outlier_dataset: Literal["auto", "none", "mnist", "fashion-mnist"] = "auto"
    outlier_silos: str = "0"
    outliers_per_silo: int = Field(default=600, ge=0)
    silo_architectures: str = "mlp;conv"

    conditional: bool = True
    local_epochs: int = Field(default=5, ge=1)
    batch_size: int = Field(default=128, ge=1)
    learning_rate: float = Field(default=1e-3, gt=0)
    kl_weight: float = Field(default=1.0, ge=0)
    client_threads: int = Field(default=1, ge=1)

    global_model: Literal["classifier", "vae"] = "classifier"
    synthetic_per_silo: int = Field(default=2000, ge=1)
    sample_temperature: float = Field(default=1.0, gt=0)
    server_epochs: int = Field(default=5, ge=0)
    server_batch_size: int = Field(default=128, ge=1)
    server_learning_rate: float = Field(default=1e-3, gt=0)
    server_threads: int = Field(default=2, ge=1)
    max_decoder_mb: float = Field(default=64.0, gt=0)
    sample_grid_per_silo: int = Field(default=10, ge=0, le=64)

    # --- issue 3: privacy (DP-SGD with adaptive clipping, Lipschitz decoders, outlier audit) ---
    dp_epsilon: float = Field(default=0.0, ge=0)  # target epsilon for the whole planned run; 0: see noise multiplier
    dp_noise_multiplier: float = Field(default=0.0, ge=0)  # >0: use this sigma instead of calibrating
    dp_delta: float = Field(default=1e-5, gt=0, lt=1)
    dp_budget_epsilon: float = Field(default=0.0, ge=0)  # ledger cap; 0: dp-epsilon (no cap if that is 0 too)
    dp_clip_init: float = Field(default=1.0, gt=0)  # initial clip bound (data-independent)
    dp_clip_quantile: float = Field(default=0.5, gt=0, lt=1)  # target share of unclipped gradients
    dp_clip_lr: float = Field(default=0.2, ge=0)  # geometric learning rate of the bound
    dp_unclipped_std: float = Field(default=0.0, ge=0)  # noise std of the unclipped count; 0: expected batch / 20
    privacy_ledger_dir: str = ""  # empty: <results-dir>/privacy-ledgers; one <silo>.json per silo
    lipschitz: Literal["none", "gp", "gp-one-sided", "spectral"] = "none"
    lipschitz_weight: float = Field(default=0.0, ge=0)  # lambda of the gradient penalty
    lipschitz_target: float = Field(default=1.0, gt=0)  # slope the penalty aims at; per-layer cap for spectral
    audit: bool = True  # outlier audit in the last round on silos that hold outliers (audit.py)
    audit_samples: int = Field(default=2000, ge=1)  # decoder samples for the leakage rate and the MIA

    @model_validator(mode="after")
    def _privacy_consistent(self) -> RunConfig:
        if self.lipschitz in ("gp", "gp-one-sided") and self.lipschitz_weight == 0:
            raise ValueError(f"lipschitz='{self.lipschitz}' needs lipschitz-weight > 0 (e.g. 0.1), or lipschitz='none'")
        if self.dp_epsilon > 0 and self.dp_noise_multiplier > 0:
            raise ValueError("set either dp-epsilon (calibrate the noise) or dp-noise-multiplier, not both")
        return self

    @field_validator("silo_classes")
    @classmethod
    def _classes_disjoint(cls, v: str) -> str:
        groups = [_int_list(g) for g in v.split(";")]
        if any(not g for g in groups):
            raise ValueError("every silo needs at least one class, e.g. '0,1;2,3'")
        flat = [c for g in groups for c in g]
        if any(len(g) != len(set(g)) for g in groups):
            raise ValueError(f"a silo lists a class twice, got '{v}'")
        if any(c < 0 or c > 9 for c in flat):
            raise ValueError(f"classes must be in 0..9, got '{v}'")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        n = self.num_silos
        flat = [c for g in self.classes_per_silo for c in g]
        if self.silo_layout == "disjoint" and len(flat) != len(set(flat)):
            raise ValueError(
                f"silo-classes: classes must be disjoint across silos, got '{self.silo_classes}' "
                "(or set silo-layout='slices' to split a shared class's records between its silos)"
            )
        if self.strategy != "alignfl" and (self.dp_epsilon > 0 or self.dp_noise_multiplier > 0):
            raise ValueError(
                f"DP applies to ALIGN-FL's silos only; strategy='{self.strategy}' trains without it: "
                "set dp-epsilon=0 and dp-noise-multiplier=0"
            )
        if self.strategy != "alignfl" and self.lipschitz != "none":
            raise ValueError(
                f"lipschitz applies to ALIGN-FL's silo decoders only: set lipschitz='none' for strategy='{self.strategy}'"
            )
        bad = [s for s in self.outlier_silo_ids if s < 0 or s >= n]
        if bad:
            raise ValueError(f"outlier-silos {bad} out of range for {n} silos (0..{n - 1})")
        if not self.conditional and self.global_model == "classifier":
            raise ValueError(
                "an unconditional decoder yields unlabelled samples: set global-model='vae' or conditional=true"
            )
        if self.outlier_source == self.dataset:
            raise ValueError("outlier-dataset must differ from dataset (or be 'auto'/'none')")
        if not [a for a in self.silo_architectures.split(";") if a.strip()]:
            raise ValueError("silo-architectures needs at least one architecture name, e.g. 'mlp;conv'")
        return self

    # --- derived views -------------------------------------------------------------------
    @property
    def classes_per_silo(self) -> list[list[int]]:
        return [_int_list(g) for g in self.silo_classes.split(";")]

    @property
    def num_silos(self) -> int:
        return len(self.classes_per_silo)

    @property
    def outlier_silo_ids(self) -> list[int]:
        return _int_list(self.outlier_silos)

    @property
    def outlier_source(self) -> str | None:
        """The dataset outliers are drawn from, or None when outliers are off."""
        if self.outlier_dataset == "none" or self.outliers_per_silo == 0 or not self.outlier_silo_ids:
            return None
        if self.outlier_dataset == "auto":
            return "fashion-mnist" if self.dataset == "mnist" else "mnist"
        return self.outlier_dataset

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES[self.dataset]

    def architecture_for(self, silo: int) -> str:
        names = [a.strip() for a in self.silo_architectures.split(";") if a.strip()]
        return names[silo % len(names)]

    def resolved_data_root(self) -> Path:
        return resolve_data_root(self.data_root)

    def resolved_results_dir(self) -> Path:
        path = Path(self.results_dir).expanduser()
        if not path.is_absolute():
            base = os.environ.get("ALIGNFL_PROJECT_DIR")
            path = (Path(base) if base else Path.cwd()) / path
        return path

    # --- issue 4: baselines and benchmarks ---
    strategy: Literal["alignfl", "fedavg", "fedprox"] = "alignfl"
    """alignfl: decoders only, server learns from samples. fedavg/fedprox: Flower's built-in weight averaging
    of the global classifier, trained by the silos on their real data (local-epochs, batch-size, learning-rate)."""
    proximal_mu: float = Field(default=0.01, ge=0)
    """FedProx: weight of mu/2 * ||w - w_global||^2 in the silos' loss (ignored by the other strategies)."""
    reference_epochs: int = Field(default=10, ge=1)
    """Epochs of the local-only and centralised reference classifiers (python -m alignfl_app.reference)."""
    silo_layout: Literal["disjoint", "slices"] = "disjoint"
    """disjoint: every class belongs to one silo. slices: a class listed by several silos is split into
    disjoint slices of its records, one per silo (lets 50 silos share 10 classes for scaling runs)."""

    # --- issue 5: resumable server state ---
    resume: bool = False
    """Continue results/<run-name>/ from its last completed round (checkpoint/), with every stored generator."""

    @model_validator(mode="after")
    def _resume_names_a_run(self) -> RunConfig:
        if self.resume and not self.run_name:
            raise ValueError("resume=true needs the run-name of the run to continue, e.g. run-name='study-1'")
        if self.resume and self.strategy != "alignfl":
            raise ValueError(f"resume=true is supported for strategy='alignfl' only, not '{self.strategy}'")
        return self


def resolve_data_root(data_root: str = "") -> Path:
    """Where datasets live: explicit value, else $ALIGNFL_DATA_ROOT, else ~/.cache/alignfl/data."""
    if data_root:
        return Path(data_root).expanduser().resolve()
    env = os.environ.get("ALIGNFL_DATA_ROOT")
    if env:
        return Path(env).expanduser().resolve()
    return Path.home() / ".cache" / "alignfl" / "data"


def parse_run_config(raw: dict[str, Any]) -> RunConfig:
    """Validate Flower's flat run config; raise ConfigError with a one-line message."""
    try:
        return RunConfig.model_validate(dict(raw))
    except ValidationError as exc:
        raise ConfigError(
            one_line(exc, "run config") + " (fix it in [tool.flwr.app.config] or --run-config)"
        ) from exc


class SiloNodeConfig(BaseModel):
    """What a SuperNode may override for its own silo (deployment): ``--node-config 'k=v ...'``.

    Unknown keys are errors: a misspelt ``data_root`` on a silo's machine must not silently fall
    back to the run's data root.
    """

    model_config = ConfigDict(extra="forbid", alias_generator=_dashed, populate_by_name=True, frozen=True)

    partition_id: int = Field(ge=0)
    num_partitions: int | None = Field(default=None, ge=1)
    architecture: str | None = None
    data_root: str | None = None
    silo_name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    classes: str | None = None
    """The classes this silo holds, e.g. '3,4'; default: group ``partition-id`` of the run's silo-classes."""

    @field_validator("classes")
    @classmethod
    def _classes_listed(cls, v: str | None) -> str | None:
        if v is None:
            return v
        labels = _int_list(v)
        if not labels or len(labels) != len(set(labels)) or any(c < 0 or c > 9 for c in labels):
            raise ValueError(f"classes must be distinct integers in 0..9 separated by ',', e.g. '3,4'; got '{v}'")
        return v

    @property
    def class_list(self) -> list[int] | None:
        return _int_list(self.classes) if self.classes is not None else None
    # --- issue 3: privacy ---
    privacy_ledger: str | None = None  # this silo's ledger file (wins over run config privacy-ledger-dir)


def parse_node_config(raw: dict[str, Any]) -> SiloNodeConfig:
    try:
        return SiloNodeConfig.model_validate(dict(raw))
    except ValidationError as exc:
        raise ConfigError(
            one_line(exc, "node config")
            + " (set it with flower-supernode --node-config 'partition-id=0 ...')"
        ) from exc
