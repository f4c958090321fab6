"""Privacy accounting: the epsilon of a composition of subsampled Gaussian mechanisms, by Opacus' accountants."""

from __future__ import annotations

import warnings

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant

# Opacus' default RDP orders plus larger ones (small sampling rates x few steps want high orders).
RDP_ORDERS = [*RDPAccountant.DEFAULT_ALPHAS, *range(64, 513, 8)]
Mechanism = tuple[float, float, int]  # (noise multiplier, sample rate, steps) of a subsampled Gaussian


def epsilon_of(history: list[Mechanism], delta: float, accountant: str = "prv") -> float:
    """Epsilon of a composition of subsampled Gaussian mechanisms, by Opacus' PRV (an upper bound) or RDP
    accountant."""
    if not history:
        return 0.0
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore")
        if accountant == "prv":
            acc = PRVAccountant()
            acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
            return float(acc.get_epsilon(delta=delta, eps_error=0.01))
        acc = RDPAccountant()
        acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
        return float(acc.get_epsilon(delta=delta, alphas=RDP_ORDERS))
