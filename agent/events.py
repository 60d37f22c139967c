"""The agent's event stream: one JSON object per event on a ZeroMQ PUB socket (`<runtime-dir>/events.sock`).

Events: `state` (every state change, with the reason; the first is `starting`, left once the hardware check
passes), `job` (a line of a job's output: episode progress,
verdicts, rollout reports), `lease` (granted, renewed is not published, ended), `progress` (a training lease holder's
steps done of the round's budget and last loss, as its renewals report them), `round` (a round's global policy
arrived in the store: version, run, round and the node's held-out loss), `supernode` and `learn-worker` (the
supervised processes: `status` started, exited with `returncode` and `restart_in_s`, or failed with `error` and
`restart_in_s`), `config` (reloaded or refused). Each carries `type`, `t` (Unix time) and its fields. PUB drops
events for a slow subscriber instead of blocking the agent, and a subscriber sees only what is published after
it connects: `zk0ctl events` follows the stream, it is not a log (journald is).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import zmq


class EventPublisher:
    def __init__(self, address: str) -> None:
        self.address = address
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.PUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SNDHWM, 1000)
        self._socket.bind(address)
        self._lock = threading.Lock()  # ZeroMQ sockets are not thread-safe; the control thread publishes too

    def publish(self, kind: str, /, **fields: Any) -> None:
        message = json.dumps({"type": kind, "t": round(time.time(), 3), **fields}, default=str)
        with self._lock:
            try:
                self._socket.send_string(message, zmq.NOBLOCK)
            except zmq.Again:  # nobody keeps up: drop, never block the agent
                pass

    def close(self) -> None:
        with self._lock:
            self._socket.close()
            self._context.term()


def follow(address: str, poll_s: float = 0.5, until: float | None = None) -> Iterator[dict[str, Any]]:
    """The events published at `address` from now on (until time.monotonic() passes `until`, if given)."""
    context = zmq.Context()
    socket = context.socket(zmq.SUB)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt_string(zmq.SUBSCRIBE, "")
    socket.connect(address)
    try:
        while until is None or time.monotonic() < until:
            if socket.poll(int(poll_s * 1000)):
                try:
                    yield json.loads(socket.recv())
                except (UnicodeDecodeError, json.JSONDecodeError):
                    continue
    finally:
        socket.close()
        context.term()
