"""How long a round waits for its replies: a dead silo should cost seconds, not the whole round-timeout.

Each phase of a round (train, evaluate) keeps its own ``ReplyDeadline``. It learns every node's usual reply
time across rounds; once a node has a history, the round waits for it at most ``factor`` times its usual time
(never less than ``floor`` seconds), so a slow but live silo keeps its pace and a dead one is given up on
quickly; the margins (3x, 60 s) absorb a machine that gets busier between rounds. A node without a history
(the first round, a new node) is waited for up to ``round-timeout``.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class ReplyDeadline:
    timeout: float  # round-timeout: never wait longer
    factor: float = 3.0
    floor: float = 60.0
    history: int = 5  # reply times remembered per node
    seen: dict[int, list[float]] = field(default_factory=dict)

    def usual(self, node: int) -> float | None:
        times = self.seen.get(node)
        return statistics.median(times) if times else None

    def limit(self, waiting: Iterable[int]) -> float:
        """Seconds after the start of the phase at which to stop waiting for ``waiting``."""
        usual = [self.usual(n) for n in waiting]
        if not usual or any(u is None for u in usual):
            return self.timeout
        return min(self.timeout, max(self.floor, self.factor * max(usual)))

    def learn(self, arrived: dict[int, float]) -> None:
        """Remember the reply times (seconds since the phase started) of the nodes that answered."""
        for node, seconds in arrived.items():
            self.seen[node] = [*self.seen.get(node, []), seconds][-self.history:]
