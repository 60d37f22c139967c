"""The agent's decisions in one place: its state, the job that holds the robot, the training lease, and the
answers to the control API (zk0.agent.daemon runs it; zk0.agent.daemon_state is its transition table).

The control thread (requests) and the agent's loop (job exits, lease expiry) both change the state, under one
lock. Nothing here blocks for long while holding it: a job starts as a child process, commands for a job are
forwarded to the job's own control API with a short timeout, and policy-store commands, which run `zk0 policy`
(seconds, for its torch import), are refused while a job drives the robot so they can never delay an estop.
"""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from zk0.agent import lease
from zk0.agent.arrivals import ArrivalWatch
from zk0.agent.control import Request
from zk0.agent.daemon_jobs import Job
from zk0.agent.daemon_requests import (
    JobPaths, PolicyAction, RecordStart, RolloutStart, ValidateStart, record_action, record_argv, rollout_action,
    rollout_argv, train_action, validate_argv,
)
from zk0.agent.daemon_state import Event, Refused, State, next_state
from zk0.agent.dagger import VERBS
from zk0.agent.idle import Activity, LeaseVerdict, lease_decision
from zk0.agent.sensors import host_timezone, read_sensors
from zk0.agent.validate_robot import verdict_args

log = logging.getLogger("zk0.agent")
SESSION_COMMANDS = ("save", "discard", "rerecord", "stop")  # a recording session's own commands, forwarded
ALWAYS_ON_TRAINING = {"daily": ["00:00-24:00"]}
POLICY_TIMEOUT_S = 120.0
STARTING_HOLD = "starting (checking its robot and cameras)"
ARRIVAL_CHECK_S = 1.0  # how often the loop looks for a newly delivered global (a directory listing)

COMMANDS = {
    "status": None, "estop": None, "clear": None,
    "record": record_action, "rollout": rollout_action, "validate": ValidateStart.from_args,
    "train": train_action, "policy": PolicyAction.from_args, "verdict": verdict_args,
    **dict.fromkeys(SESSION_COMMANDS), **dict.fromkeys(VERBS), **lease.COMMANDS,
}
# (job kind, exit status) -> how the job ended; statuses not listed are failures
JOB_ENDS = {
    ("record", 0): (Event.JOB_DONE, "session complete"), ("record", 3): (Event.JOB_DONE, "stopped: disk nearly full"),
    ("record", 2): (Event.JOB_DONE, "could not start"),
    ("rollout", 0): (Event.JOB_DONE, "rollout complete"), ("rollout", 2): (Event.JOB_DONE, "could not start"),
    ("rollout", 3): (Event.ESTOP, "estop"),
    ("validate", 0): (Event.JOB_DONE, "validated: may be promoted"),
    ("validate", 1): (Event.JOB_DONE, "validated: not promoted"), ("validate", 2): (Event.JOB_DONE, "could not start"),
}


def job_end(kind: str, returncode: int) -> tuple[Event, str]:
    """The state machine's event for a job that exited with `returncode`, and why."""
    return JOB_ENDS.get((kind, returncode), (Event.JOB_FAILED, f"{kind} failed (exit status {returncode})"))


@dataclass(frozen=True)
class AgentPaths:
    state_dir: Path
    runtime_dir: Path

    @property
    def control(self) -> str:
        return f"ipc://{self.runtime_dir / 'agent.sock'}"

    @property
    def events(self) -> str:
        return f"ipc://{self.runtime_dir / 'events.sock'}"

    @property
    def job_control(self) -> str:
        return f"ipc://{self.runtime_dir / 'job.sock'}"

    @property
    def effective_config(self) -> Path:
        return self.runtime_dir / "agent.yaml"

    @property
    def sim_rig(self) -> Path:
        """With --sim: the description of the simulated rig the agent keeps running for its jobs."""
        return self.runtime_dir / "sim-rig.json"

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"


@dataclass
class HeldLease:
    lease_id: str
    holder: str
    expires_at: float  # time.monotonic()
    override: bool  # granted under `zk0ctl train now`
    progress: lease.TrainingProgress | None = None  # what the holder's last renewal reported


class AgentCore:
    def __init__(self, config: Any, paths: AgentPaths, sim: bool, policy_store: Path,
                 publish: Callable[..., object], starting: bool = False) -> None:
        self.config = config
        self.paths = paths
        self.sim = sim
        self.policy_store = policy_store
        self.publish = publish
        self.lock = threading.RLock()
        # `starting`: STARTING until the shell's hardware check passed (`ready`), else IDLE at once
        self.state = State.STARTING if starting else State.IDLE
        self.reason = "checking the robot and cameras" if starting else "started"
        self.job: Job | None = None
        self.lease: HeldLease | None = None
        self.training = "rules"  # "rules", "paused" (zk0ctl train pause) or "now" (the next lease ignores the hours)
        self.last_operator: datetime | None = None
        self.started = time.time()
        self.extra_status: Callable[[], dict[str, Any]] = dict  # what the process shell adds (its children)
        self.zygote = None  # zk0.agent.job_zygote.Zygote, set by the process shell: jobs start warm from it
        # Why the agent takes no new work (starting: until the hardware answered, even when estopped meanwhile;
        # stopping: after SIGTERM), None while it does. Status and estop are always answered.
        self.unavailable: str | None = STARTING_HOLD if starting else None
        self.arrivals = ArrivalWatch(policy_store / "versions")
        self._next_arrival_check = 0.0

    # -- state -------------------------------------------------------------------------------------------
    def _to(self, event: Event, reason: str) -> None:
        new = next_state(self.state, event, job_running=self.job is not None and self.job.running)
        if new is not self.state or event is Event.ESTOP:
            log.info("state %s -> %s (%s)", self.state.value, new.value, reason, extra={"ZK0_STATE": new.value})
            self.publish("state", state=new.value, previous=self.state.value, reason=reason)
        self.state, self.reason = new, reason

    def _operator_acted(self) -> None:
        self.last_operator = datetime.now(host_timezone())

    def tick(self) -> None:
        """The loop's share: a job that ended, a lease that ran out, a global policy that arrived."""
        with self.lock:
            if time.monotonic() >= self._next_arrival_check:
                self._next_arrival_check = time.monotonic() + ARRIVAL_CHECK_S
                for result in self.arrivals.new_results():
                    log.info("global policy %s arrived", result["version"])
                    self.publish("round", **result)
            if self.job is not None and not self.job.running:
                event, why = job_end(self.job.kind, self.job.returncode)
                detail = f"{why}: {self.job.last_line}" if event is not Event.JOB_DONE or why == "could not start" else why
                self.publish("job", kind=self.job.kind, status="ended", returncode=self.job.returncode, reason=detail)
                self.job = None
                self._operator_acted()  # someone was just working at the robot: the quiet time starts now
                self._to(event, detail)
            if self.lease is not None and time.monotonic() >= self.lease.expires_at:
                self.end_lease("lease expired (the node stopped renewing)")

    def not_ready(self, reason: str) -> None:
        """The hardware check failed (the shell retries it): the status says why."""
        with self.lock:
            if self.state is State.STARTING:
                self.reason = reason

    def ready(self, reason: str) -> None:
        """The hardware check passed: the agent takes work (IDLE, or still ESTOPPED if estopped meanwhile)."""
        with self.lock:
            self.unavailable = None
            if self.state is State.STARTING:
                self._to(Event.READY, reason)

    def begin_stopping(self) -> Job | None:
        """SIGTERM: no new job or lease from now on, and the lease is revoked (its holder hears it on the event
        stream and stops training at its next step boundary); the job still running, for the shell to stop."""
        with self.lock:
            self.unavailable = "stopping"
            if self.lease is not None:
                self.end_lease("revoked: the agent is stopping")
            return self.job if self.job is not None and self.job.running else None

    def end_lease(self, reason: str) -> None:
        """Revoke or close the lease (its holder hears it on the event stream at once) and leave TRAINING."""
        if self.lease is not None and self.lease.override:
            self.training = "rules"
        ended, self.lease = self.lease, None
        self.publish("lease", status="ended", reason=reason, lease_id=ended.lease_id if ended else None)
        if self.state is State.TRAINING:
            self._to(Event.LEASE_ENDED, reason)

    def status(self) -> dict[str, Any]:
        job = None if self.job is None else {"kind": self.job.kind, "pid": self.job.process.pid, "warm": self.job.warm,
                                             "last_line": self.job.last_line, "log": str(self.job.log_path)}
        held = None if self.lease is None else {
            "holder": self.lease.holder, "expires_in_s": round(self.lease.expires_at - time.monotonic(), 1),
            "progress": None if self.lease.progress is None else self.lease.progress.to_args()}
        return {"state": self.state.value, "reason": self.reason, "sim": self.sim, "job": job, "lease": held,
                "events": self.paths.events, "unavailable": self.unavailable,
                "training": self.training, "policy_store": str(self.policy_store),
                "warm_jobs": self.zygote is not None and self.zygote.ready,
                "datasets_root": str(self.config.datasets_root), "uptime_s": round(time.time() - self.started, 1),
                **self.extra_status()}

    # -- control API -------------------------------------------------------------------------------------
    def handle(self, request: Request) -> dict[str, Any]:
        """Answer one request; ValueError (Refused included) becomes the error reply."""
        command = request.command
        with self.lock:
            if command == "status":
                return self.status()
            if command in lease.COMMANDS:
                return self._lease(request)
            if self.unavailable is not None and command != "estop":
                raise ValueError(f"{command}: the agent is {self.unavailable}")
            self._operator_acted()
            if command == "estop":
                return self._estop()
            if command == "clear":
                self._to(Event.CLEAR, "cleared by the operator")
                return self.status()
            if command == "record":
                return self._record(request.args)
            if command in SESSION_COMMANDS:
                return self._forward("record", command)
            if command == "rollout":
                return self._rollout(request.args)
            if command in VERBS:
                return self._forward("rollout", command)
            if command == "validate":
                return self._start("validate", request.args, validate_argv(
                    request.args, self._job_paths(), self.paths.state_dir / "reports" / time.strftime("%Y%m%d-%H%M%S")))
            if command == "verdict":
                return self._forward("validate", "verdict", {"outcome": "success" if request.args else "fail"})
            if command == "train":
                return self._train(request.args)
            if command == "policy":
                return self._policy(request.args)
        raise ValueError(f"unknown command {command!r}")

    def _job_paths(self) -> JobPaths:
        return JobPaths(config=self.paths.effective_config, datasets_root=self.config.datasets_root,
                        policy_store=self.policy_store, control=self.paths.job_control, sim=self.sim,
                        sim_rig=self.paths.sim_rig if self.sim else None)

    def _start(self, kind: str, request: Any, argv: list[str]) -> dict[str, Any]:
        event = {"record": Event.RECORD, "rollout": Event.ROLLOUT, "validate": Event.VALIDATE}[kind]
        next_state(self.state, event)  # Refused before anything starts
        if self.lease is not None:  # preemption: the node's next renewal is refused, it stops at a step boundary
            self.end_lease(f"revoked: {kind} started")
        self.job = Job(kind, argv, self.paths.job_control, self.paths.logs / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}.log",
                       lambda k, line: self.publish("job", kind=k, line=line), zygote=self.zygote)
        self._to(event, f"{kind}: {dataclasses.asdict(request) if dataclasses.is_dataclass(request) else request}")
        return self.status()

    def _record(self, request: RecordStart | str) -> dict[str, Any]:
        if isinstance(request, RecordStart):
            return self._start("record", request, record_argv(request, self._job_paths()))
        return self._forward("record", request)

    def _rollout(self, request: RolloutStart | str) -> dict[str, Any]:
        if isinstance(request, RolloutStart):
            return self._start("rollout", request, rollout_argv(request, self._job_paths()))
        if self.job is None or self.job.kind != "rollout":
            raise ValueError("no rollout is running")
        self.job.interrupt()  # the rollout's own estop: hold, then torque off
        return self.status()

    def _forward(self, kind: str, command: str, args: dict | None = None) -> dict[str, Any]:
        if self.job is None or self.job.kind != kind or not self.job.running:
            raise ValueError(f"{command}: no {kind} is running (the agent is {self.state.value})")
        try:
            reply = self.job.forward(command, args)
        except TimeoutError:
            raise ValueError(f"{command}: the {kind} job does not answer (yet); try again") from None
        return {**self.status(), "job_reply": reply}

    def _estop(self) -> dict[str, Any]:
        if self.job is not None and self.job.running:
            if self.job.kind == "record":
                self.job.interrupt()
            else:
                try:
                    self.job.forward("estop", timeout_s=0.5)
                except (TimeoutError, ValueError):
                    self.job.interrupt()  # SIGINT is the job's estop too
        if self.lease is not None:
            self.end_lease("revoked: estop")
        self._to(Event.ESTOP, "estop from zk0ctl")
        return self.status()

    def _train(self, action: str) -> dict[str, Any]:
        if action == "pause":
            self.training = "paused"
            if self.lease is not None:
                self.end_lease("revoked: training paused by the operator")
        else:
            self.training = "now" if action == "now" else "rules"
        self.publish("training", mode=self.training)
        return self.status()

    def _policy(self, action: PolicyAction) -> dict[str, Any]:
        if self.job is not None and self.job.running:
            raise ValueError(f"policy: wait until the {self.job.kind} job ends (store commands never run beside one)")
        argv = ["policy", action.action] + ([action.version] if action.version else [])
        argv += ["--reason", action.reason] if action.action in ("promote", "rollback") else []
        result = subprocess.run([sys.executable, "-m", "zk0.cli", *argv, "--store", str(self.policy_store)],
                                capture_output=True, text=True, timeout=POLICY_TIMEOUT_S)
        if result.returncode != 0:
            raise ValueError((result.stderr or result.stdout).strip() or f"zk0 policy {action.action} failed")
        if action.action != "list":
            self.publish("policy", action=action.action, version=action.version, reason=action.reason)
        return {"output": result.stdout}

    # -- training leases ---------------------------------------------------------------------------------
    def _lease(self, request: Request) -> dict[str, Any]:
        args = request.args
        if request.command == lease.RELEASE:
            released = self.lease is not None and self.lease.lease_id == args.lease_id
            if released:
                self.end_lease(f"released by {self.lease.holder or 'the node'}")
            return {"released": released}
        renewal = request.command == lease.RENEW
        if self.unavailable is not None:  # starting (no lease yet) or stopping (the lease was revoked)
            return lease.LeaseRefusal(f"the agent is {self.unavailable}").to_reply()
        if renewal and (self.lease is None or self.lease.lease_id != args.lease_id):
            return lease.LeaseRefusal("no such lease (it was revoked or expired)").to_reply()
        if not renewal and args.purpose != lease.PURPOSE_TRAIN:
            return lease.LeaseRefusal(f"this agent lends the machine for {lease.PURPOSE_TRAIN!r} only").to_reply()
        if not renewal and self.lease is not None:
            return lease.LeaseRefusal(f"the lease is held by {self.lease.holder or 'another node'}").to_reply()
        verdict = self._lease_verdict()
        if not verdict.granted:
            if renewal:
                self.end_lease(f"revoked: {verdict.reason}")
            return lease.LeaseRefusal(verdict.reason).to_reply()
        ttl_s = min(args.ttl_s, verdict.ttl_s)
        if renewal:
            self.lease.expires_at = time.monotonic() + ttl_s
            if args.progress is not None and args.progress != self.lease.progress:
                self.lease.progress = args.progress
                self.publish("progress", holder=self.lease.holder, lease_id=self.lease.lease_id,
                             **args.progress.to_args())
            return lease.LeaseGrant(self.lease.lease_id, ttl_s).to_reply()
        self.lease = HeldLease(uuid.uuid4().hex, args.holder, time.monotonic() + ttl_s, self.training == "now")
        self.publish("lease", status="granted", holder=args.holder, ttl_s=ttl_s, reason=verdict.reason)
        self._to(Event.LEASE_GRANTED, f"training lease for {args.holder or 'a node'}")
        return lease.LeaseGrant(self.lease.lease_id, ttl_s, self.paths.events).to_reply()

    def _lease_verdict(self) -> LeaseVerdict:
        if self.training == "paused":
            return LeaseVerdict(False, "training paused by the operator (zk0ctl train resume)", 0.0)
        settings, last = self.config.idle, self.last_operator
        if self.training == "now" or (self.lease is not None and self.lease.override):
            settings, last = dataclasses.replace(settings, training_hours=ALWAYS_ON_TRAINING, quiet_time_s=0.0), None
        state = "training" if self.state is State.TRAINING else self.state.value
        return lease_decision(settings, Activity(state, last), datetime.now(host_timezone()),
                              read_sensors(self.paths.state_dir))
