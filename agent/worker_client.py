"""The ClientApp's side of the learning worker (zk0.agent.learning_worker): send a message's content, follow the
job with heartbeats, ask it to stop when the lease is revoked, and give up at the message's deadline.

Imports no torch: a relaying ClientApp stays light.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq
from flwr.app import Context, RecordDict
from flwr.common.serde import ProtoRecordDict, recorddict_from_proto, recorddict_to_proto

PING_TIMEOUT_S = 5.0  # a worker's serving thread answers within milliseconds, even while a job trains
HEARTBEAT_S = 5.0  # how often a waiting ClientApp checks that the worker still runs its job (and its progress)
STOP_CHECK_S = 0.05  # how often it checks its stop condition (a revoked lease) while the job runs


@dataclass(frozen=True)
class WorkerFailure:
    """Why the worker gave no reply content: not answering, an error reply, the deadline passed."""

    reason: str


def exchange(context: zmq.Context, address: str, frames: list[bytes], timeout_s: float) -> list[bytes] | None:
    """One short request on a fresh REQ socket: the reply frames, or None when nothing answered in time."""
    socket = context.socket(zmq.REQ)
    socket.setsockopt(zmq.LINGER, 0)
    try:
        socket.connect(address)
        socket.send_multipart(frames)
        return socket.recv_multipart() if socket.poll(int(timeout_s * 1000)) else None
    finally:
        socket.close()


def ping(address: str, timeout_s: float = PING_TIMEOUT_S) -> dict[str, Any] | None:
    """The worker's answer to a ping (`{"ok": true, "job": ...}`), or None when none came within `timeout_s`."""
    context = zmq.Context()
    try:
        reply = exchange(context, address, [b'{"kind": "ping"}'], timeout_s)
        return json.loads(reply[0]) if reply else None
    finally:
        context.term()


def call(address: str, kind: str, content: RecordDict, context: Context, deadline: float,
         should_stop: Callable[[], bool] = lambda: False,
         on_progress: Callable[[int, float], None] | None = None) -> RecordDict | WorkerFailure:
    """The worker's reply content for a `kind` message, or why there is none. Never waits past `deadline`
    (monotonic seconds); asks the worker to stop the job as soon as `should_stop()`, then waits for the partial
    result; gives up early when the worker stops answering pings or no longer runs the job. Each heartbeat's
    training progress goes to `on_progress(steps_done, loss)`."""
    job = uuid.uuid4().hex
    header = {"kind": kind, "job": job, "run_id": context.run_id, "node_id": context.node_id,
              "node_config": dict(context.node_config)}
    stop = [json.dumps({"kind": "stop", "job": job}).encode()]
    zmq_context = zmq.Context()
    socket = zmq_context.socket(zmq.REQ)
    socket.setsockopt(zmq.LINGER, 0)
    try:
        if ping(address, min(PING_TIMEOUT_S, max(deadline - time.monotonic(), 0.0))) is None:
            return WorkerFailure(f"no learning worker answering at {address}")
        socket.connect(address)
        socket.send_multipart([json.dumps(header).encode(), recorddict_to_proto(content).SerializeToString()])
        stop_sent, next_heartbeat = False, time.monotonic() + HEARTBEAT_S
        while not socket.poll(int(STOP_CHECK_S * 1000)):
            now = time.monotonic()
            if now >= deadline:
                exchange(zmq_context, address, stop, 1.0)
                return WorkerFailure(f"the learning worker at {address} did not finish the {kind} job in time")
            if not stop_sent and should_stop():
                stop_sent = exchange(zmq_context, address, stop, PING_TIMEOUT_S) is not None
            if now >= next_heartbeat:
                answer = exchange(zmq_context, address, [b'{"kind": "ping"}'], PING_TIMEOUT_S)
                if answer is None:
                    return WorkerFailure(f"the learning worker at {address} stopped answering")
                heartbeat = json.loads(answer[0])
                # not running our job: it ended (its reply is on its way) or the worker restarted without it
                if heartbeat.get("job") != job and not socket.poll(1000):
                    return WorkerFailure(f"the learning worker at {address} lost the {kind} job (restarted?)")
                progress = heartbeat.get("progress")
                if on_progress is not None and heartbeat.get("job") == job and progress:
                    on_progress(int(progress[0]), float(progress[1]))
                next_heartbeat = now + HEARTBEAT_S
        reply = socket.recv_multipart()
        answer = json.loads(reply[0])
        if not answer.get("ok"):
            return WorkerFailure(f"learning worker: {answer.get('error', 'error reply')}")
        return recorddict_from_proto(ProtoRecordDict.FromString(reply[1]))
    finally:
        socket.close()
        zmq_context.term()
