"""An in-process Flower Grid: every node runs the real ClientApp with its own persistent Context.

Lets tests drive the real ServerApp ``main`` round by round and inject what a federation does to a
server: a silo that never answers (died / timed out), one whose ClientApp raised, a server killed
(SIGKILL, no clean-up) when it reaches a round.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterable

from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from alignfl_app.config import ConfigError, parse_run_config, silos_root
from alignfl_app.contract import records as P
from alignfl_app.silo.setup import provision_simulated_silos
from client_app.app import app as client_app
from server_app.app import main as server_main
from tests.conftest import make_context, make_message

NODE_BASE = 1000


class LocalGrid(Grid):
    def __init__(
        self,
        run_config: dict,
        num_silos: int,
        faults: dict[tuple[int, int], str] | None = None,
        kill_at_round: int | None = None,
        node_base: int = NODE_BASE,
    ) -> None:
        self.node_base = node_base  # node ids are node_base + partition id (a new run may get new ids)
        # the silos' own setup, as alignfl run makes it (an invalid run config is the server's to refuse)
        with contextlib.suppress(ConfigError):
            provision_simulated_silos(silos_root(), parse_run_config(run_config))
        self.contexts = {node_base + p: make_context(run_config, p, node_id=node_base + p) for p in range(num_silos)}
        self.faults = faults or {}  # (round, partition) -> "timeout" | "error", train messages only
        self.kill_at_round = kill_at_round
        self.train_rounds: list[int] = []
        self.outbox: dict[str, Message] = {}  # reply_to message id -> reply

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message to its silo's ClientApp at once; its reply waits to be pulled."""
        ids = []
        for msg in messages:
            node, kind = msg.metadata.dst_node_id, msg.metadata.message_type
            rnd = int(msg.content[P.CONFIG][P.SERVER_ROUND])
            inbound = make_message(msg.content, kind, src=1, dst=node)
            ids.append(inbound.metadata.message_id)
            fault = None
            if kind == MessageType.TRAIN:
                self.train_rounds.append(rnd)
                if rnd == self.kill_at_round:
                    os.kill(os.getpid(), signal.SIGKILL)
                fault = self.faults.get((rnd, node - self.node_base))
            if fault == "timeout":
                continue
            if fault == "error":
                reply = Message(
                    error=Error(code=0, reason="ClientApp raised RuntimeError: disk full"), reply_to=inbound
                )
            else:
                reply = client_app(inbound, self.contexts[node])
            self.outbox[reply.metadata.reply_to_message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.outbox.pop(mid) for mid in message_ids if mid in self.outbox]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """What Flower's own round loop (the baselines) calls: every reply that is there."""
        return self.pull_messages(self.push_messages(messages))

    @property
    def run(self):
        return None

    def set_run(self, run_id: int) -> None:
        pass

    def create_message(self, *args, **kwargs) -> Message:
        raise NotImplementedError


def run_server(run_config: dict, num_silos: int = 3, **grid_options) -> LocalGrid:
    """Run the real ServerApp ``main`` against a LocalGrid; returns the grid (what it was asked)."""
    grid = LocalGrid(run_config, num_silos, **grid_options)
    main_context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=dict(run_config))
    before = TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id
    # what a ServerApp process has set when it builds Messages
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    try:
        server_main(grid, main_context)
    finally:
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = before
    return grid
