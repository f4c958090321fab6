"""Every seed a run derives from its ``seed``: one function per purpose, so no two purposes share a stream."""

from __future__ import annotations


def vae_init_seed(run_seed: int, silo_index: int) -> int:
    """A silo's VAE initial weights (and the global torch RNG of its training)."""
    return run_seed * 7919 + silo_index


def local_batches_seed(run_seed: int, silo_index: int, server_round: int) -> int:
    """A silo's shuffling in one round (non-private runs; DP draws from the OS)."""
    return run_seed * 100003 + silo_index * 1009 + server_round


def synthesis_seed(run_seed: int, server_round: int, epoch: int, generator_index: int) -> int:
    """The latents and labels drawn from one stored generator for one server epoch."""
    return (run_seed * 10007 + server_round * 101 + epoch) * 1000 + generator_index


def server_batches_seed(run_seed: int, server_round: int, epoch: int) -> int:
    """The server's shuffling of one epoch of synthetic data."""
    return run_seed + server_round * 1000 + epoch


def audit_seed(run_seed: int, server_round: int) -> int:
    """The audit's decoder samples; shared by the in-run audit and its recomputation so they match."""
    return run_seed + server_round
