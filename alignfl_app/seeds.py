"""Every seed a run derives from its ``seed``: one purpose each, mixed by NumPy's SeedSequence so that no two
purposes (or silos, rounds, epochs) share a random stream."""

from __future__ import annotations

from enum import IntEnum

import numpy as np


class Purpose(IntEnum):
    VAE_INIT = 1
    LOCAL_BATCHES = 2
    SYNTHESIS = 3
    SERVER_BATCHES = 4
    AUDIT = 5
    SERVER_TRAINING = 6
    AUGMENT = 7
    FIDELITY = 8
    LATENT_FIT = 9


def derive_seed(run_seed: int, purpose: Purpose, *tags: int) -> int:
    """A 63-bit seed (what torch.Generator.manual_seed takes) for ``purpose`` and its non-negative ``tags``."""
    state = np.random.SeedSequence([run_seed, int(purpose), *tags]).generate_state(1, np.uint64)[0]
    return int(state) >> 1


def vae_init_seed(run_seed: int, silo_index: int) -> int:
    """A silo's VAE initial weights (and the global torch RNG of its training)."""
    return derive_seed(run_seed, Purpose.VAE_INIT, silo_index)


def local_batches_seed(run_seed: int, silo_index: int, server_round: int, *group: int) -> int:
    """A silo's shuffling in one round, per generator group when it has several (non-private runs; DP draws
    from the OS)."""
    return derive_seed(run_seed, Purpose.LOCAL_BATCHES, silo_index, server_round, *group)


def synthesis_seed(run_seed: int, server_round: int, epoch: int, generator_index: int) -> int:
    """The latents and labels drawn from one stored generator for one server epoch."""
    return derive_seed(run_seed, Purpose.SYNTHESIS, server_round, epoch, generator_index)


def server_batches_seed(run_seed: int, server_round: int, epoch: int) -> int:
    """The server's shuffling of one epoch of synthetic data."""
    return derive_seed(run_seed, Purpose.SERVER_BATCHES, server_round, epoch)


def server_training_seed(run_seed: int, server_round: int, epoch: int) -> int:
    """The server's torch RNG (dropout) for one epoch, independent of how many decoders were built before it."""
    return derive_seed(run_seed, Purpose.SERVER_TRAINING, server_round, epoch)


def audit_seed(run_seed: int, server_round: int) -> int:
    """The audit's decoder samples; shared by the in-run audit and its recomputation so they match."""
    return derive_seed(run_seed, Purpose.AUDIT, server_round)


def augment_seed(run_seed: int, server_round: int, epoch: int) -> int:
    """The random transforms of one server epoch's synthetic images."""
    return derive_seed(run_seed, Purpose.AUGMENT, server_round, epoch)


def fidelity_seed(run_seed: int, silo_index: int, server_round: int) -> int:
    """A silo's label-fidelity judge (its weights and shuffling) and the decoder samples it judges."""
    return derive_seed(run_seed, Purpose.FIDELITY, silo_index, server_round)


def latent_fit_seed(run_seed: int, silo_index: int, server_round: int) -> int:
    """The posterior samples and starting points of a silo's latent mixture fit in one round."""
    return derive_seed(run_seed, Purpose.LATENT_FIT, silo_index, server_round)
