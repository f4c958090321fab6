"""The operator's requests to a running (or resumable) ALIGN-FL run, made through its results folder.

``alignfl withdraw RUN_DIR SILO`` writes ``RUN_DIR/operator/withdrawn.json``; the server reads it when each round
starts, so a withdrawal takes effect at the next round without restarting the run. Only who can write the run
folder (the operator on the coordinator) can withdraw a silo: nothing a silo sends reaches this file.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from alignfl_app.config import NAME_PATTERN, check_name, one_line
from alignfl_app.files import atomic_write_text

log = logging.getLogger("flwr.alignfl")
WITHDRAWN_FILE = Path("operator") / "withdrawn.json"


class Withdrawal(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    silo: str = Field(pattern=NAME_PATTERN)
    reason: str = Field(default="", max_length=500)
    requested_at: float


class WithdrawnFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format: int = Field(default=1, ge=1, le=1)
    withdrawals: tuple[Withdrawal, ...] = ()


class OperatorRequests:
    """Reads ``<run dir>/operator/withdrawn.json`` (a missing file: nothing withdrawn)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / WITHDRAWN_FILE

    def read(self) -> WithdrawnFile:
        if not self.path.is_file():
            return WithdrawnFile()
        try:
            return WithdrawnFile.model_validate_json(self.path.read_text())
        except (OSError, ValueError, ValidationError) as exc:
            raise ValueError(one_line(exc, str(self.path)) + ": rewrite it with 'alignfl withdraw'") from exc

    def withdrawn(self) -> list[str]:
        """The silos the operator withdrew; an unreadable file is logged and changes nothing this round."""
        try:
            return [w.silo for w in self.read().withdrawals]
        except ValueError as exc:
            log.error("alignfl: %s", exc)
            return []


def withdraw(run_dir: Path, silo: str, reason: str = "") -> Path:
    """Record that ``silo`` leaves the run at the next round: its generator leaves the store and the synthesis,
    and its node is not asked again. Idempotent."""
    check_name(silo)
    requests = OperatorRequests(run_dir)
    current = requests.read()
    if silo in {w.silo for w in current.withdrawals}:
        return requests.path
    updated = WithdrawnFile(
        withdrawals=(*current.withdrawals, Withdrawal(silo=silo, reason=reason, requested_at=time.time()))
    )
    requests.path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(requests.path, updated.model_dump_json(indent=1))
    return requests.path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="alignfl withdraw",
        description=(
            "Withdraw a silo from a run: at the next round its generator leaves the store and the synthesis and its "
            "node is no longer asked; summary.json records the round."
        ),
    )
    parser.add_argument("run_dir", type=Path, help="the run's results folder, e.g. results/study-1")
    parser.add_argument("silo", help="the silo's name (one of the run's silo-names)")
    parser.add_argument("--reason", default="", help="recorded beside the withdrawal")
    args = parser.parse_args(argv)
    if not (args.run_dir / "summary.json").is_file():
        parser.error(f"{args.run_dir} holds no run (no summary.json): give the run's results folder")
    try:
        path = withdraw(args.run_dir, args.silo, args.reason)
    except ValueError as exc:
        parser.error(str(exc).splitlines()[0])
    print(f"withdrawn '{args.silo}' in {path}; it takes effect when the next round starts")
    return 0
