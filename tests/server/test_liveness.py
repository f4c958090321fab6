"""A slow or dead silo costs about one reply time of the others, never the round-timeout, and cannot stretch its own
wait; a reply that comes after its phase stopped waiting still counts, in the next round."""

import time

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from alignfl_app.contract import records as P
from alignfl_app.server.liveness import ReplyDeadline, grace_quorum
from server_app.strategy import LateReply, collect_replies, pull_late, replies_queue, with_late
from tests.conftest import make_message, retrained
from tests.red_team.attack_kit import METRICS, NODE, make_strategy, reply


def test_the_rest_get_the_pace_of_those_that_replied_after_the_last_of_them():
    deadline = ReplyDeadline(timeout=3600.0)
    assert deadline.limit([3], {1: 10.0, 2: 12.0}, quorum=0) == 3600.0  # no quorum: up to round-timeout
    assert deadline.limit([3], {1: 10.0}, quorum=2) == 3600.0  # quorum not reached yet
    # the first round, no history: the last reply (12 s) plus the median of this phase's replies (11 s)
    assert deadline.limit([3], {1: 10.0, 2: 12.0}, quorum=2) == pytest.approx(23.0)
    deadline.learn({1: 10.0, 2: 12.0, 3: 400.0})
    deadline.learn({1: 10.0, 2: 12.0, 3: 900.0})
    # node 3's own (slow) history never stretches its own cut-off
    assert deadline.limit([3], {1: 9.0, 2: 11.0}, quorum=2) == pytest.approx(11.0 + 10.5)
    # ... but it is one of the others for node 2: a median over them, so one slow node moves it little
    assert deadline.limit([2], {1: 9.0, 3: 11.0}, quorum=2) <= 11.0 + 11.0
    assert ReplyDeadline(3600.0).limit([2], {1: 0.1, 3: 0.1}, quorum=2) == pytest.approx(0.1 + 2.0)  # the floor
    assert ReplyDeadline(timeout=5.0).limit([3], {1: 10.0, 2: 12.0}, quorum=2) == 5.0  # never past round-timeout
    assert ReplyDeadline(timeout=20.0).limit([]) == 20.0


def test_the_quorum_is_min_silos_else_half_the_silos_asked_and_none_in_a_simulation():
    assert grace_quorum(5, required=3) == 3
    assert grace_quorum(5, required=0) == 3 and grace_quorum(4, required=0) == 2 and grace_quorum(2, required=0) == 1
    assert grace_quorum(1, required=0) == 0  # a lone silo is waited for
    assert grace_quorum(5, required=0, queued=True) == 0  # a simulation: every silo, up to round-timeout
    assert grace_quorum(5, required=3, queued=True) == 3  # unless min-silos asks for a grace


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


def test_a_dead_node_costs_a_grace_period_not_the_round_timeout(in_a_server_app):
    deadline = ReplyDeadline(timeout=3600.0, grace_floor=0.5)
    deadline.learn({7: 0.1, 8: 0.1, 9: 0.2})  # earlier rounds: everyone answered within 0.2 s
    t0 = time.monotonic()
    replies = collect_replies(SilentNodeGrid(dead=8), train_messages((7, 8, 9), 2), deadline, poll=0.05)
    waited = time.monotonic() - t0
    assert sorted(r.metadata.src_node_id for r in replies) == [7, 9]
    assert 0.5 <= waited < 3.0  # the grace floor past the others' replies, not an hour
    assert deadline.seen[8] == [0.1]  # the dead node's history is unchanged
    assert deadline.owing(time.monotonic()) == {8}


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
                reply = Message(self.content(msg), reply_to=inbound)
                reply.metadata.created_at = self.clock.time() + delay
                self.outbox[inbound.metadata.message_id] = (self.clock.now + delay, reply)
        return ids

    def content(self, msg: Message) -> RecordDict:
        return RecordDict()

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
    assert clock.now == pytest.approx(13.0 + 11.5, abs=0.6)  # the last reply plus their median, not 3600 s
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


@pytest.mark.parametrize("required", [0, 4], ids=["default", "min-silos=4"])
def test_a_silo_replying_just_before_its_cut_off_cannot_ratchet_it(in_a_server_app, clock, required):
    """25 rounds of a silo that answers 0.2 s before it would be cut: its cut-off stays at the others' pace."""
    others = {1: 10.0, 2: 11.0, 3: 9.0, 4: 10.0}
    delays = {**others, 5: 0.0}
    grid, deadline, cuts = PacedGrid(clock, delays), ReplyDeadline(timeout=3600.0), []
    for rnd in range(1, 26):
        cut = deadline.limit([5], others, grace_quorum(5, required))
        delays[5] = cut - 0.2
        start = clock.now
        replies = collect_replies(grid, train_messages(delays, rnd), deadline, poll=0.1, required=required)
        assert len(replies) == 5 and deadline.late == {}  # it always made it
        assert clock.now - start == pytest.approx(cut - 0.2, abs=0.11)
        cuts.append(cut)
    assert deadline.usual(5) == pytest.approx(cuts[-1] - 0.2)  # its own pace is learned ...
    assert max(cuts) <= 2 * max(others.values())  # ... and never raised its cut-off: 2x the others' pace
    assert cuts[-1] == pytest.approx(cuts[1], abs=0.5)


def test_with_every_silo_required_one_slow_silo_does_not_hold_the_phase(in_a_server_app, clock):
    """The default (min-silos=0): once half the silos replied, a slow one gets their pace past the last reply."""
    delays = {1: 10.0, 2: 10.0, 3: 10.0, 4: 10.0, 5: 3000.0}
    grid, deadline = PacedGrid(clock, delays), ReplyDeadline(timeout=3600.0)
    for rnd in (1, 2, 3):  # the first round has no history; the later ones have
        start = clock.now
        replies = collect_replies(grid, train_messages(delays, rnd), deadline, required=0)
        assert sorted(r.metadata.src_node_id for r in replies) == [1, 2, 3, 4]
        assert clock.now - start <= 2 * 10.0 + 0.5  # not 3600 s: 2x the others' reply time
    deadline.learn({5: 30.0})  # even a slow silo that did reply before gets no more than the others' pace
    start = clock.now
    collect_replies(grid, train_messages(delays, 4), deadline, required=0)
    assert clock.now - start <= 2 * 10.0 + 0.5


@pytest.mark.parametrize("required", [0, 3], ids=["default", "min-silos=3"])
def test_an_honest_queue_is_not_cut(in_a_server_app, clock, required):
    """5 silos on 2 workers reply at 14, 14, 28, 28 and 42 s (which silo comes last changes from round to round):
    from the last reply, the others' pace always covers the next one."""
    nodes = [1, 2, 3, 4, 5]
    deadline = ReplyDeadline(timeout=3600.0)
    for rnd in range(1, 6):
        order = nodes[rnd % 5 :] + nodes[: rnd % 5]
        grid = PacedGrid(clock, dict(zip(order, (14.0, 14.0, 28.0, 28.0, 42.0), strict=True)))
        start = clock.now
        replies = collect_replies(grid, train_messages(nodes, rnd), deadline, required=required)
        assert len(replies) == 5 and deadline.late == {}
        assert clock.now - start == pytest.approx(42.0, abs=0.6)


def test_a_simulation_waits_for_a_slower_architecture_queued_behind_faster_ones(in_a_server_app, clock):
    """mlp silos train 14 s, conv-deep ones 77 s, on 2 Ray workers: the conv-deep replies come at 91 and 105 s. Cut
    or not would depend on timing, so a simulation waits for every silo by default."""
    delays = {1: 14.0, 2: 14.0, 3: 28.0, 4: 91.0, 5: 105.0}
    replies = collect_replies(PacedGrid(clock, delays), train_messages(delays), ReplyDeadline(3600.0), queued=True)
    assert len(replies) == 5 and clock.now == pytest.approx(105.0, abs=0.6)
    cut = collect_replies(PacedGrid(clock, delays), train_messages(delays), ReplyDeadline(3600.0), queued=False)
    assert len(cut) == 3  # in a deployment they would be cut, and their replies count in the next round


def test_replies_queue_only_on_flowers_in_memory_grid():
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    assert replies_queue(InMemoryGrid.__new__(InMemoryGrid))
    assert not replies_queue(PacedGrid(FakeClock(), {}))


def test_a_late_train_reply_is_kept_for_the_next_phase(in_a_server_app, clock):
    delays = {1: 10.0, 2: 10.0, 3: 10.0, 4: 40.0}
    grid, deadline = PacedGrid(clock, delays), ReplyDeadline(timeout=3600.0)
    first = collect_replies(grid, train_messages(delays), deadline)
    assert len(first) == 3 and clock.now == pytest.approx(20.0, abs=0.6)  # cut at 10 + 10 s
    assert deadline.owing(clock.now) == {4}
    # round 2, while node 4 still trains: not asked again; its reply comes during the phase (held by min-silos=3
    # and node 1's 25 s) and is kept
    delays[1] = 25.0
    late: list[LateReply] = []
    second = collect_replies(grid, train_messages([1, 2, 3], 2), deadline, required=3, late=late)
    assert [(e.message.metadata.src_node_id, e.server_round) for e in late] == [(4, 1)]
    assert deadline.owing(clock.now) == set() and deadline.usual(4) == pytest.approx(40.0)  # its pace learned
    replies, rounds = with_late(second, late)
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 2, 3, 4]
    assert rounds == {late[0].message.metadata.reply_to_message_id: 1}
    # round 3: node 4 asked again, cut again; its reply comes between phases, pulled before the next one
    delays[1] = 10.0
    collect_replies(grid, train_messages([1, 2, 3, 4], 3), deadline)
    clock.sleep(60.0)
    late = []
    pull_late(grid, deadline, late)
    assert [(e.message.metadata.src_node_id, e.server_round) for e in late] == [(4, 3)]
    # node 4 is free again; when it answers round 4 in time, that reply supersedes its older one
    current = collect_replies(grid, train_messages([1, 2, 3, 4], 4), deadline, required=4)
    replies, rounds = with_late(current, late)
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 2, 3, 4] and rounds == {}


def test_a_reply_owed_longer_than_round_timeout_is_given_up_on(in_a_server_app, clock):
    grid, deadline = PacedGrid(clock, {1: 1.0, 2: 1.0, 3: None}), ReplyDeadline(timeout=100.0)
    collect_replies(grid, train_messages([1, 2, 3]), deadline)
    assert deadline.owing(clock.now + 90.0) == {3}
    assert deadline.owing(clock.now + 110.0) == set() and deadline.late == {}


class SiloGrid(PacedGrid):
    """Real train replies (the ``trained`` decoders, moved a little each round) and evaluate replies; records
    which node was sent what."""

    def __init__(self, clock: FakeClock, delays: dict[int, float], outs: dict) -> None:
        super().__init__(clock, delays)
        self.outs, self.sent = outs, []

    def content(self, msg: Message) -> RecordDict:
        node, kind = msg.metadata.dst_node_id, msg.metadata.message_type
        rnd = int(msg.content[P.CONFIG][P.SERVER_ROUND])
        self.sent.append((rnd, kind, node))
        if kind == MessageType.EVALUATE:
            return RecordDict({P.METRICS: MetricRecord({"num-examples": 10, "accuracy": 0.5})})
        desc, state = self.outs[node - NODE[0]]
        return reply(node, desc, retrained(state, rnd), metrics=METRICS).content


def test_the_round_loop_counts_a_late_train_reply_once_in_the_round_it_is_pulled_in(
    in_a_server_app, clock, trained, tmp_path
):
    """Silo 2 takes 45 s where the others take 10 s: cut in round 1 (at 20 s), not asked again in round 2 while it
    trains nor to evaluate while it owes a train reply; its round-1 reply, in before round 3, counts in round 3 and
    frees it to be asked again."""
    cfg, outs = trained
    strategy = make_strategy(cfg, tmp_path)
    grid = SiloGrid(clock, {NODE[0]: 10.0, NODE[1]: 10.0, NODE[2]: 45.0}, outs)
    strategy.start(grid, ArrayRecord(), num_rounds=4, timeout=3600.0)
    assert [(r, k) for r, k, n in grid.sent if n == NODE[2]] == [(1, MessageType.TRAIN), (3, MessageType.TRAIN)]
    rounds = {r["round"]: r for r in strategy.core.recorder.summary["rounds"]}
    assert [rounds[r]["accepted-replies"] for r in (1, 2, 3, 4)] == [2, 2, 3, 2]
    assert [rounds[r]["missing-replies"] for r in (1, 2, 3, 4)] == [[f"node-{NODE[2]}"]] * 2 + [[], ["silo-2"]]
    assert rounds[3]["silos"]["silo-2"]["reply-to-round"] == 1 and "reply-to-round" not in rounds[3]["silos"]["silo-0"]
    assert rounds[3]["rejected-replies"] == [] and strategy.core.store.entry("silo-2")["stored_round"] == 3
    assert clock.now == pytest.approx(4 * (20.0 + 10.0) - 2 * 10.0, abs=2.0)  # train phases of 20 s or 10 s
