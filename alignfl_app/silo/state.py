"""A silo's training state on its own disk: a restarted SuperNode or a resumed run continues where it was.

``<silo-dir>/state/<run>/`` (``<run>``: the run-name, which a resumed run keeps, else Flower's run id) holds
``state.json``, a small header (format version, round, what the state belongs to: architecture, layout, image
shape, the silo's classes; the DP carry; the tensor file's name and SHA-256), and ``round-NNN.pt``: the VAEs' state
dict (encoders included) and each generator group's optimizer state, read with ``torch.load(weights_only=True)``
(no pickle). The tensors are written first, then the header by atomic rename, then older tensor files are removed:
a reader sees one round's complete state or the previous one. Nothing here is ever sent.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from alignfl_app.files import atomic_write_bytes, atomic_write_text
from alignfl_app.privacy.dpsgd import DPCarry
from alignfl_app.privacy.ledger import LedgerAnchor
from alignfl_app.silo.folder import STATE_DIR
from alignfl_app.silo.folder import STATE_HEADER as HEADER

FORMAT = 1  # the newest state format this code reads and the one it writes
StateDict = dict[str, torch.Tensor]
log = logging.getLogger("flwr.alignfl")


class SiloStateError(RuntimeError):
    """The stored state cannot be used and must not be silently replaced; one line naming the file and the fix."""


class StateIdentity(BaseModel):
    """What a stored state belongs to: another architecture, layout, image shape or class list starts fresh."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    architecture: dict[str, Any]
    layout: str
    image_shape: tuple[int, ...]
    classes: tuple[int, ...]

    def differences(self, other: StateIdentity) -> list[str]:
        return [k for k in type(self).model_fields if getattr(self, k) != getattr(other, k)]


class StateHeader(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: int
    run: str
    round: int
    identity: StateIdentity
    tensors: str
    sha256: str
    dp: DPCarry | None = None
    flower_run: str = ""  # the Flower run that wrote it: a new run reusing the run-name does not continue it
    origin: str = ""  # the Flower run that started the run it belongs to (kept across resumes)
    ledger: LedgerAnchor | None = None  # the privacy ledger after this round (private rounds): checked on booking


@dataclass
class StoredState:
    """One round's state as the silo left it."""

    round: int
    generators: StateDict
    optimizers: list[dict[str, Any]] = field(default_factory=list)
    dp: DPCarry | None = None
    origin: str = ""  # the Flower run that started this run (a resumed run keeps it): the ledger's run
    ledger: LedgerAnchor | None = None  # the privacy ledger after this round, recorded outside it


def run_key(run_name: str, run_id: int | str) -> str:
    """The folder of a run's state: its run-name (kept by a resumed run), else Flower's run id."""
    key = run_name or str(run_id)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", key):
        raise SiloStateError(
            f"run '{key}' is not usable as a folder name: choose a run-name of letters, digits, '.', '_' and '-'"
        )
    return key


class SiloStateStore:
    """The state of one silo in one run, in ``<silo-dir>/state/<run>/``."""

    def __init__(self, silo_dir: Path, run: str, silo: str, flower_run: str = "") -> None:
        self.dir = Path(silo_dir) / STATE_DIR / run_key(run, "")
        self.run, self.silo, self.flower_run = run, silo, flower_run
        self.header_path = self.dir / HEADER

    def _refuse(self, path: Path, why: str, fix: str = "") -> SiloStateError:
        return SiloStateError(
            f"silo '{self.silo}': its stored state {path} {why}: {fix}delete {self.dir} (the "
            "silo restarts its VAEs) or start another run-name"
        )

    def load(self, identity: StateIdentity, resuming: bool = True) -> StoredState | None:
        """The stored state; None when there is none, it belongs to another setup, or (``resuming`` false) to an
        earlier Flower run that used the same run-name (one log line why).
        ``SiloStateError`` for a corrupt file or one of a newer format: never silently reset."""
        if not self.header_path.is_file():
            return None
        try:
            raw = json.loads(self.header_path.read_text())
        except (OSError, ValueError) as exc:
            raise self._refuse(self.header_path, f"is unreadable ({type(exc).__name__})") from exc
        version = raw.get("format") if isinstance(raw, dict) else None
        if not isinstance(version, int) or version < 1:
            raise self._refuse(self.header_path, "has no valid format version")
        if version > FORMAT:
            raise self._refuse(
                self.header_path,
                f"has format {version}, newer than this alignfl reads ({FORMAT})",
                "upgrade alignfl on this silo, ",
            )
        try:
            header = StateHeader.model_validate(raw)
        except ValidationError as exc:
            raise self._refuse(self.header_path, f"is corrupt ({exc.error_count()} invalid fields)") from exc
        if not resuming and header.flower_run and self.flower_run and header.flower_run != self.flower_run:
            log.info(
                "Silo '%s': its stored state in %s is from an earlier run named '%s' and this run does not "
                "resume it; its VAEs start fresh",
                self.silo,
                self.dir,
                self.run,
            )
            return None
        changed = header.identity.differences(identity)
        if changed:
            log.info(
                "Silo '%s': its stored state in %s belongs to another %s; its VAEs start fresh",
                self.silo,
                self.dir,
                ", ".join(changed),
            )
            return None
        tensors = self.dir / header.tensors
        if Path(header.tensors).name != header.tensors or not tensors.is_file():
            raise self._refuse(tensors, "is missing")
        data = tensors.read_bytes()
        if hashlib.sha256(data).hexdigest() != header.sha256:
            raise self._refuse(tensors, "does not match its header's SHA-256 (corrupt)")
        try:
            payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            generators, optimizers = dict(payload["generators"]), list(payload["optimizers"])
        except Exception as exc:  # torch raises several kinds for a bad file
            raise self._refuse(tensors, f"is unreadable ({type(exc).__name__})") from exc
        return StoredState(header.round, generators, optimizers, header.dp, header.origin, header.ledger)

    def save(self, server_round: int, identity: StateIdentity, state: StoredState) -> Path:
        """Write the round's state: tensors, then the header (atomic), then drop older tensor files."""
        self.dir.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save({"generators": state.generators, "optimizers": state.optimizers}, buffer)
        data = buffer.getvalue()
        name = f"round-{server_round:03d}.pt"
        atomic_write_bytes(self.dir / name, data)
        header = StateHeader(
            format=FORMAT,
            run=self.run,
            round=server_round,
            identity=identity,
            tensors=name,
            sha256=hashlib.sha256(data).hexdigest(),
            dp=state.dp,
            flower_run=self.flower_run,
            origin=state.origin,
            ledger=state.ledger,
        )
        atomic_write_text(self.header_path, header.model_dump_json(indent=1))
        for old in self.dir.glob("round-*.pt"):
            if old.name != name:
                old.unlink(missing_ok=True)
        return self.header_path
