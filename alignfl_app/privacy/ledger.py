"""A silo's privacy ledger: its lifetime spending, kept beside its policy in ``<silo-dir>/privacy-ledger.json``.

Every round is booked before it trains, under an exclusive file lock, re-read from disk each time (another run
may share the silo). The ledger carries its own integrity: each entry holds the SHA-256 of the previous entry's
hash and its own fields, the chain starting from a hash of the silo's identity (name, accountant, delta, first
cap). The silo's private reports (``reports/round-NNN.json``) and its stored state (``state/<run>/state.json``)
record the chain's length and head hash after each round: anchors outside the ledger. Reading the ledger checks
the chain and every anchor, so an edited entry, a ledger restored from an older copy or one deleted while the
silo has private history refuses training in one line instead of resetting the budget.

What this does not stop: a silo operator who rewrites the ledger, every report and every state header together
(the silo owns its disk); the ledger protects the silo's own budget against accidents and against everyone else.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict

from alignfl_app.files import atomic_write_text
from alignfl_app.privacy.accounting import Mechanism, epsilon_of
from alignfl_app.privacy.errors import PrivacyBudgetExceeded
from alignfl_app.privacy.policy import POLICY_FILE, SiloPrivacyPolicy
from alignfl_app.silo.folder import LEDGER_FILE, SiloRecords

if TYPE_CHECKING:
    from alignfl_app.privacy.dpsgd import DPPlan

LEDGER_FORMAT = 2  # the newest ledger format this code reads and writes; format 1 (no hash chain) is read
WHERE = f"<silo-dir>/{LEDGER_FILE}"


class LedgerAnchor(BaseModel):
    """The ledger's length and head hash after a round, recorded outside the ledger (reports, state)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    entries: int
    head: str

    def report(self) -> dict[str, int | str]:
        """The anchor as keys of a private round's report."""
        return {"ledger-entries": self.entries, "ledger-head": self.head}


class LedgerEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run: str
    round: int
    mechanisms: list[tuple[float, float, int]]
    epsilon_after: float
    booked_at: float  # unix time
    hash: str = ""  # SHA-256 of the previous hash and this entry's other fields (format 1: absent)


class LedgerState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal[1, 2] = 1  # absent: written before the field existed
    silo: str
    accountant: Literal["prv", "rdp"]
    delta: float
    first_run_epsilon: float  # the lifetime cap when the silo's policy sets none
    entries: list[LedgerEntry] = []

    @property
    def history(self) -> list[Mechanism]:
        return [tuple(m) for e in self.entries for m in e.mechanisms]

    def genesis(self) -> str:
        """The chain's start: a hash of the silo's identity and the ledger's terms."""
        terms = {
            "silo": self.silo,
            "accountant": self.accountant,
            "delta": self.delta,
            "first_run_epsilon": self.first_run_epsilon,
        }
        return _sha256("alignfl-ledger", terms)

    def chain(self) -> list[str]:
        """The hash after each entry, recomputed from the entries (index 0: the genesis)."""
        hashes = [self.genesis()]
        for entry in self.entries:
            hashes.append(_sha256(hashes[-1], entry.model_dump(exclude={"hash"})))
        return hashes

    @property
    def anchor(self) -> LedgerAnchor:
        return LedgerAnchor(entries=len(self.entries), head=self.chain()[-1])

    def append(self, entry: LedgerEntry) -> None:
        """Add a booked round, chained to the one before (a format-1 ledger is chained from here on)."""
        self.entries.append(entry)
        self.format = LEDGER_FORMAT
        hashes = self.chain()
        for e, h in zip(self.entries, hashes[1:], strict=True):
            e.hash = h


def _sha256(prefix: str, fields: dict) -> str:
    return hashlib.sha256((prefix + json.dumps(fields, sort_keys=True)).encode()).hexdigest()


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (another process booking the same ledger waits)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class PrivacyLedger:
    """A silo's lifetime privacy spending, beside its policy: every round booked before it trains, under a lock,
    re-read and checked from disk each time, never reset by anything the run sends."""

    def __init__(self, silo_dir: Path, silo: str) -> None:
        self.dir, self.silo = Path(silo_dir), silo
        self.path = self.dir / LEDGER_FILE
        self.lock = self.dir / (LEDGER_FILE + ".lock")
        self.records = SiloRecords(self.dir)

    def _blocked(self, why: str) -> PrivacyBudgetExceeded:
        return PrivacyBudgetExceeded(
            f"silo '{self.silo}': its privacy ledger {WHERE} {why}; its operator must "
            "restore the newest copy from a backup (training stays blocked: a lost or "
            "changed ledger must not reset the budget)"
        )

    def read(self) -> LedgerState | None:
        """The checked ledger, or None for a silo without one and without private history."""
        if not self.path.is_file():
            evidence = self.records.private_evidence()
            if evidence is not None:
                raise self._blocked(f"is missing although {self.records.relative(evidence)} shows private training")
            return None
        try:
            text = self.path.read_text()
            version = json.loads(text).get("format", 1)
        except (ValueError, AttributeError):
            version = LEDGER_FORMAT  # unreadable: refused below
        if isinstance(version, int) and version > LEDGER_FORMAT:
            raise PrivacyBudgetExceeded(
                f"silo '{self.silo}': its privacy ledger {WHERE} has format {version}, newer than "
                f"this alignfl reads ({LEDGER_FORMAT}): upgrade alignfl on this silo (training stays blocked until "
                "then)"
            )
        try:
            state = LedgerState.model_validate_json(text)
        except ValueError as exc:
            raise self._blocked(f"is unreadable ({type(exc).__name__})") from exc
        if state.silo != self.silo:
            raise PrivacyBudgetExceeded(
                f"silo '{self.silo}': its ledger {WHERE} belongs to silo "
                f"'{state.silo}': give each silo its own silo-dir"
            )
        self.check(state)
        return state

    def check(self, state: LedgerState) -> None:
        """The hash chain holds and every anchor outside the ledger is one of its prefixes."""
        hashes = state.chain()
        if state.format >= 2:
            broken = next((i for i, e in enumerate(state.entries) if e.hash != hashes[i + 1]), None)
            if broken is not None:
                raise self._blocked(
                    f"was edited (entry {broken + 1} of {len(state.entries)} does not match its hash chain)"
                )
        for path, raw in self.records.anchors():
            where = self.records.relative(path)
            try:
                anchor = LedgerAnchor.model_validate(raw)
            except ValueError as exc:
                raise self._blocked(f"cannot be checked: {where} records a malformed anchor") from exc
            if anchor.entries > len(state.entries):
                raise self._blocked(
                    f"holds {len(state.entries)} entries but {where} recorded {anchor.entries}: it "
                    "was rolled back or replaced"
                )
            if hashes[anchor.entries] != anchor.head:
                raise self._blocked(
                    f"does not match the head hash {where} recorded after entry {anchor.entries}: it "
                    "was edited or replaced"
                )

    def book(
        self, run: str, server_round: int, mechanisms: list[Mechanism], plan: DPPlan, policy: SiloPrivacyPolicy
    ) -> tuple[float, float, LedgerAnchor]:
        """Book a round before it trains (conservative if training then fails): (this run's epsilon after it, the
        lifetime epsilon after it, the ledger's anchor after it). Refused: a round outside the run's plan or
        booked before, a run passing its planned epsilon or the policy's max-epsilon, a lifetime past the budget,
        a ledger that fails its checks."""
        with locked(self.lock):
            state = self.read() or LedgerState(
                silo=self.silo,
                accountant=plan.accountant,
                delta=policy.max_delta,
                first_run_epsilon=epsilon_of(plan.planned_mechanisms, policy.max_delta, plan.accountant),
            )
            booked = [e for e in state.entries if e.run == run]
            if not 1 <= server_round <= plan.planned_rounds or any(e.round == server_round for e in booked):
                raise PrivacyBudgetExceeded(
                    f"silo '{self.silo}' refuses round {server_round} of run {run}: it plans rounds 1.."
                    f"{plan.planned_rounds} and trains each once (booked: {sorted(e.round for e in booked)}; a new run "
                    "needs its own run-name)"
                )
            run_history = [tuple(m) for e in booked for m in e.mechanisms] + list(mechanisms)
            run_after = epsilon_of(run_history, plan.delta, plan.accountant)
            run_cap = min(plan.planned_epsilon, policy.max_epsilon)
            if run_after > run_cap * (1 + 1e-6):
                raise PrivacyBudgetExceeded(
                    f"silo '{self.silo}' refuses round {server_round}: run {run} would spend epsilon {run_after:.3f} > "
                    f"{run_cap:.3f} (its plan, or max-epsilon in <silo-dir>/{POLICY_FILE}; ledger {WHERE})"
                )
            cap = policy.budget_epsilon if policy.budget_epsilon is not None else state.first_run_epsilon
            after = epsilon_of([*state.history, *mechanisms], state.delta, state.accountant)
            if after > cap * (1 + 1e-9):
                before = epsilon_of(state.history, state.delta, state.accountant)  # only for the message
                raise PrivacyBudgetExceeded(
                    f"silo '{self.silo}' refuses round {server_round}: it would spend epsilon {after:.3f} > its "
                    f"lifetime budget {cap:.3f} (spent {before:.3f}; ledger {WHERE}); only the silo's operator "
                    f"can allow more, with budget-epsilon in <silo-dir>/{POLICY_FILE}"
                )
            state.append(
                LedgerEntry(
                    run=run, round=server_round, mechanisms=list(mechanisms), epsilon_after=after, booked_at=time.time()
                )
            )
            atomic_write_text(self.path, state.model_dump_json(indent=1))
            return run_after, after, state.anchor
