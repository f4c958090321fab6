"""What a silo's generator is (descriptor), how a received one is checked, and where it is kept.

The server never trusts a reply: ``check_decoder_state`` rebuilds the decoder from the descriptor
and demands exactly its tensor names, shapes and dtype, all finite, within a byte budget. Only then
does ``GeneratorStore.put`` write it, atomically, so a rejected or half-written reply can never
replace a silo's last good generator. Generators live on disk (``.npz`` loaded with
``allow_pickle=False``: nothing from a client is unpickled) and are loaded one at a time.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from .config import CLASS_NAME_PATTERN, NAME_PATTERN, ArchitectureSpec, RunConfig, one_line
from .files import atomic_write_bytes, atomic_write_text
from .models import build_decoder, num_parameters, one_hot
from .replies import ReplyRejected


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

    @model_validator(mode="after")
    def _sane(self) -> GeneratorDescriptor:
        if len(set(self.classes)) != len(self.classes):
            raise ValueError("classes must be distinct names")
        if any(not 1 <= s <= 512 for s in self.image_shape):
            raise ValueError("image_shape sides must be in 1..512")
        return self

    @property
    def conditional(self) -> bool:
        """Every sample carries a class (a classifier can learn from it)."""
        return self.layout != "unconditional"

    @property
    def cond_dim(self) -> int:
        return len(self.classes) if self.conditional else 0

    def build_decoder(self) -> nn.Module:
        return build_decoder(self.architecture, self.layout, len(self.classes), self.image_shape)

    def empty_decoder(self) -> nn.Module:
        """The decoder's shapes on the meta device: nothing allocated, nothing initialised."""
        with torch.device("meta"):
            return self.build_decoder()


def parse_descriptor(text: str) -> GeneratorDescriptor:
    try:
        return GeneratorDescriptor.model_validate_json(text)
    except ValidationError as exc:
        raise ReplyRejected(one_line(exc, "descriptor")) from exc


@dataclass(frozen=True)
class GeneratorTerms:
    """What this run accepts from any silo's generator, fixed at start from the run config."""

    image_shape: tuple[int, int, int]
    conditional: bool
    class_names: tuple[str, ...]
    max_bytes: int
    trial_samples: int = 16

    @classmethod
    def from_config(cls, cfg: RunConfig) -> GeneratorTerms:
        return cls(cfg.data.image_shape, cfg.local.conditional, cfg.data.class_names,
                   int(cfg.server.max_decoder_mb * 2**20))

    def class_ids(self, desc: GeneratorDescriptor) -> torch.Tensor:
        """The run's class id of each of the descriptor's classes (checked names only)."""
        index = {name: i for i, name in enumerate(self.class_names)}
        return torch.tensor([index[name] for name in desc.classes])


def check_decoder_state(desc: GeneratorDescriptor, state: dict[str, np.ndarray], terms: GeneratorTerms) -> nn.Module:
    """Return the decoder loaded with ``state`` or raise ReplyRejected naming the first problem.

    Cheap checks come first and nothing is allocated for a decoder before its declared size is known to fit:
    the descriptor must match the run's terms, the decoder is first built on the meta device (shapes only),
    and a loaded decoder must draw finite samples before it is accepted."""
    if desc.image_shape != terms.image_shape:
        raise ReplyRejected(f"image_shape {list(desc.image_shape)} is not this run's {list(terms.image_shape)}")
    if desc.conditional != terms.conditional:
        raise ReplyRejected(f"layout '{desc.layout}' but this run needs conditional={terms.conditional}")
    unknown = [c for c in desc.classes if c not in terms.class_names]
    if unknown:
        raise ReplyRejected(f"classes {unknown[:3]} are not in this run's label space {list(terms.class_names)}")
    total = sum(int(a.nbytes) for a in state.values())
    if total > terms.max_bytes:
        raise ReplyRejected(f"decoder is {total / 2**20:.1f} MiB, over the {terms.max_bytes / 2**20:.1f} MiB limit")
    try:
        shapes = desc.empty_decoder()
    except (ValueError, RuntimeError) as exc:
        raise ReplyRejected(f"descriptor does not describe a buildable decoder: {exc}") from exc
    declared = 4 * num_parameters(shapes)
    if declared > terms.max_bytes:
        raise ReplyRejected(f"descriptor declares a {declared / 2**20:.1f} MiB decoder, over the "
                            f"{terms.max_bytes / 2**20:.1f} MiB limit")
    expected = shapes.state_dict()
    extra = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    if extra:
        raise ReplyRejected(f"{len(extra)} tensors the decoder does not have (e.g. '{extra[0]}')")
    if missing:
        raise ReplyRejected(f"missing decoder tensors (e.g. '{missing[0]}')")
    for name, ref in expected.items():
        arr = state[name]
        if tuple(arr.shape) != tuple(ref.shape):
            raise ReplyRejected(f"'{name}' has shape {tuple(arr.shape)}, expected {tuple(ref.shape)}")
        if arr.dtype != np.float32:
            raise ReplyRejected(f"'{name}' has dtype {arr.dtype}, expected float32")
        if not np.isfinite(arr).all():
            raise ReplyRejected(f"'{name}' contains NaN or Inf")
    decoder = shapes.to_empty(device="cpu")
    decoder.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, strict=True)
    decoder.eval()
    with torch.no_grad():
        z = torch.randn(terms.trial_samples, desc.architecture.latent_dim, generator=torch.Generator().manual_seed(0))
        labels = torch.arange(terms.trial_samples) % len(desc.classes)
        trial = decoder(z, one_hot(labels, desc.cond_dim))
    if not torch.isfinite(trial).all():
        raise ReplyRejected("the decoder's samples are not finite (NaN or Inf from finite weights)")
    return decoder


class GeneratorStore:
    """Each silo's latest good generator, on disk; survives rounds a silo misses and server restarts."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._index_path = self.root / "index.json"
        self._index: dict[str, dict] = json.loads(self._index_path.read_text()) if self._index_path.exists() else {}

    def silos(self) -> list[str]:
        return sorted(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, silo: str) -> bool:
        return silo in self._index

    def entry(self, silo: str) -> dict:
        """Bookkeeping for a silo: descriptor, round stored, bytes."""
        return dict(self._index[silo])

    def descriptor(self, silo: str) -> GeneratorDescriptor:
        return GeneratorDescriptor.model_validate(self._index[silo]["descriptor"])

    def put(self, desc: GeneratorDescriptor, state: dict[str, np.ndarray], server_round: int) -> None:
        """Store an already-checked generator, replacing the silo's previous one atomically."""
        path = self.root / f"{desc.silo}.npz"
        buffer = io.BytesIO()
        np.savez(buffer, **state)
        atomic_write_bytes(path, buffer.getvalue())
        self._index[desc.silo] = {
            "descriptor": desc.model_dump(mode="json"),
            "file": path.name,
            "stored_round": server_round,
            "bytes": int(sum(a.nbytes for a in state.values())),
        }
        atomic_write_text(self._index_path, json.dumps(self._index, indent=1))

    def load_decoder(self, silo: str) -> tuple[GeneratorDescriptor, nn.Module]:
        desc = self.descriptor(silo)
        with np.load(self.root / f"{desc.silo}.npz", allow_pickle=False) as npz:  # never a path read from disk
            state = {k: npz[k] for k in npz.files}
        decoder = desc.empty_decoder().to_empty(device="cpu")  # every weight is loaded next
        decoder.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
        return desc, decoder.eval()
