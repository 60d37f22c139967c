"""The warm learning worker: one long-lived process per host that does a node's learning work for its ClientApps.

Flower starts a fresh ClientApp process for every message; on its own, each one imports torch and lerobot and
builds the policy, processors and data again. With a worker (node config `learn-worker`, see
zk0.agent.client_app), the ClientApp only relays: it sends the message's content to the worker and returns
what the worker answers. The worker runs zk0.agent.node_work, the very code the ClientApp runs without it, and
keeps that module's session (policy bundle, processors, datasets, frame cache) warm between messages of a run,
so only a run's first training or evaluation message builds anything.

Transport: a dedicated ZeroMQ ROUTER socket with multipart frames, not the agent's JSON control API
(zk0.agent.control). Global parameters and updates are binary (tens of kB for the tiny model, ~400 MB for a
full-size SmolVLA in fp32): JSON would need base64 (+33 %, and an encode/decode pass over every byte), and the
control API's REP socket answers one request at a time, while a worker must answer pings and `stop` while a
job trains. Frames:

    request  [header, content]   header: {"kind": "query"|"train"|"evaluate", "job": "<id>", "run_id": 1,
                                          "node_id": 42, "node_config": {...}}   (JSON)
                                 content: the message's RecordDict in Flower's own protobuf (flwr.common.serde)
             [header]            {"kind": "ping"}, or {"kind": "stop", "job": "<id>"}
    reply    [header, content]   {"ok": true} + the reply's RecordDict, same encoding
             [header]            {"ok": true, "job": "<id running>"|null, "built": n, "progress": [steps, loss]|null}
                                 (ping: n policy + data builds so far, the running training's steps done and last
                                 loss), {"ok": true, "stopped": b} (stop), or {"ok": false, "error": "..."}

So a request carries exactly what the ClientApp received (content, run and node ids, node config) and a reply
exactly what it sends back. One job runs at a time (one node's messages are sequential); a job asked for while
another runs is refused ("busy"). `stop` sets the running job's stop flag, which training reads between steps
(a revoked lease: the steps done go back as a partial update); a job still running `stop_grace_s` after being
told to stop (stuck where it never reads the flag: a stalled disk, a deadlocked loader) makes the worker exit
with EXIT_JOB_STUCK, so its supervisor starts a fresh one instead of every later message being refused "busy".
Malformed, oversized or refused requests, and jobs that raise, get an error reply; nothing a request holds can
stop the worker. Requests over `max_request_bytes` are refused after receipt; frames over twice that are
dropped by ZeroMQ unread (no reply: the sender times out), so no request can exhaust memory. A worker started
with `--datasets` or `--policy-store` refuses node configs naming other datasets or another store. The
ClientApp's side is zk0.agent.worker_client.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
from flwr.app import Context, RecordDict
from flwr.common.serde import ProtoRecordDict, recorddict_from_proto, recorddict_to_proto

log = logging.getLogger("zk0.agent.learning_worker")

JOB_KINDS = ("query", "train", "evaluate")
KINDS = (*JOB_KINDS, "ping", "stop")
MAX_HEADER_BYTES = 64 << 10
DEFAULT_MAX_REQUEST_BYTES = 2 << 30  # a full-size SmolVLA global in fp32 is ~400 MB
# A training step of full-size SmolVLA takes ~12.5 s on a 2-core CPU: a job reads its stop flag that often.
DEFAULT_STOP_GRACE_S = 120.0
EXIT_JOB_STUCK = 3
NodeConfigValue = str | int | float | bool


@dataclass(frozen=True)
class WorkerRequest:
    """A well-formed request; `content` is None for ping and stop."""

    kind: str
    job: str = ""
    run_id: int = 0
    node_id: int = 0
    node_config: dict[str, NodeConfigValue] = field(default_factory=dict)
    content: RecordDict | None = None

    def context(self) -> Context:
        return Context(run_id=self.run_id, node_id=self.node_id, node_config=dict(self.node_config),
                       state=RecordDict(), run_config={})


def _id(header: Mapping[str, Any], key: str) -> int:
    value = header.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**64:
        raise ValueError(f'"{key}" must be an unsigned 64-bit integer')
    return value


def _job_id(header: Mapping[str, Any]) -> str:
    job = header.get("job")
    if not isinstance(job, str) or not 0 < len(job) <= 64:
        raise ValueError('"job" must be a string of 1 to 64 characters')
    return job


def _node_config(header: Mapping[str, Any]) -> dict[str, NodeConfigValue]:
    config = header.get("node_config")
    if not isinstance(config, dict) or len(config) > 64:
        raise ValueError('"node_config" must be an object of at most 64 keys')
    for key, value in config.items():
        if not isinstance(value, (str, int, float, bool)) or (isinstance(value, str) and len(value) > 4096):
            raise ValueError(f'node_config "{key[:64]}": must be a string (<= 4096 characters), number or boolean')
    return config


def parse_request(frames: Sequence[bytes], max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> WorkerRequest:
    """The request in `frames`, or ValueError saying what is wrong with it (never another exception)."""
    if not 1 <= len(frames) <= 2:
        raise ValueError(f"a request has 1 or 2 frames, got {len(frames)}")
    if len(frames[0]) > MAX_HEADER_BYTES:
        raise ValueError(f"request header over {MAX_HEADER_BYTES} bytes")
    try:
        header = json.loads(frames[0])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ValueError("request header is not JSON") from None
    if not isinstance(header, dict) or header.get("kind") not in KINDS:
        raise ValueError(f'request header must be an object with "kind" one of {", ".join(KINDS)}')
    kind = header["kind"]
    if kind not in JOB_KINDS:
        if len(frames) != 1:
            raise ValueError(f"{kind}: takes no content frame")
        return WorkerRequest(kind, _job_id(header) if kind == "stop" else "")
    if len(frames) != 2:
        raise ValueError(f"{kind}: needs a content frame (the message's RecordDict)")
    if len(frames[1]) > max_request_bytes:
        raise ValueError(f"{kind}: content of {len(frames[1])} bytes is over this worker's {max_request_bytes}")
    try:
        content = recorddict_from_proto(ProtoRecordDict.FromString(frames[1]))
    except Exception:  # untrusted bytes: whatever decoding them raises, it is a bad request
        raise ValueError(f"{kind}: content is not a Flower RecordDict") from None
    return WorkerRequest(kind, _job_id(header), _id(header, "run_id"), _id(header, "node_id"),
                         _node_config(header), content)


def check_allowed(config: Mapping[str, NodeConfigValue], datasets: Sequence[Path], policy_store: Path | None) -> None:
    """ValueError unless the node config names only datasets (and the policy store) this worker serves."""
    if datasets:
        allowed = {p.resolve() for p in datasets}
        for root in (p for p in str(config.get("dataset-roots", "")).split(",") if p):
            if Path(root).resolve() not in allowed:
                raise ValueError(f"dataset {root} is not served by this learning worker")
    if policy_store is not None and Path(str(config.get("policy-store", ""))).resolve() != policy_store.resolve():
        raise ValueError("this learning worker delivers to another policy store")


def error_reply(message: str) -> list[bytes]:
    return [json.dumps({"ok": False, "error": message}).encode()]


@dataclass
class Job:
    request: WorkerRequest
    peer: bytes
    stop: threading.Event = field(default_factory=threading.Event)
    progress: tuple[int, float] | None = None  # (steps done, last loss) of a training job, set by its thread
    stop_asked_at: float | None = None  # monotonic time `stop` was first set

    def ask_stop(self, now: float) -> None:
        self.stop.set()
        self.stop_asked_at = self.stop_asked_at if self.stop_asked_at is not None else now

    def record_step(self, done: int, loss: float) -> None:
        self.progress = (done, loss)  # one tuple assignment: the serving thread reads it whole


def stuck(stop_asked_at: float | None, now: float, grace_s: float) -> bool:
    """Whether a job told to stop at `stop_asked_at` (None: never told) has ignored it past `grace_s`."""
    return stop_asked_at is not None and now - stop_asked_at > grace_s


class JobStuck(RuntimeError):
    """A job did not stop within the grace period; the worker cannot serve again and must be restarted."""


class LearningWorker:
    """Serves learning requests at `address` from the calling thread (`serve`), jobs in a second thread."""

    def __init__(self, address: str, datasets: Sequence[Path] = (), policy_store: Path | None = None,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                 stop_grace_s: float = DEFAULT_STOP_GRACE_S) -> None:
        self.address, self.datasets, self.policy_store = address, list(datasets), policy_store
        self.max_request_bytes, self.stop_grace_s = max_request_bytes, stop_grace_s
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.MAXMSGSIZE, 2 * max_request_bytes)
        self._socket.bind(address)
        if address.startswith("ipc://"):
            os.chmod(address.removeprefix("ipc://"), 0o660)  # the host's zk0 user and group only
        # Finished jobs come back to the serving thread through `_done`, woken by one byte on an inproc pair
        # (ZeroMQ sockets are not thread-safe: only the serving thread touches the ROUTER socket).
        self._done: queue.Queue[tuple[bytes, list[bytes]]] = queue.Queue()
        self._wake_in = self._context.socket(zmq.PAIR)
        self._wake_in.bind(f"inproc://zk0-learning-worker-{id(self)}")
        self._wake_out = self._context.socket(zmq.PAIR)
        self._wake_out.connect(f"inproc://zk0-learning-worker-{id(self)}")
        self._job: Job | None = None
        self._thread: threading.Thread | None = None
        self.sessions_built = 0  # policy + data builds so far (the ping reports it: a warm worker's stays put)

    def serve(self, stop: threading.Event) -> None:
        """Answer requests until `stop` is set; a running job is then stopped at its next step and waited for.
        `JobStuck` when a job ignores its stop flag for `stop_grace_s`."""
        from zk0.agent import node_work  # the heavy imports, paid once at start rather than by the first message

        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._wake_in, zmq.POLLIN)
        while not stop.is_set():
            ready = dict(poller.poll(100))
            if self._wake_in in ready:
                self._wake_in.recv()
                self._send_finished()
            if self._socket in ready:
                peer, *frames = self._socket.recv_multipart()
                reply = self._answer(peer, frames[1:] if frames[:1] == [b""] else frames, node_work)
                if reply is not None:
                    self._socket.send_multipart([peer, b"", *reply])
            if self._job is not None and stuck(self._job.stop_asked_at, time.monotonic(), self.stop_grace_s):
                raise JobStuck(f"{self._job.request.kind} job {self._job.request.job} ignored its stop for "
                               f"{self.stop_grace_s:.0f} s")
        if self._job is not None and self._thread is not None:
            self._job.ask_stop(time.monotonic())
            self._thread.join(self.stop_grace_s)
            if self._thread.is_alive():
                raise JobStuck(f"{self._job.request.kind} job {self._job.request.job} did not stop within "
                               f"{self.stop_grace_s:.0f} s of shutdown")

    def _answer(self, peer: bytes, frames: list[bytes], node_work: Any) -> list[bytes] | None:
        """The immediate reply to a request, or None for a job started (its reply comes when it ends)."""
        try:
            request = parse_request(frames, self.max_request_bytes)
            if request.kind == "ping":
                job = self._job.request.job if self._job else None
                progress = self._job.progress if self._job else None
                return [json.dumps({"ok": True, "job": job, "built": self.sessions_built, "progress": progress}).encode()]
            if request.kind == "stop":
                stopped = self._job is not None and self._job.request.job == request.job
                if stopped:
                    self._job.ask_stop(time.monotonic())
                return [json.dumps({"ok": True, "stopped": stopped}).encode()]
            if self._job is not None:
                raise ValueError(f"busy with job {self._job.request.job}")
            check_allowed(request.node_config, self.datasets, self.policy_store)
        except ValueError as exc:
            return error_reply(str(exc))
        self._job = Job(request, peer)
        self._thread = threading.Thread(target=self._run, args=(self._job, node_work), name="zk0-learning-job",
                                        daemon=True)
        self._thread.start()
        return None

    def _run(self, job: Job, node_work: Any) -> None:
        request = job.request
        before = node_work.current_session()
        started = time.perf_counter()
        try:
            content = node_work.work(request.kind, request.content, request.context(), job.stop.is_set, job.record_step)
            reply = [b'{"ok": true}', recorddict_to_proto(content).SerializeToString()]
        except Exception as exc:  # a failing job must still answer, and the worker must go on
            log.exception("%s job %s failed", request.kind, request.job)
            reply = error_reply(f"{request.kind} failed: {type(exc).__name__}: {exc}")
        after = node_work.current_session()
        built = after is not None and after is not before
        self.sessions_built += built
        log.info("%s job %s: %.2f s%s", request.kind, request.job, time.perf_counter() - started,
                 ", policy and data built" if built else "")
        self._done.put((job.peer, reply))
        self._wake_out.send(b"")  # only job threads use this socket, one after the other

    def _send_finished(self) -> None:
        peer, reply = self._done.get_nowait()
        self._job = None
        self._socket.send_multipart([peer, b"", *reply])

    def close(self) -> None:
        for socket in (self._socket, self._wake_in, self._wake_out):
            socket.close()
        self._context.term()


# --- starting one ------------------------------------------------------------------------------------------

def worker_command(address: str, datasets: Sequence[Path] = (), policy_store: Path | None = None,
                   stop_grace_s: float = DEFAULT_STOP_GRACE_S) -> list[str]:
    """The command line of a learning worker at `address` serving `datasets` and delivering to `policy_store`
    (what `zk0 node --learn-worker`, `zk0 fleet local --learn-workers` and the agent start)."""
    command = [sys.executable, "-m", "zk0.cli", "learn-worker", "--socket", address,
               "--stop-grace-s", str(stop_grace_s)]
    if datasets:
        command += ["--datasets", *(str(p) for p in datasets)]
    if policy_store is not None:
        command += ["--policy-store", str(policy_store)]
    return command


def wait_until_ready(address: str, timeout_s: float, alive: Callable[[], bool] = lambda: True) -> bool:
    """True once the worker at `address` answers a ping; False after `timeout_s`, or as soon as not `alive()`."""
    from zk0.agent.worker_client import ping

    deadline = time.monotonic() + timeout_s
    while alive() and time.monotonic() < deadline:
        if ping(address, timeout_s=0.5) is not None:
            return True
    return False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", required=True, help="ZeroMQ address to serve, e.g. ipc:///run/zk0/learn.sock")
    parser.add_argument("--datasets", nargs="*", type=Path, default=[],
                        help="the only dataset roots requests may name (default: any)")
    parser.add_argument("--policy-store", type=Path, default=None,
                        help="the only policy store requests may deliver to (default: any)")
    parser.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES)
    parser.add_argument("--stop-grace-s", type=float, default=DEFAULT_STOP_GRACE_S,
                        help="exit (for the supervisor to restart) when a job runs this long after its stop "
                             f"(default {DEFAULT_STOP_GRACE_S:.0f})")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.stop_grace_s > 0:
        print(f"zk0 learn-worker: --stop-grace-s must be positive, not {args.stop_grace_s}", file=sys.stderr)
        return 2
    try:
        worker = LearningWorker(args.socket, args.datasets, args.policy_store, args.max_request_bytes,
                                args.stop_grace_s)
    except zmq.ZMQError as exc:
        print(f"zk0 learn-worker: cannot serve {args.socket}: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    log.info("learning worker serving %s", args.socket)
    try:
        worker.serve(stop)
    except JobStuck as stuck_job:
        log.error("%s: exiting so that a fresh worker takes over", stuck_job)
        return EXIT_JOB_STUCK
    finally:
        worker.close()
    return 0
