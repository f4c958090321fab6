"""The generator families a silo may train, by kind: each lives in its own module; adding one is its module plus
one line here."""

from __future__ import annotations

from alignfl_app.models.families import conv, mlp
from alignfl_app.models.families.base import Decoder, Encoder, GeneratorFamily, LatentMixture, unknown_family

FAMILIES: dict[str, GeneratorFamily] = {family.kind: family for family in (mlp.FAMILY, conv.FAMILY)}


def family_of(kind: str) -> GeneratorFamily:
    """The family of ``kind``; ConfigError naming the known ones otherwise."""
    if kind not in FAMILIES:
        raise unknown_family(kind, sorted(FAMILIES))
    return FAMILIES[kind]


__all__ = ["FAMILIES", "Decoder", "Encoder", "GeneratorFamily", "LatentMixture", "family_of"]
