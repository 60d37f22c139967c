"""Training leases: a node trains only while the host's agent says the machine is free for it.

The agent (the zk0 daemon; `zk0 record` while it records) decides what the host does; a federation node
that is given an agent address (`agent-address` in its node config) asks it before each round's training
and keeps asking while it trains. The messages travel over the agent's control API (zk0.agent.control):

    {"command": "lease", "args": {"purpose": "train", "ttl_s": 30, "holder": "flower node 42"}}
        -> {"ok": true, "granted": true, "lease_id": "7f3a...", "ttl_s": 30}
        -> {"ok": true, "granted": false, "reason": "recording in progress"}
    {"command": "lease-renew", "args": {"lease_id": "7f3a...", "ttl_s": 30,
                                        "progress": {"step": 120, "steps": 1500, "loss": 0.41}}}
        -> the grant again (the lease now runs ttl_s from this answer), or a refusal: the agent revoked
           the lease (an operator started recording, a rollout began, the training hours ended ...)
    {"command": "lease-release", "args": {"lease_id": "7f3a..."}}
        -> {"ok": true, "released": true}

A lease lasts `ttl_s` seconds from the agent's answer unless renewed; an agent may grant less than asked,
and the holder keeps to what was granted. The holder counts from when it sent the request, so its own
deadline never outlives the agent's; it renews every `renew_interval()` seconds and treats the lease as lost
once its deadline passes without a renewal (the agent stopped answering), so a holder never starts a
training step on an expired lease. An agent that refuses, answers with an error (it predates
leases) or does not answer at all grants nothing: the node does not train that round.

A grant may name the agent's event stream (`"events": "ipc://.../events.sock"`, zk0.agent.events): the holder
then also listens there and loses the lease the moment the agent publishes its end (`{"type": "lease",
"status": "ended", "lease_id": ...}`), so an operator who starts recording waits for one training step, not for
the next renewal.

A renewal may carry the holder's training progress (`progress`: optimizer steps done of the round's budget and
the last step's loss, or null); the agent shows it in its status and publishes it on its event stream.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from zk0.agent import control

PURPOSE_TRAIN = "train"
DEFAULT_TTL_S = 30.0
RENEW_EVERY_S = 5.0
WAKE_S = 0.1  # how often the holder's revocation watcher looks for its stop
MAX_TTL_S = 3600.0
MAX_STEPS = 10**9
LEASE, RENEW, RELEASE = "lease", "lease-renew", "lease-release"


def _text(args: Mapping[str, Any], key: str, command: str, required: bool = True) -> str:
    value = args.get(key, None if required else "")
    if not isinstance(value, str) or (required and not value):
        raise ValueError(f'{command}: "{key}" must be a non-empty string')
    return value


def _ttl(args: Mapping[str, Any], command: str) -> float:
    value = args.get("ttl_s")
    # bool is an int to Python, never a duration
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_TTL_S:
        raise ValueError(f'{command}: "ttl_s" must be a number of seconds in (0, {MAX_TTL_S:g}]')
    return float(value)


@dataclass(frozen=True)
class LeaseRequest:
    """Ask for the machine for `purpose` during `ttl_s` seconds; `holder` names the asker in the agent's logs."""

    purpose: str
    ttl_s: float
    holder: str = ""

    def to_args(self) -> dict[str, Any]:
        return {"purpose": self.purpose, "ttl_s": self.ttl_s, "holder": self.holder}

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> LeaseRequest:
        control.refuse_unknown_arguments(args, LEASE, {"purpose", "ttl_s", "holder"})
        return cls(_text(args, "purpose", LEASE), _ttl(args, LEASE), _text(args, "holder", LEASE, required=False))


@dataclass(frozen=True)
class TrainingProgress:
    """How far the holder's training has come: `step` of `steps` optimizer steps, the last step's loss."""

    step: int
    steps: int
    loss: float | None = None

    def to_args(self) -> dict[str, Any]:
        finite = self.loss is not None and math.isfinite(self.loss)
        return {"step": self.step, "steps": self.steps, "loss": self.loss if finite else None}

    @classmethod
    def from_args(cls, value: Any, command: str) -> TrainingProgress:
        if not isinstance(value, dict) or set(value) != {"step", "steps", "loss"}:
            raise ValueError(f'{command}: "progress" must be an object with "step", "steps" and "loss"')
        step, steps, loss = value["step"], value["steps"], value["loss"]
        for key, count in (("step", step), ("steps", steps)):
            if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= MAX_STEPS:
                raise ValueError(f'{command}: progress "{key}" must be a whole number in [0, {MAX_STEPS}]')
        if step > steps:
            raise ValueError(f'{command}: progress "step" ({step}) is past "steps" ({steps})')
        if loss is not None and (isinstance(loss, bool) or not isinstance(loss, (int, float)) or not math.isfinite(loss)):
            raise ValueError(f'{command}: progress "loss" must be a finite number or null')
        return cls(step, steps, None if loss is None else float(loss))


@dataclass(frozen=True)
class LeaseRenewal:
    lease_id: str
    ttl_s: float
    progress: TrainingProgress | None = None

    def to_args(self) -> dict[str, Any]:
        progress = {"progress": self.progress.to_args()} if self.progress is not None else {}
        return {"lease_id": self.lease_id, "ttl_s": self.ttl_s, **progress}

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> LeaseRenewal:
        control.refuse_unknown_arguments(args, RENEW, {"lease_id", "ttl_s", "progress"})
        progress = args.get("progress")
        return cls(_text(args, "lease_id", RENEW), _ttl(args, RENEW),
                   None if progress is None else TrainingProgress.from_args(progress, RENEW))


@dataclass(frozen=True)
class LeaseRelease:
    lease_id: str

    def to_args(self) -> dict[str, Any]:
        return {"lease_id": self.lease_id}

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> LeaseRelease:
        control.refuse_unknown_arguments(args, RELEASE, {"lease_id"})
        return cls(_text(args, "lease_id", RELEASE))


@dataclass(frozen=True)
class LeaseGrant:
    lease_id: str
    ttl_s: float
    events: str = ""  # the agent's event stream, where it announces revocations at once; "": renewals only

    def to_reply(self) -> dict[str, Any]:
        return {"granted": True, "lease_id": self.lease_id, "ttl_s": self.ttl_s,
                **({"events": self.events} if self.events else {})}


@dataclass(frozen=True)
class LeaseRefusal:
    reason: str

    def to_reply(self) -> dict[str, Any]:
        return {"granted": False, "reason": self.reason}


# The lease commands with their argument checks, for an agent's control-server command table.
COMMANDS = {LEASE: LeaseRequest.from_args, RENEW: LeaseRenewal.from_args, RELEASE: LeaseRelease.from_args}


def parse_answer(reply: Mapping[str, Any]) -> LeaseGrant | LeaseRefusal:
    """What the agent's reply to a lease or renewal means; anything but a well-formed grant grants nothing."""
    if not reply.get("ok"):
        return LeaseRefusal(f"the agent does not grant leases: {reply.get('error', 'error reply')}")
    if reply.get("granted") is False:
        return LeaseRefusal(str(reply.get("reason") or "refused without a reason"))
    if reply.get("granted") is True:
        try:
            events = reply.get("events", "")
            return LeaseGrant(_text(reply, "lease_id", "reply"), _ttl(reply, "reply"),
                              events if isinstance(events, str) else "")
        except ValueError:
            pass
    return LeaseRefusal("the agent sent a malformed lease reply")


def busy_reply(request: control.Request, reason: str) -> dict[str, Any]:
    """The answer of an agent that grants nothing for now (e.g. it is recording): every lease request and
    renewal is refused with `reason` (so a lease granted earlier is revoked), a release is acknowledged."""
    if request.command == RELEASE:
        return {"released": True}
    return LeaseRefusal(reason).to_reply()


def renew_interval(ttl_s: float) -> float:
    """Seconds between renewals: every few seconds, and often enough that two can fail before the lease ends."""
    return min(RENEW_EVERY_S, ttl_s / 3)


def lease_deadline(sent_at: float, ttl_s: float) -> float:
    """When a lease granted in answer to a request sent at `sent_at` (monotonic seconds) ends for its holder.
    The agent started counting later, when it answered, so the holder's deadline is never the later one."""
    return sent_at + ttl_s


class HeldLease:
    """A granted lease: renewed from a background thread while the `with` block runs, released at its end.

    `should_stop()` is the trainer's preemption hook: true once the agent revoked the lease or it ran out
    unrenewed; `lost_reason` then says which. `report(progress)` hands the agent the training's progress with
    the next renewal.
    """

    def __init__(self, address: str, grant: LeaseGrant, sent_at: float, timeout_s: float = 2.0) -> None:
        self.address, self.grant, self.timeout_s = address, grant, timeout_s
        self._interval = renew_interval(grant.ttl_s)
        self._deadline = lease_deadline(sent_at, grant.ttl_s)
        self._lock = threading.Lock()
        self._lost: str | None = None
        self._progress: TrainingProgress | None = None
        self._stop = threading.Event()
        # Two threads: a renewal can wait seconds for a busy agent, and must not delay hearing a revocation.
        self._threads = [threading.Thread(target=self._renew_until_stopped, name="zk0-lease", daemon=True)]
        if grant.events:
            self._threads.append(threading.Thread(target=self._watch_revocations, name="zk0-lease-events", daemon=True))

    @property
    def lost_reason(self) -> str | None:
        with self._lock:
            return self._lost

    def should_stop(self) -> bool:
        with self._lock:
            if self._lost is None and time.monotonic() >= self._deadline:
                self._lost = f"lease expired unrenewed (no answer from the agent at {self.address})"
            return self._lost is not None

    def report(self, progress: TrainingProgress) -> None:
        with self._lock:
            self._progress = progress

    def _lose(self, reason: str) -> None:
        with self._lock:
            self._lost = self._lost or reason

    def _renew_until_stopped(self) -> None:
        while not self._stop.wait(self._interval) and not self.should_stop():
            if not self._renew():
                return

    def _watch_revocations(self) -> None:
        revocations = _subscribe(self.grant.events)
        try:
            while not self._stop.is_set() and not self.should_stop():
                if revocations.poll(int(WAKE_S * 1000)):
                    reason = revocation_reason(revocations.recv(), self.grant.lease_id)
                    if reason is not None:
                        self._lose(f"lease revoked by the agent: {reason}")
                        return
        finally:
            revocations.close(linger=0)

    def _renew(self) -> bool:
        """One renewal; False once the agent refused it (the lease is lost)."""
        sent_at = time.monotonic()
        with self._lock:
            renewal = LeaseRenewal(self.grant.lease_id, self.grant.ttl_s, self._progress)
        try:
            reply = control.request(self.address, RENEW, self.timeout_s, args=renewal.to_args())
        except TimeoutError:
            return True  # try again next interval; should_stop() ends the lease at its deadline
        answer = parse_answer(reply)
        if isinstance(answer, LeaseRefusal):
            self._lose(f"lease revoked by the agent: {answer.reason}")
            return False
        with self._lock:
            self._deadline = lease_deadline(sent_at, answer.ttl_s)
        return True

    def __enter__(self) -> HeldLease:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()
        if self.lost_reason is None:
            try:  # best effort: an unreleased lease still ends at its deadline
                control.request(self.address, RELEASE, self.timeout_s, args=LeaseRelease(self.grant.lease_id).to_args())
            except TimeoutError:
                pass


def _subscribe(address: str) -> Any:
    import zmq

    socket = zmq.Context.instance().socket(zmq.SUB)
    socket.setsockopt_string(zmq.SUBSCRIBE, "")
    socket.connect(address)
    return socket


def revocation_reason(message: bytes, lease_id: str) -> str | None:
    """The reason in an agent event that ends lease `lease_id`; None for any other (or malformed) event."""
    import json

    try:
        event = json.loads(message)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(event, dict) or event.get("type") != "lease" or event.get("status") != "ended":
        return None
    if event.get("lease_id") != lease_id:
        return None
    return str(event.get("reason") or "ended")


def acquire(address: str, purpose: str = PURPOSE_TRAIN, ttl_s: float = DEFAULT_TTL_S, holder: str = "",
            timeout_s: float = 2.0) -> HeldLease | LeaseRefusal:
    """Ask the agent at `address` for a lease; a refusal (with the reason) when it refuses or does not answer."""
    request = LeaseRequest(purpose, _ttl({"ttl_s": ttl_s}, LEASE), holder)
    sent_at = time.monotonic()
    try:
        reply = control.request(address, LEASE, timeout_s, args=request.to_args())
    except TimeoutError:
        return LeaseRefusal(f"no zk0 agent answering at {address}")
    answer = parse_answer(reply)
    if isinstance(answer, LeaseRefusal):
        return answer
    return HeldLease(address, answer, sent_at, timeout_s)
