"""The generator families a silo may train, by kind: each lives in its own module; adding one is its module plus
one line here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from alignfl_app.config import ArchitectureSpec, ConfigError
from alignfl_app.models.families import conv, gaussian, mlp
from alignfl_app.models.families.base import Decoder, Encoder, GeneratorFamily, LatentMixture, unknown_family

FAMILIES: dict[str, GeneratorFamily] = {family.kind: family for family in (mlp.FAMILY, conv.FAMILY, gaussian.FAMILY)}


def family_of(kind: str) -> GeneratorFamily:
    """The family of ``kind``; ConfigError naming the known ones otherwise."""
    if kind not in FAMILIES:
        raise unknown_family(kind, sorted(FAMILIES))
    return FAMILIES[kind]


if TYPE_CHECKING:
    from alignfl_app.config import RunConfig


def check_family_fits_run(spec: ArchitectureSpec, cfg: RunConfig) -> None:
    """ConfigError, one line, when the run cannot train this architecture's family: a feature family in a pixel
    run; a closed-form family (no gradient steps) under DP or with a Lipschitz method."""
    family = family_of(spec.kind)
    if family.output == "features" and cfg.features.space == "pixels":
        raise ConfigError(
            f"architecture '{spec.name}' ({spec.kind}) generates features: set feature-space='scattering' or choose "
            "a pixel architecture"
        )
    if family.encoder is None and cfg.privacy.enabled:
        raise ConfigError(
            f"architecture '{spec.name}' ({spec.kind}) has no DP training: choose a VAE architecture (mlp, conv) "
            "under DP"
        )
    if family.encoder is None and cfg.lipschitz.method != "none":
        raise ConfigError(
            f"lipschitz applies to VAE decoders, not to '{spec.name}' ({spec.kind}): set lipschitz='none'"
        )


__all__ = ["FAMILIES", "check_family_fits_run", "Decoder", "Encoder", "GeneratorFamily", "LatentMixture", "family_of"]
