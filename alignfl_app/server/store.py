"""What a silo's generator is (descriptor), how a received one is checked, and where it is kept.

The server never trusts a reply: ``check_decoder_state`` rebuilds the decoder from the descriptor
and demands exactly its tensor names, shapes and dtype, all finite, within budgets of bytes, sampling memory and
compute per sample. Only then does ``GeneratorStore.put`` write it, atomically, so a rejected or half-written reply
can never replace a silo's last good generator. Generators live on disk (``.npz`` loaded with
``allow_pickle=False``: nothing from a client is unpickled) and are loaded one at a time.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from alignfl_app.config import (
    ConfigError,
    RunConfig,
    check_name,
)
from alignfl_app.contract.descriptor import GeneratorDescriptor
from alignfl_app.contract.replies import ReplyRejected
from alignfl_app.files import atomic_write_bytes, atomic_write_text, real_folder
from alignfl_app.models.features import FeatureSpec
from alignfl_app.models.vae import one_hot

STORE_FORMAT = 2  # index.json: {"format": 2, "generators": {...}}; format 1 was the bare mapping
MIN_SAMPLING_CHUNK = 64  # a decoder that cannot draw this many samples at once within max-sampling-mb is refused
MAX_SAMPLING_CHUNK = 4096


@dataclass(frozen=True)
class GeneratorTerms:
    """What this run accepts from each silo's generator, fixed at start from the run config: the descriptor is
    pinned to it (image shape, conditional, the silo's assigned classes) before anything is built."""

    image_shape: tuple[int, int, int]
    conditional: bool
    class_names: tuple[str, ...]
    max_bytes: int
    assigned: dict[str, frozenset[str]]
    """silo name -> the class names the run assigned to it; no other silo name is accepted."""
    max_sampling_bytes: int = 2**30
    trial_samples: int = 16
    max_sample_flops: int = 10**9
    """The compute one drawn sample may cost (max-sample-mflops): a decoder within the byte limit can still be
    costly enough to stall every round the server samples it."""
    features: FeatureSpec = FeatureSpec()
    """The run's feature space: what a feature family's decoder must draw in."""

    @classmethod
    def from_config(cls, cfg: RunConfig) -> GeneratorTerms:
        return cls(
            cfg.data.image_shape,
            cfg.local.conditional,
            cfg.data.class_names,
            int(cfg.server.max_decoder_mb * 2**20),
            cfg.data.assigned_classes(),
            int(cfg.server.max_sampling_mb * 2**20),
            features=cfg.features.spec,
            max_sample_flops=int(cfg.server.max_sample_mflops * 1e6),
        )

    def sampling_chunk(self, desc: GeneratorDescriptor) -> int:
        """How many samples one forward pass of ``desc``'s decoder may draw within max-sampling-mb."""
        room = self.max_sampling_bytes - desc.sampling_bytes_per_pass()
        return max(0, min(MAX_SAMPLING_CHUNK, room // max(desc.sampling_bytes_per_sample(), 1)))

    def class_ids(self, desc: GeneratorDescriptor) -> torch.Tensor:
        """The run's class id of each of the descriptor's classes (checked names only)."""
        index = {name: i for i, name in enumerate(self.class_names)}
        return torch.tensor([index[name] for name in desc.classes])


def check_decoder_state(desc: GeneratorDescriptor, state: dict[str, np.ndarray], terms: GeneratorTerms) -> nn.Module:
    """Return the decoder loaded with ``state`` or raise ReplyRejected naming the first problem.

    Cheap checks come first and nothing is allocated for a decoder before its declared size and compute are known
    to fit: the descriptor must match the run's terms, the decoder is first built on the meta device (shapes only),
    and a loaded decoder must draw finite samples before it is accepted."""
    if desc.silo not in terms.assigned:
        raise ReplyRejected(f"silo '{desc.silo}' is not one of this run's silos {sorted(terms.assigned)} (silo-names)")
    if desc.image_shape != terms.image_shape:
        raise ReplyRejected(f"image_shape {list(desc.image_shape)} is not this run's {list(terms.image_shape)}")
    if desc.conditional != terms.conditional:
        raise ReplyRejected(f"layout '{desc.layout}' but this run needs conditional={terms.conditional}")
    if desc.features is not None and desc.features != terms.features:
        raise ReplyRejected(
            f"a '{desc.architecture.kind}' decoder drawing in {desc.features.model_dump()}, but this run's feature "
            f"space is {terms.features.model_dump()} (feature-space)"
        )
    assigned = terms.assigned[desc.silo]
    if set(desc.classes) != assigned:
        raise ReplyRejected(
            f"classes {sorted(desc.classes)[:12]} are not the classes this run assigned to silo "
            f"'{desc.silo}' {sorted(assigned)}"
        )
    if terms.sampling_chunk(desc) < MIN_SAMPLING_CHUNK:
        raise ReplyRejected(
            f"decoder needs {desc.sampling_bytes_per_sample() / 2**20:.1f} MiB per sample "
            f"(+ {desc.sampling_bytes_per_pass() / 2**20:.1f} MiB per pass) to draw, "
            f"over max-sampling-mb={terms.max_sampling_bytes / 2**20:.0f} MiB for "
            f"{MIN_SAMPLING_CHUNK} samples"
        )
    total = sum(int(a.nbytes) for a in state.values())
    if total > terms.max_bytes:
        raise ReplyRejected(f"decoder is {total / 2**20:.1f} MiB, over the {terms.max_bytes / 2**20:.1f} MiB limit")
    try:
        shapes = desc.empty_decoder()
    except (ValueError, RuntimeError) as exc:
        raise ReplyRejected(f"descriptor does not describe a buildable decoder: {exc}") from exc
    declared = 4 * sum(t.numel() for t in shapes.state_dict().values())  # buffers (a mixture layer) too
    if declared > terms.max_bytes:
        raise ReplyRejected(
            f"descriptor declares a {declared / 2**20:.1f} MiB decoder, over the "
            f"{terms.max_bytes / 2**20:.1f} MiB limit"
        )
    flops = desc.sampling_flops_per_sample()
    if flops > terms.max_sample_flops:
        raise ReplyRejected(
            f"decoder costs {flops / 1e6:,.0f} MFLOPs per drawn sample, over max-sample-mflops="
            f"{terms.max_sample_flops / 1e6:,.0f}: send a narrower or shallower decoder (fewer channels or refine "
            f"layers), or raise max-sample-mflops"
        )
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
        z = torch.randn(terms.trial_samples, desc.latent_dim, generator=torch.Generator().manual_seed(0))
        labels = torch.arange(terms.trial_samples) % len(desc.classes)
        trial = decoder(z, one_hot(labels, desc.cond_dim))
    if not torch.isfinite(trial).all():
        raise ReplyRejected("the decoder's samples are not finite (NaN or Inf from finite weights)")
    return decoder


class StoreFormatError(ConfigError):
    """A generator store this version cannot read; the message names the file and the fix."""


class GeneratorStore:
    """Each silo's latest good generator, on disk; survives rounds a silo misses and server restarts."""

    def __init__(self, root: Path) -> None:
        self.root = real_folder(root)
        self._index_path = self.root / "index.json"
        self._index: dict[str, dict] = self._read_index() if self._index_path.exists() else {}

    def _read_index(self) -> dict[str, dict]:
        """The stored index (format 2, or the bare mapping of format 1); anything else is refused, never reset."""
        fix = "restore it from a backup or start another run-name"
        try:
            raw = json.loads(self._index_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StoreFormatError(f"{self._index_path} is unreadable ({exc}): {fix}") from exc
        if not isinstance(raw, dict):
            raise StoreFormatError(f"{self._index_path} is not a generator store index: {fix}")
        if "format" not in raw:
            entries = raw  # format 1
        elif raw.get("format") == STORE_FORMAT and isinstance(raw.get("generators"), dict):
            entries = raw["generators"]
        else:
            raise StoreFormatError(
                f"{self._index_path} has format {raw.get('format')!r}; this version reads formats "
                f"1-{STORE_FORMAT}: upgrade alignfl or start another run-name"
            )
        for silo, entry in entries.items():
            try:
                check_name(silo)
                if GeneratorDescriptor.model_validate(entry["descriptor"]).silo != silo:
                    raise ValueError("descriptor names another silo")
            except (ValueError, KeyError, TypeError) as exc:
                raise StoreFormatError(
                    f"{self._index_path}: entry '{str(silo)[:64]}' is invalid ({str(exc).splitlines()[0][:200]}): {fix}"
                ) from exc
        return dict(entries)

    def _commit(self, index: dict[str, dict]) -> None:
        """Write ``index`` and only then make it the store's: a failed write leaves the store as it was."""
        atomic_write_text(self._index_path, json.dumps({"format": STORE_FORMAT, "generators": index}, indent=1))
        self._index = index

    def check_against(self, terms: GeneratorTerms) -> None:
        """Re-pin every stored generator to this run's terms with the checks a reply passes on arrival
        (``check_decoder_state``): an index or decoder file edited on disk is refused in one line, never used."""
        fix = "restore the store from a backup or start another run-name"
        for silo in self.silos():
            try:
                check_decoder_state(self.descriptor(silo), self.state(silo), terms)
            except (ReplyRejected, ValueError, OSError, zipfile.BadZipFile) as exc:
                reason = " ".join(str(exc).split())[:300]
                raise StoreFormatError(
                    f"{self._index_path}: the stored generator of '{silo}' does not fit this run ({reason}): {fix}"
                ) from exc

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
        entry = {
            "descriptor": desc.model_dump(mode="json"),
            "file": path.name,
            "stored_round": server_round,
            "bytes": int(sum(a.nbytes for a in state.values())),
        }
        staged = self.root / f".{desc.silo}.npz.next"  # the old file stays until the index describes the new one
        try:
            atomic_write_bytes(staged, buffer.getvalue())
            self._commit({**self._index, desc.silo: entry})
            os.replace(staged, path)  # a rename: needs no space
        finally:
            staged.unlink(missing_ok=True)

    def remove(self, silo: str) -> None:
        """Take a silo's generator out of the store (withdrawn or quarantined): out of every later synthesis."""
        if silo not in self._index:
            return
        self._commit({s: e for s, e in self._index.items() if s != silo})
        (self.root / f"{check_name(silo)}.npz").unlink(missing_ok=True)

    def state(self, silo: str) -> dict[str, np.ndarray]:
        """The stored decoder's tensors, as they were sent."""
        with np.load(self.root / f"{check_name(silo)}.npz", allow_pickle=False) as npz:  # never a path read from disk
            return {k: npz[k] for k in npz.files}

    def load_decoder(self, silo: str) -> tuple[GeneratorDescriptor, nn.Module]:
        desc = self.descriptor(silo)
        state = self.state(silo)
        decoder = desc.empty_decoder().to_empty(device="cpu")  # every weight is loaded next
        decoder.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
        return desc, decoder.eval()
