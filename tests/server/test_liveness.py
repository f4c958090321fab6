"""A dead silo costs seconds: each phase waits for a node at most a multiple of its usual reply time."""

import time

import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from alignfl_app.contract import records as P
from alignfl_app.server.liveness import ReplyDeadline
from server_app.strategy import collect_replies
from tests.conftest import make_message


def test_a_node_is_waited_for_by_its_usual_time_and_a_new_one_up_to_round_timeout():
    deadline = ReplyDeadline(timeout=3600.0, factor=2.0, floor=30.0)
    assert deadline.limit([1]) == 3600.0  # no history yet: the whole round-timeout
    deadline.learn({1: 40.0, 2: 5.0})
    deadline.learn({1: 60.0, 2: 7.0})
    deadline.learn({1: 50.0, 2: 6.0})
    assert deadline.limit([1]) == 100.0  # 2 x its median reply time
    assert deadline.limit([2]) == 30.0  # never below the floor
    assert deadline.limit([1, 3]) == 3600.0  # a node without history keeps the full timeout
    assert ReplyDeadline(timeout=20.0).limit([]) == 20.0
    short = ReplyDeadline(timeout=20.0)
    short.learn({1: 50.0})
    assert short.limit([1]) == 20.0  # never beyond round-timeout


class SilentNodeGrid:
    """Replies at once for every node but ``dead``, which never answers."""

    def __init__(self, dead: int) -> None:
        self.dead, self.outbox = dead, {}

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            inbound = make_message(msg.content, msg.metadata.message_type, src=1, dst=msg.metadata.dst_node_id)
            ids.append(inbound.metadata.message_id)
            if msg.metadata.dst_node_id != self.dead:
                self.outbox[inbound.metadata.message_id] = Message(RecordDict(), reply_to=inbound)
        return ids

    def pull_messages(self, message_ids):
        return [self.outbox.pop(m) for m in message_ids if m in self.outbox]


@pytest.fixture
def in_a_server_app():
    """What a ServerApp process has set when it builds Messages."""
    before = TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = before


def test_a_dead_node_costs_its_deadline_not_the_round_timeout(in_a_server_app):
    deadline = ReplyDeadline(timeout=3600.0, floor=0.5)
    deadline.learn({7: 0.1, 8: 0.1, 9: 0.2})  # earlier rounds: everyone answered within 0.2 s
    messages = [
        Message(
            RecordDict({P.CONFIG: ConfigRecord({P.SERVER_ROUND: 2})}), dst_node_id=n, message_type=MessageType.TRAIN
        )
        for n in (7, 8, 9)
    ]
    t0 = time.monotonic()
    replies = collect_replies(SilentNodeGrid(dead=8), messages, deadline, poll=0.05)
    waited = time.monotonic() - t0
    assert sorted(r.metadata.src_node_id for r in replies) == [7, 9]
    assert 0.5 <= waited < 3.0  # the floor, not an hour
    assert deadline.seen[8] == [0.1]  # the dead node's history is unchanged


def test_once_min_silos_replied_the_rest_get_a_grace_period_from_the_replies_seen():
    deadline = ReplyDeadline(timeout=3600.0)
    # the first round: nobody has a history; 2 of 3 replies in (min-silos=2) -> 1.5 x their median
    assert deadline.limit([3], {1: 10.0, 2: 12.0}, required=2) == pytest.approx(16.5)
    assert deadline.limit([3], {1: 10.0}, required=2) == 3600.0  # quorum not reached: the old rule
    assert deadline.limit([3], {1: 10.0, 2: 12.0}, required=0) == 3600.0  # no quorum asked for
    deadline.learn({1: 10.0, 2: 12.0, 3: 40.0})
    # a node known to be slow keeps its own pace; a fast one gets the grace of the typical time
    assert deadline.limit([3], {1: 9.0, 2: 11.0}, required=2) == pytest.approx(60.0)
    assert deadline.limit([2], {1: 9.0, 3: 11.0}, required=2) == pytest.approx(1.5 * 12.0)
    assert deadline.limit([2], {1: 0.1, 3: 0.1}, required=2) >= deadline.grace_floor
    assert ReplyDeadline(timeout=5.0).limit([3], {1: 10.0, 2: 12.0}, required=2) == 5.0  # never past round-timeout


class FakeClock:
    """Monotonic and wall time that advance only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return 1_000_000.0 + self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class PacedGrid:
    """Node ``n`` replies ``delays[n]`` seconds after a message reaches it; None: never (a dead node)."""

    def __init__(self, clock: FakeClock, delays: dict[int, float | None]) -> None:
        self.clock, self.delays, self.outbox = clock, delays, {}

    def get_node_ids(self):
        return list(self.delays)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            inbound = make_message(msg.content, msg.metadata.message_type, src=1, dst=msg.metadata.dst_node_id)
            ids.append(inbound.metadata.message_id)
            delay = self.delays[msg.metadata.dst_node_id]
            if delay is not None:
                reply = Message(RecordDict(), reply_to=inbound)
                reply.metadata.created_at = self.clock.time() + delay
                self.outbox[inbound.metadata.message_id] = (self.clock.now + delay, reply)
        return ids

    def pull_messages(self, message_ids):
        ready = [m for m in message_ids if m in self.outbox and self.outbox[m][0] <= self.clock.now]
        return [self.outbox.pop(m)[1] for m in ready]


def train_messages(nodes, server_round=1):
    return [
        Message(
            RecordDict({P.CONFIG: ConfigRecord({P.SERVER_ROUND: server_round})}),
            dst_node_id=n,
            message_type=MessageType.TRAIN,
        )
        for n in nodes
    ]


@pytest.fixture
def clock(monkeypatch):
    import server_app.strategy as strategy

    fake = FakeClock()
    monkeypatch.setattr(strategy, "time", fake)
    return fake


def test_a_node_dead_from_the_first_round_costs_a_grace_period(in_a_server_app, clock):
    grid = PacedGrid(clock, {1: 10.0, 2: 11.0, 3: 12.0, 4: 13.0, 5: None})
    deadline = ReplyDeadline(timeout=3600.0)
    replies = collect_replies(grid, train_messages(grid.delays), deadline, required=3)
    assert len(replies) == 4
    assert clock.now == pytest.approx(1.5 * 11.5, abs=0.6)  # not 3600 s, not the 60 s floor
    assert 5 not in deadline.seen


def test_a_node_killed_later_costs_seconds_every_round_after(in_a_server_app, clock):
    delays = {1: 10.0, 2: 11.0, 3: 12.0, 4: 13.0, 5: 10.5}
    grid = PacedGrid(clock, delays)
    deadline = ReplyDeadline(timeout=3600.0)
    collect_replies(grid, train_messages(delays), deadline, required=3)
    assert clock.now == pytest.approx(13.0, abs=0.6)
    delays[5] = None  # SIGKILLed
    for rnd in (2, 3):
        start = clock.now
        assert len(collect_replies(grid, train_messages(delays, rnd), deadline, required=3)) == 4
        assert clock.now - start <= 2 * 13.0  # within twice a clean round's wait


def test_a_slow_live_node_is_cut_once_then_its_pace_is_learned(in_a_server_app, clock):
    delays = {1: 10.0, 2: 10.0, 3: 10.0, 4: 40.0}
    grid = PacedGrid(clock, delays)
    deadline = ReplyDeadline(timeout=3600.0)
    first = collect_replies(grid, train_messages(delays), deadline, required=3)
    assert len(first) == 3 and clock.now < 20.0  # its first round, unknown: given up after the grace
    assert list(deadline.late.values())[0][0] == 4
    clock.sleep(60.0)  # the rest of the round; its late reply arrives meanwhile
    second = collect_replies(grid, train_messages(delays, 2), deadline, required=3)
    assert deadline.late == {} and deadline.usual(4) == pytest.approx(40.0)  # learned from the late reply
    assert len(second) == 4  # from now on waited for at its own pace
    assert sorted(r.metadata.src_node_id for r in second) == [1, 2, 3, 4]
