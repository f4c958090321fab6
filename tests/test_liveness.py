"""A dead silo costs seconds: each phase waits for a node at most a multiple of its usual reply time."""

import time

import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from flwr.supercore.task_identity import TaskIdentity

from alignfl_app import protocol as P
from alignfl_app.liveness import ReplyDeadline
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
    messages = [Message(RecordDict({P.CONFIG: ConfigRecord({P.SERVER_ROUND: 2})}), dst_node_id=n,
                        message_type=MessageType.TRAIN) for n in (7, 8, 9)]
    t0 = time.monotonic()
    replies = collect_replies(SilentNodeGrid(dead=8), messages, deadline, poll=0.05)
    waited = time.monotonic() - t0
    assert sorted(r.metadata.src_node_id for r in replies) == [7, 9]
    assert 0.5 <= waited < 3.0  # the floor, not an hour
    assert deadline.seen[8] == [0.1]  # the dead node's history is unchanged
