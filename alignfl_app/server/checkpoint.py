"""The server's resumable state: ``results/<run>/checkpoint/`` after every completed round.

The generators already live on disk (``GeneratorStore``); the checkpoint adds the global model, the
completed round counter, the node -> silo map and the run config it ran with. ``state.json`` is
written last and atomically, so a server killed at any moment leaves either the previous round's
checkpoint or the new one, never a mix. Nothing is unpickled (``np.load(allow_pickle=False)``).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from alignfl_app.config import ConfigError, RunConfig, one_line
from alignfl_app.files import atomic_write_bytes, atomic_write_text, real_folder, refuse_link

# Keys a resumed run may change: how long and where it runs, not what it learns.
RESUMABLE_CHANGES = frozenset(
    {
        "silo-nodes",
        "num-server-rounds",
        "round-timeout",
        "resume",
        "results-dir",
        "data-root",
        "silo-data-dirs",
        "server-threads",
        "client-threads",
        "sample-grid-per-silo",
        "tracking",
        "server-device",
        "client-device",
    }
)


def model_file_name(completed_round: int) -> str:
    """The global model's file, derived from the round (a name read back from state.json is never trusted)."""
    return f"global-model-round-{completed_round:04d}.npz"


CHECKPOINT_FORMAT = 2  # 2 added the format field and the silos out of the run; 1 (no field) is still read


class CheckpointState(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format: int = Field(default=1, ge=1)
    completed_round: int = Field(ge=1)
    model_file: str
    silo_of_node: dict[str, str]
    config: dict[str, Any]
    withdrawn: dict[str, int] = Field(default_factory=dict)
    quarantined: dict[str, dict[str, Any]] = Field(default_factory=dict)


class Checkpoint:
    """``<run_dir>/checkpoint/``: state.json + the global model of the last completed round."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = Path(run_dir) / "checkpoint"
        self.state_path = self.dir / "state.json"

    def exists(self) -> bool:
        return self.state_path.is_file()

    def save(
        self,
        completed_round: int,
        model_state: dict[str, torch.Tensor],
        silo_of_node: dict[int, str],
        cfg: RunConfig,
        withdrawn: dict[str, int] | None = None,
        quarantined: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        real_folder(self.dir)
        model_file = model_file_name(completed_round)
        buf = io.BytesIO()
        np.savez(buf, **{k: v.detach().cpu().numpy() for k, v in model_state.items()})
        atomic_write_bytes(self.dir / model_file, buf.getvalue())
        state = CheckpointState(
            format=CHECKPOINT_FORMAT,
            completed_round=completed_round,
            model_file=model_file,
            silo_of_node={str(k): v for k, v in silo_of_node.items()},
            config=cfg.flat(),
            withdrawn=withdrawn or {},
            quarantined=quarantined or {},
        )
        atomic_write_text(self.state_path, state.model_dump_json(indent=1))
        for old in self.dir.glob("global-model-round-*.npz"):
            if old.name != model_file:
                old.unlink(missing_ok=True)

    def load(self) -> CheckpointState:
        refuse_link(self.dir)  # a linked folder would resume whatever model it points to
        try:
            state = CheckpointState.model_validate_json(self.state_path.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(
                f"resume: no checkpoint at {self.state_path}; the run never completed a round "
                "there: start it without resume=true"
            ) from exc
        except ValidationError as exc:
            raise ConfigError(one_line(exc, str(self.state_path)) + "; restore the file or start a new run") from exc
        if state.format > CHECKPOINT_FORMAT:
            raise ConfigError(
                f"resume: {self.state_path} has format {state.format}; this version reads formats "
                f"1-{CHECKPOINT_FORMAT}: upgrade alignfl or start a new run-name"
            )
        return state

    def load_model(self, state: CheckpointState) -> dict[str, torch.Tensor]:
        with np.load(self.dir / model_file_name(state.completed_round), allow_pickle=False) as npz:
            return {k: torch.from_numpy(npz[k]) for k in npz.files}

    def check_compatible(self, state: CheckpointState, cfg: RunConfig) -> None:
        """A resumed run must learn the same thing; only RESUMABLE_CHANGES may differ (one-line error)."""
        now = cfg.flat()
        for key in sorted(set(now) | set(state.config)):
            if key in RESUMABLE_CHANGES:
                continue
            if json.dumps(now.get(key)) != json.dumps(state.config.get(key)):
                raise ConfigError(
                    f"resume: {key}={now.get(key)!r} but the checkpointed run used {state.config.get(key)!r}; "
                    "use the same value or start a new run-name"
                )
