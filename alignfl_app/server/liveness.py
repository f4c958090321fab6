"""How long a round waits for its replies: a dead silo should cost seconds, not the whole round-timeout.

Each phase of a round (train, evaluate) keeps its own ``ReplyDeadline``; times are seconds since the phase
started. Two rules, never past ``round-timeout``:

* until ``required`` replies are in (``min-silos``: every silo by default), a node is waited for at most
  ``factor`` times its usual reply time (never less than ``floor`` seconds), or the whole round-timeout while it
  has no history (the first round, a new node);
* once ``required`` replies are in, the rest get a grace period derived from the replies seen:
  ``grace_factor`` times the larger of the typical reply time (the median of this round's replies and the
  earlier rounds' ones) and the node's own usual time, at least ``grace_floor`` seconds. A dead node is given
  up on about half a reply time after the others answered.

A slow but live silo is learned across rounds: a reply that comes after its round stopped waiting is still
pulled in the next phase (and discarded) so that its reply time enters the node's history; from then on the
grace period covers its own pace. Flower's own error reply for a node it has marked offline (no heartbeat for
2 x 30 s) ends the wait for that node and is never learned as a reply time.
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
    grace_factor: float = 1.5
    grace_floor: float = 2.0
    history: int = 5  # reply times remembered per node
    pooled: int = 50  # reply times of all nodes remembered for the typical time
    seen: dict[int, list[float]] = field(default_factory=dict)
    recent: list[float] = field(default_factory=list)
    late: dict[str, tuple[int, float, float]] = field(default_factory=dict)  # message id -> (node, phase start
    # on the monotonic clock, the same on the wall clock)

    def usual(self, node: int) -> float | None:
        times = self.seen.get(node)
        return statistics.median(times) if times else None

    def typical(self, this_round: Iterable[float] = ()) -> float | None:
        """The median reply time of this round's replies and the earlier rounds' ones."""
        times = [*this_round, *self.recent]
        return statistics.median(times) if times else None

    def limit(self, waiting: Iterable[int], arrived: dict[int, float] | None = None, required: int = 0) -> float:
        """Seconds after the start of the phase at which to stop waiting for ``waiting``, given the reply times
        ``arrived`` so far in this phase and the ``required`` number of replies."""
        waiting = list(waiting)
        arrived = arrived or {}
        usual = [self.usual(n) for n in waiting]
        if not usual or any(u is None for u in usual):
            limit = self.timeout
        else:
            limit = min(self.timeout, max(self.floor, self.factor * max(usual)))
        if required <= 0 or len(arrived) < required or not waiting:
            return limit
        pace = max([self.typical(arrived.values()) or 0.0, *(u for u in usual if u is not None)])
        return min(limit, max(self.grace_floor, self.grace_factor * pace))

    def learn(self, arrived: dict[int, float]) -> None:
        """Remember the reply times (seconds since the phase started) of the nodes that answered."""
        for node, seconds in arrived.items():
            self.seen[node] = [*self.seen.get(node, []), seconds][-self.history :]
        self.recent = [*self.recent, *arrived.values()][-self.pooled :]

    def expect_late(self, message_id: str, node: int, started: float, started_wall: float) -> None:
        """A message whose reply the phase stopped waiting for: pulled later to learn the node's pace."""
        self.late[message_id] = (node, started, started_wall)

    def learn_late(self, message_id: str, now: float, created_wall: float | None = None) -> None:
        """A reply that came after its phase stopped waiting: its node's (long) reply time is learned, from the
        reply's creation time when plausible (the pull may come much later), else from when it was pulled."""
        node, started, started_wall = self.late.pop(message_id)
        pulled = now - started
        created = (created_wall - started_wall) if created_wall else 0.0
        self.learn({node: created if 0.0 < created < pulled else pulled})
