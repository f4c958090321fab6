"""The layout of a silo's own folder (``silo-dir``): what it keeps there and never sends.

``privacy-policy.toml`` (its operator's terms), ``privacy-ledger.json`` (its lifetime spending), ``reports/``
(the figures of its private rounds, ``failures.log``), ``audits/`` (outlier-audit figures), ``state/<run>/`` (its
VAEs between rounds) and, for a simulated silo, ``node-config.toml`` (its own node config).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LEDGER_FILE = "privacy-ledger.json"
REPORTS_DIR = "reports"
FAILURES_LOG = "failures.log"
AUDITS_DIR = "audits"
STATE_DIR = "state"
STATE_HEADER = "state.json"
NODE_CONFIG_FILE = "node-config.toml"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


class SiloRecords:
    """What a silo's folder says about its private past outside its ledger: its private round reports, its
    failure log, and the DP carry and ledger anchor of each stored state."""

    def __init__(self, silo_dir: Path) -> None:
        self.dir = Path(silo_dir)

    def reports(self) -> list[Path]:
        return sorted((self.dir / REPORTS_DIR).glob("round-*.json"))

    def state_headers(self) -> list[Path]:
        return sorted((self.dir / STATE_DIR).glob(f"*/{STATE_HEADER}"))

    def private_evidence(self) -> Path | None:
        """A file showing that this silo trained privately (a private round's report, the failure log of a private
        round, a stored state with a DP carry), or None."""
        reports = self.reports()
        if reports:
            return reports[-1]
        if (self.dir / REPORTS_DIR / FAILURES_LOG).is_file():
            return self.dir / REPORTS_DIR / FAILURES_LOG
        return next((h for h in self.state_headers() if _read_json(h).get("dp")), None)

    def anchors(self) -> list[tuple[Path, Any]]:
        """Every ledger anchor (``{"entries", "head"}``, unchecked) a report or a state header recorded."""
        found: list[tuple[Path, Any]] = []
        for path in self.reports():
            raw = _read_json(path)
            if "ledger-entries" in raw or "ledger-head" in raw:
                found.append((path, {"entries": raw.get("ledger-entries"), "head": raw.get("ledger-head")}))
        for path in self.state_headers():
            raw = _read_json(path)
            if raw.get("ledger") is not None:
                found.append((path, raw["ledger"]))
        return found

    def relative(self, path: Path) -> str:
        """``<silo-dir>/...``: the silo's paths stay off the server."""
        try:
            return f"<silo-dir>/{path.relative_to(self.dir)}"
        except ValueError:
            return str(path)
