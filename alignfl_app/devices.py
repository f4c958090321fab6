"""Where tensors live: the CPU, or a CUDA GPU when the run (or a silo's node config) asks for one.

``auto`` uses CUDA when torch sees a GPU and the CPU otherwise, so the same run config works on a laptop,
on a silo's GPU server and in CI; an explicit ``cuda`` on a machine without one is a configuration error.
"""

from __future__ import annotations

import dataclasses
from typing import TypeVar

import torch
from torch import nn

from alignfl_app.config import ConfigError, DeviceChoice


def resolve_device(choice: DeviceChoice, key: str) -> torch.device:
    """The device ``choice`` names on this machine; ``key`` is the config key, named in the error."""
    if choice == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if choice == "cuda":
        raise ConfigError(
            f"{key}='cuda' but torch sees no CUDA GPU on this machine: set {key}='auto' or 'cpu' "
            "(or install a CUDA build of torch)"
        )
    return torch.device("cpu")


def device_of(module: nn.Module) -> torch.device:
    """The device of a module's parameters, or of its buffers for one without parameters (a module lives on one
    device)."""
    return next(iter([*module.parameters(), *module.buffers()])).device


def on_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a state dict: what is sent, stored or carried between rounds."""
    return {k: v.detach().to("cpu", copy=True, memory_format=torch.contiguous_format) for k, v in state.items()}


T = TypeVar("T")


def tensors_to(data: T, device: torch.device) -> T:
    """A (frozen) dataclass with every tensor field moved to ``device`` once, so batches are cut where they train."""
    return dataclasses.replace(
        data,
        **{
            f.name: value.to(device)
            for f in dataclasses.fields(data)
            if isinstance(value := getattr(data, f.name), torch.Tensor)
        },
    )


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (MiB; Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
