"""A silo's own privacy terms, ``<silo-dir>/privacy-policy.toml``: only the silo's operator sets them."""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from alignfl_app.config import ConfigError, _dashed, one_line


class SiloPrivacyPolicy(BaseModel):
    """A silo's own privacy terms, in ``<silo-dir>/privacy-policy.toml``: only the silo's operator sets them.

    The run config may ask for more privacy than the policy (a smaller epsilon or delta), never less.
    """

    require_dp: bool = False
    """true: refuse every round the run asks to train without DP (a silo with a ledger always does)."""
    max_epsilon: float = Field(default=8.0, gt=0)
    """The largest per-run epsilon this silo accepts (counted over the rounds a run actually trains)."""
    max_delta: float = Field(default=1e-5, gt=0, lt=1)
    budget_epsilon: float | None = Field(default=None, gt=0)
    """Lifetime cap over every run, by the ledger's accountant; absent: the epsilon of the silo's first DP run."""

    model_config = ConfigDict(extra="forbid", alias_generator=_dashed, populate_by_name=True, frozen=True)


POLICY_FILE = "privacy-policy.toml"


def load_silo_policy(silo_dir: Path) -> SiloPrivacyPolicy:
    """The silo's policy file, or the default policy when the silo has none."""
    path = Path(silo_dir) / POLICY_FILE
    if not path.is_file():
        return SiloPrivacyPolicy()
    try:
        return SiloPrivacyPolicy.model_validate(tomllib.loads(path.read_text()))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc}); fix the silo's policy file") from exc
    except ValidationError as exc:
        raise ConfigError(one_line(exc, str(path)) + " (fix the silo's policy file)") from exc
