"""Flower's side of a ServerApp process, for driving zk0's strategy in-process: the task identity Flower sets
before `main` runs (messages cannot be made without it), a grid that only lists nodes (the one grid call the
strategy makes itself), one that also answers what it is sent, and message ids given the way the grid gives
them when it pushes."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from flwr.app import Message
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


@contextmanager
def serverapp_identity(run_id: int = 1) -> Iterator[None]:
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


class ListingGrid(Grid):
    """Lists `listings` in turn (the last one repeats): nodes that connect or drop out between calls."""

    def __init__(self, *listings: list[int]) -> None:
        self.listings = [list(x) for x in listings]

    def get_node_ids(self) -> Iterable[int]:
        return list(self.listings.pop(0) if len(self.listings) > 1 else self.listings[0])

    def _not_here(self, *args, **kwargs):
        raise NotImplementedError("messages travel by hand in these tests")

    set_run = run = create_message = push_messages = pull_messages = send_and_receive = _not_here


def pushed(messages: Iterable[Message]) -> list[Message]:
    """The messages with the ids the grid gives them on push (what replies refer to)."""
    messages = list(messages)
    for message in messages:
        message.metadata.__dict__["_message_id"] = message.object_id
    return messages


class AnsweringGrid(ListingGrid):
    """Lists `node_ids` and answers each message sent with `answer(message)` (None: that node stays silent)."""

    def __init__(self, node_ids: list[int], answer: Callable[[Message], Message | None]) -> None:
        super().__init__(node_ids)
        self.answer = answer

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = [self.answer(m) for m in pushed(messages)]
        return [r for r in replies if r is not None]


class FakeClock:
    """A monotonic clock that only moves when slept on."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
