"""How long a round waits for its replies: a slow or dead silo costs about one reply time of the others, never
the whole round-timeout, and it cannot stretch its own wait.

Each phase of a round (train, evaluate) keeps its own ``ReplyDeadline``; times are seconds since the phase
started. The rule, never past ``round-timeout``:

* a phase waits for every node until its quorum of replies is in: ``min-silos`` when set (when it is not below
  the number of nodes asked, every one is waited for), by default (``min-silos=0``) half of the nodes asked,
  rounded up, so that one slow silo cannot hold the others;
* from then on the nodes still waited for get until the phase's *last* reply so far plus the pace of the nodes
  that replied: ``grace_factor`` (1) x the median of their reply times in this phase and their remembered
  earlier ones, at least ``grace_floor`` (2 s). A waiting node's own history never enters its cut-off, so a
  silo that replies just before it each round cannot ratchet it up; a phase that a slow silo holds lasts at
  most one median reply time of the others past their last reply, so a round costs at most about twice a
  clean one. The first round needs no history: the pace is that of the phase's own replies.

Why from the last reply: where silos share workers, honest replies queue (5 silos on 2 Ray workers reply at
14, 14, 28, 28, 42 s), but while the queue moves, a reply comes at least every reply time of its silos, and the
median of the replies so far is at least that (14, 14, 28, 28: the last silo gets 21 s past 28 s and needs 14),
so a queued silo of the same pace is not cut. A slower
architecture queued behind faster ones (``conv-deep`` trains 79 s where ``mlp`` trains 14 s) can still be, and
whether it is would depend on timing; so in a simulation (``queued``: Flower's in-memory grid) the default has no
quorum: every silo is waited for, up to round-timeout, and results do not depend on timing. Only an explicit
``min-silos`` gives a simulation's stragglers a grace period.

A reply that comes after its phase stopped waiting is a real reply: its node owes it (``late``) and is not sent
another message of that phase (nor asked to evaluate while it owes a train reply) until it comes, or until
round-timeout after its phase started, when it is given up on. It is pulled in a later phase: a train reply
counts in the round it is pulled in (its generator is stored then, unless the same node's newer reply comes in
that round too: a silo never has two replies counted in a round); an evaluate reply judged an older global model:
it only teaches its node's pace and is discarded. Flower's own error reply for a node it has marked offline (no
heartbeat for 2 x 30 s) ends the wait for that node and is never learned as a reply time.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple


def grace_quorum(asked: int, required: int, queued: bool = False) -> int:
    """Replies of a phase after which the rest get only a grace period; 0: none (wait up to round-timeout).

    ``required``: min-silos (0: half of the ``asked``, none where ``queued``: the silos share workers)."""
    if required > 0:
        return required
    return 0 if queued or asked < 2 else math.ceil(asked / 2)


class Unanswered(NamedTuple):
    """A message whose phase stopped waiting for its reply."""

    node: int
    started: float  # its phase's start on the monotonic clock
    started_wall: float  # the same on the wall clock
    server_round: int | None  # the round it asked for


@dataclass
class ReplyDeadline:
    timeout: float  # round-timeout: never wait longer
    grace_factor: float = 1.0
    grace_floor: float = 2.0
    history: int = 5  # reply times remembered per node
    seen: dict[int, list[float]] = field(default_factory=dict)
    late: dict[str, Unanswered] = field(default_factory=dict)  # message id -> what it asked

    def usual(self, node: int) -> float | None:
        times = self.seen.get(node)
        return statistics.median(times) if times else None

    def pace(self, arrived: dict[int, float]) -> float | None:
        """The median reply time of the nodes that replied in this phase: this phase's and their earlier ones."""
        times = [*arrived.values(), *(t for node in arrived for t in self.seen.get(node, ()))]
        return statistics.median(times) if times else None

    def limit(self, waiting: Iterable[int], arrived: dict[int, float] | None = None, quorum: int = 0) -> float:
        """Seconds after the start of the phase at which to stop waiting for ``waiting``, given the reply times
        ``arrived`` so far in this phase (other nodes only) and the ``quorum`` (see ``grace_quorum``)."""
        waiting = set(waiting)
        arrived = {n: t for n, t in (arrived or {}).items() if n not in waiting}
        pace = self.pace(arrived)
        if quorum <= 0 or len(arrived) < quorum or pace is None:
            return self.timeout
        return min(self.timeout, max(arrived.values()) + max(self.grace_floor, self.grace_factor * pace))

    def learn(self, arrived: dict[int, float]) -> None:
        """Remember the reply times (seconds since the phase started) of the nodes that answered."""
        for node, seconds in arrived.items():
            self.seen[node] = [*self.seen.get(node, []), seconds][-self.history :]

    def expect_late(
        self, message_id: str, node: int, started: float, started_wall: float, server_round: int | None = None
    ) -> None:
        """A message whose reply the phase stopped waiting for: its node owes it, and it is pulled later."""
        self.late[message_id] = Unanswered(node, started, started_wall, server_round)

    def owing(self, now: float) -> set[int]:
        """Nodes that owe this phase a reply (not sent another message of it meanwhile); one owed for longer than
        round-timeout since its phase started is given up on."""
        self.late = {m: u for m, u in self.late.items() if now - u.started <= self.timeout}
        return {u.node for u in self.late.values()}

    def learn_late(self, message_id: str, now: float, created_wall: float | None = None) -> Unanswered:
        """A reply that came after its phase stopped waiting: its node's (long) reply time is learned, from the
        reply's creation time when plausible (the pull may come much later), else from when it was pulled."""
        owed = self.late.pop(message_id)
        pulled = now - owed.started
        created = (created_wall - owed.started_wall) if created_wall else 0.0
        self.learn({owed.node: created if 0.0 < created < pulled else pulled})
        return owed
