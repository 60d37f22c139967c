"""Training leases: the protocol's messages and expiry math, the client against a real ControlServer on an
ipc:// socket (grant, renewal, release, refusal, no agent, revocation, expiry), and the ClientApp's train
handler with and without an agent, its reply passed through the server's strategy."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from tests.server.flower_app import ListingGrid, pushed, serverapp_identity
from zk0.agent import client_app, lease
from zk0.agent.control import ControlServer, Request, request
from zk0.agent.lease import LeaseGrant, LeaseRefusal, LeaseRelease, LeaseRenewal, LeaseRequest, TrainingProgress

NODE_ID = 7


class Agent:
    """The agent's real decision core (zk0.agent.daemon_core) and command table on a real control socket, with
    its event stream, under idle settings that grant at any hour whatever the load of this test machine."""

    IDLE = {"quiet_time_s": 0, "max_load_per_core": None, "min_free_disk_mb": None, "min_free_memory_mb": None,
            "max_temperature_c": None, "require_ac_power": False}

    def __init__(self, address: str) -> None:
        from zk0.agent.config import parse_config
        from zk0.agent.daemon import sim_defaults
        from zk0.agent.daemon_core import COMMANDS, AgentCore, AgentPaths
        from zk0.agent.events import EventPublisher

        runtime = Path(address.removeprefix("ipc://")).parent
        paths = AgentPaths(runtime / "state", runtime)
        self.events = EventPublisher(paths.events)
        self.core = AgentCore(parse_config({**sim_defaults(paths.state_dir), "idle": self.IDLE}), paths, True,
                              runtime / "policies", self.events.publish)
        self.server = ControlServer(address, COMMANDS, self.core.handle)

    def operator(self, command: str, args=None) -> dict:
        """What `zk0ctl` would ask (e.g. `train pause`, `estop`)."""
        return self.core.handle(Request(command, args if args is not None else {}))

    def close(self) -> None:
        self.server.close()
        self.events.close()


@pytest.fixture
def address(tmp_path: Path) -> str:
    return f"ipc://{tmp_path}/agent.sock"


# --- protocol ---------------------------------------------------------------------------------------------

def test_messages_round_trip_through_their_arguments() -> None:
    for message in (LeaseRequest("train", 30.0, "flower node 7"), LeaseRenewal("lease-1", 30.0), LeaseRelease("lease-1"),
                    LeaseRenewal("lease-1", 30.0, TrainingProgress(120, 1500, 0.41)),
                    LeaseRenewal("lease-1", 30.0, TrainingProgress(0, 0, None))):
        assert type(message).from_args(message.to_args()) == message
    assert LeaseRequest.from_args({"purpose": "train", "ttl_s": 30}) == LeaseRequest("train", 30.0, "")
    # a diverged step's loss travels as null: JSON has no NaN, and the lease must not die of it
    assert TrainingProgress(3, 10, float("nan")).to_args() == {"step": 3, "steps": 10, "loss": None}
    assert lease.parse_answer({"ok": True, **LeaseGrant("lease-1", 10.0).to_reply()}) == LeaseGrant("lease-1", 10.0)
    assert lease.parse_answer({"ok": True, **LeaseRefusal("recording").to_reply()}) == LeaseRefusal("recording")


@pytest.mark.parametrize(("check", "args", "error"), [
    (LeaseRequest.from_args, {"ttl_s": 30}, 'lease: "purpose" must be a non-empty string'),
    (LeaseRequest.from_args, {"purpose": "", "ttl_s": 30}, 'lease: "purpose" must be a non-empty string'),
    (LeaseRequest.from_args, {"purpose": "train", "ttl_s": "30"}, 'lease: "ttl_s" must be a number of seconds'),
    (LeaseRequest.from_args, {"purpose": "train", "ttl_s": True}, 'lease: "ttl_s" must be a number of seconds'),
    (LeaseRequest.from_args, {"purpose": "train", "ttl_s": 0}, 'lease: "ttl_s" must be a number of seconds'),
    (LeaseRequest.from_args, {"purpose": "train", "ttl_s": 1e9}, 'lease: "ttl_s" must be a number of seconds'),
    (LeaseRequest.from_args, {"purpose": "train", "ttl_s": 30, "holder": 3}, 'lease: "holder" must be'),
    (LeaseRequest.from_args, {"purpose": "train", "ttl_s": 30, "gpu": 1}, "lease: unknown argument 'gpu'"),
    (LeaseRenewal.from_args, {"lease_id": "x"}, 'lease-renew: "ttl_s" must be'),
    (LeaseRelease.from_args, {"lease_id": 5}, 'lease-release: "lease_id" must be a non-empty string'),
    (LeaseRenewal.from_args, {"lease_id": "x", "ttl_s": 5, "progress": [1, 2]}, 'progress" must be an object'),
    (LeaseRenewal.from_args, {"lease_id": "x", "ttl_s": 5, "progress": {"step": 1, "steps": 2}},
     'progress" must be an object with "step", "steps" and "loss"'),
    (LeaseRenewal.from_args, {"lease_id": "x", "ttl_s": 5, "progress": {"step": 3, "steps": 2, "loss": 0.1}},
     'progress "step" \\(3\\) is past "steps" \\(2\\)'),
    (LeaseRenewal.from_args, {"lease_id": "x", "ttl_s": 5, "progress": {"step": True, "steps": 2, "loss": 0.1}},
     'progress "step" must be a whole number'),
    (LeaseRenewal.from_args, {"lease_id": "x", "ttl_s": 5, "progress": {"step": 1, "steps": 2.5, "loss": 0.1}},
     'progress "steps" must be a whole number'),
    (LeaseRenewal.from_args, {"lease_id": "x", "ttl_s": 5, "progress": {"step": 1, "steps": 2, "loss": "low"}},
     'progress "loss" must be a finite number or null'),
    (LeaseRenewal.from_args, {"lease_id": "x", "ttl_s": 5, "progress": {"step": 1, "steps": 2, "loss": float("inf")}},
     'progress "loss" must be a finite number or null'),
])
def test_malformed_arguments_are_refused_with_a_reason(check, args, error) -> None:
    with pytest.raises(ValueError, match=error):
        check(args)


NUMBERS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5)


@given(progress=st.fixed_dictionaries({"step": NUMBERS, "steps": NUMBERS, "loss": NUMBERS},
                                      optional={"extra": NUMBERS}) | NUMBERS)
def test_any_progress_a_renewal_carries_is_well_formed_or_refused_with_a_reason(progress) -> None:
    try:
        parsed = TrainingProgress.from_args(progress, lease.RENEW)
    except ValueError as exc:
        assert str(exc).startswith("lease-renew: progress") or '"progress" must be' in str(exc)
        return
    assert 0 <= parsed.step <= parsed.steps <= lease.MAX_STEPS
    assert parsed.loss is None or abs(parsed.loss) < float("inf")  # finite: NaN and inf never get in
    assert TrainingProgress.from_args(parsed.to_args(), lease.RENEW) == parsed


@pytest.mark.parametrize(("reply", "reason"), [
    ({"ok": False, "error": "unknown command 'lease' (known: status)"}, "the agent does not grant leases: unknown"),
    ({"ok": True, "granted": False}, "refused without a reason"),
    ({"ok": True, "granted": True, "lease_id": "", "ttl_s": 5}, "malformed lease reply"),
    ({"ok": True, "granted": True, "lease_id": "x", "ttl_s": -1}, "malformed lease reply"),
    ({"ok": True, "state": "recording"}, "malformed lease reply"),
])
def test_anything_but_a_well_formed_grant_grants_nothing(reply, reason) -> None:
    answer = lease.parse_answer(reply)
    assert isinstance(answer, LeaseRefusal) and reason in answer.reason


def test_expiry_math() -> None:
    assert lease.renew_interval(30.0) == lease.RENEW_EVERY_S
    assert lease.renew_interval(3.0) == pytest.approx(1.0)  # two renewals may fail before the lease runs out
    assert lease.lease_deadline(sent_at=100.0, ttl_s=30.0) == 130.0


def test_malformed_lease_requests_never_reach_the_agent(address: str) -> None:
    agent = Agent(address)
    try:
        reply = request(address, lease.LEASE, args={"purpose": "train", "ttl_s": -5})
        assert reply == {"ok": False, "error": 'lease: "ttl_s" must be a number of seconds in (0, 3600]'}
        assert request(address, lease.RENEW, args={"lease_id": "x", "ttl_s": 1, "extra": 1})["ok"] is False
        assert agent.core.lease is None and agent.core.state.value == "idle"
    finally:
        agent.close()


# --- the client against a real agent socket -----------------------------------------------------------------

def test_grant_is_renewed_past_its_ttl_and_released(address: str) -> None:
    agent = Agent(address)
    try:
        held = lease.acquire(address, holder="flower node 7", ttl_s=0.6)
        assert isinstance(held, lease.HeldLease) and held.grant.ttl_s == pytest.approx(0.6)
        assert held.grant.events.endswith("events.sock")  # revocations are announced, not only refused
        assert agent.core.state.value == "training" and agent.core.lease.holder == "flower node 7"
        with held:
            deadline = time.monotonic() + 1.5  # more than twice the granted ttl: only renewals keep it
            while time.monotonic() < deadline:
                assert not held.should_stop() and agent.core.lease is not None
                time.sleep(0.02)
        assert held.lost_reason is None
        assert agent.core.lease is None and agent.core.state.value == "idle"  # released
    finally:
        agent.close()


def test_renewals_carry_training_progress_to_the_status_and_the_event_stream(address: str) -> None:
    from zk0.agent.events import follow

    agent = Agent(address)
    try:
        held = lease.acquire(address, holder="flower node 7", ttl_s=0.6)  # renewed every 0.2 s
        events = follow(agent.core.paths.events, poll_s=0.1, until=time.monotonic() + 10.0)
        trained = threading.Event()

        def train() -> None:  # steps go on until the subscriber (connecting asynchronously) has seen one
            for step in range(1, 1500):
                if trained.wait(0.05):
                    return
                held.report(TrainingProgress(step, 1500, 0.5))

        with held:
            trainer = threading.Thread(target=train)
            trainer.start()
            try:
                progress = next(e for e in events if e["type"] == "progress")
            finally:
                trained.set()
                trainer.join()
            assert progress["holder"] == "flower node 7" and progress["lease_id"] == held.grant.lease_id
            assert 0 < progress["step"] < 1500 and (progress["steps"], progress["loss"]) == (1500, 0.5)
            held.report(TrainingProgress(1499, 1500, None))
            time.sleep(0.5)  # two renewals
            assert agent.operator("status")["lease"]["progress"] == {"step": 1499, "steps": 1500, "loss": None}
    finally:
        agent.close()


def test_refusal_and_no_agent_grant_nothing(address: str, tmp_path: Path) -> None:
    agent = Agent(address)
    try:
        agent.operator("train", "pause")
        assert lease.acquire(address) == LeaseRefusal("training paused by the operator (zk0ctl train resume)")
        agent.operator("train", "resume")
        agent.operator("estop")
        assert lease.acquire(address) == LeaseRefusal("emergency stop engaged")
    finally:
        agent.close()
    nobody = f"ipc://{tmp_path}/nobody.sock"
    assert lease.acquire(nobody, timeout_s=0.2) == LeaseRefusal(f"no zk0 agent answering at {nobody}")


def test_revocation_mid_training_stops_the_holder_at_once(address: str) -> None:
    agent = Agent(address)
    try:
        with lease.acquire(address, ttl_s=30) as held:  # renewals every 5 s: only the event stream is this fast
            time.sleep(0.3)  # the holder's subscription is connected
            revoked_at = time.monotonic()
            agent.operator("train", "pause")
            while not held.should_stop():
                assert time.monotonic() - revoked_at < 1.0
                time.sleep(0.01)
        assert held.lost_reason == "lease revoked by the agent: revoked: training paused by the operator"
        assert agent.core.state.value == "idle"
    finally:
        agent.close()


def test_a_lease_runs_out_when_the_agent_stops_answering(address: str) -> None:
    agent = Agent(address)
    held = lease.acquire(address, ttl_s=0.3, timeout_s=0.1)
    agent.close()
    with held:
        started = time.monotonic()
        while not held.should_stop():
            assert time.monotonic() - started < 2.0
            time.sleep(0.01)
    assert held.lost_reason.startswith("lease expired unrenewed (no answer from the agent at ipc://")
    assert time.monotonic() - started <= 0.3 + 0.2  # never trained past the granted ttl (plus one step)


# --- the ClientApp's train handler --------------------------------------------------------------------------

def _context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=NODE_ID, node_config=node_config, state=RecordDict(), run_config={})


def test_train_handler_declines_when_the_agent_refuses_or_is_absent(address: str, tmp_path: Path) -> None:
    """Asked before anything is loaded: the node's dataset does not even exist here."""
    from zk0.server.config import ValidationConfig
    from zk0.server.schedule import ScheduleConfig
    from zk0.server.strategy import Outcome, Zk0FedProx

    strategy = Zk0FedProx(ScheduleConfig(), ValidationConfig(), {"local-steps": 8}, min_nodes=1)
    with serverapp_identity():
        [msg] = pushed(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), ListingGrid([NODE_ID])))
    agent = Agent(address)
    agent.operator("estop")
    try:
        reply = client_app.train(msg, _context({"agent-address": address, "dataset-roots": str(tmp_path / "none"),
                                                 "node-name": "arm1"}))
    finally:
        agent.close()
    assert dict(reply.content.config_records["info"]) == {"declined": "training lease refused: emergency stop engaged",
                                                          "node-name": "arm1"}
    assert not reply.content.array_records and agent.core.lease is None
    nobody = f"ipc://{tmp_path}/nobody.sock"
    silent = client_app.train(msg, _context({"agent-address": nobody, "dataset-roots": str(tmp_path / "none")}))
    assert silent.content.config_records["info"]["declined"] == f"training lease refused: no zk0 agent answering at {nobody}"
    assert strategy.aggregate_train(1, [reply]) == (None, None)
    assert strategy.current.clients[NODE_ID].outcome == Outcome.DECLINED


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """A real node dataset and the server's side of round 1 on it: strategy, global and agreed statistics."""
    from tests.learn.conftest import make_dataset
    from zk0.learn import stats as fedstats
    from zk0.learn.federation import STATS_RECORD, build_federated_policy, frozen_sha256, stats_to_record
    from zk0.learn.policy import trainable_state
    from zk0.server.config import ValidationConfig
    from zk0.server.schedule import ScheduleConfig
    from zk0.server.strategy import Zk0FedProx

    root = tmp_path_factory.mktemp("node") / "kitchen"
    make_dataset(root, episodes=4, frames=24)
    stats = fedstats.from_dataset(root)
    bundle = build_federated_policy("tiny", "cpu", root, stats, seed=0)
    strategy = Zk0FedProx(ScheduleConfig(), ValidationConfig(), min_nodes=1, train_config={
        "local-steps": 100_000, "batch-size": 2, "codec": "fp32", "model": "tiny", "seed": 0, "eval-fraction": 0.25})
    strategy.broadcast_records = {STATS_RECORD: stats_to_record(stats)}
    strategy.broadcast_config = {"frozen-sha256": frozen_sha256(bundle.policy)}
    return root, strategy, ArrayRecord(trainable_state(bundle.policy))


@pytest.fixture
def normal_scheduling() -> None:
    """Every thread of this process back to normal scheduling. Earlier tests in the same process can leave
    threads SCHED_FIFO 99 (SVT-AV1, run as root, takes it for its encoder threads and its caller); a real-time
    trainer on a busy machine starves the lease's renewal thread, which never happens in the ClientApp's own
    process."""
    for thread in os.listdir("/proc/self/task"):
        try:
            os.sched_setscheduler(int(thread), os.SCHED_OTHER, os.sched_param(0))
        except (ProcessLookupError, PermissionError):
            continue


def _train_message(strategy, arrays: ArrayRecord, server_round: int, local_steps: int):
    strategy.train_config["local-steps"] = local_steps
    with serverapp_identity():
        [msg] = pushed(strategy.configure_train(server_round, arrays, ConfigRecord(), ListingGrid([NODE_ID])))
    return msg


def test_train_handler_without_an_agent_trains_directly_and_sends_a_partial_update_when_revoked(
        federation, address: str, normal_scheduling: None) -> None:
    from zk0.server.strategy import Outcome

    root, strategy, arrays = federation
    node_config = {"dataset-roots": str(root), "policy-store": "", "node-name": "kitchen"}
    direct = client_app.train(_train_message(strategy, arrays, 1, local_steps=3), _context(node_config))
    assert direct.content.metric_records["metrics"]["steps"] == 3
    assert dict(direct.content["info"]) == {"node-name": "kitchen", "dataset-id": client_app.dataset_id([root])}
    strategy.aggregate_train(1, [direct])
    assert strategy.current.clients[NODE_ID].outcome == Outcome.ACCEPTED

    # With an agent: an operator pauses training 3 s in (tens of steps), long before the 100000-step budget is
    # spent; the revocation reaches the node over the agent's event stream and the steps done go out as a
    # partial update.
    agent = Agent(address)
    revoke = threading.Timer(3.0, agent.operator, ("train", "pause"))
    try:
        msg = _train_message(strategy, arrays, 2, local_steps=100_000)
        revoke.start()
        reply = client_app.train(msg, _context({**node_config, "agent-address": address}))
    finally:
        revoke.cancel()
        agent.close()
    steps = reply.content.metric_records["metrics"]["steps"]
    assert 0 < steps < 100_000
    assert reply.content.metric_records["metrics"]["num-examples"] == 2 * steps
    preempted = "lease revoked by the agent: revoked: training paused by the operator"
    assert reply.content.config_records["info"]["preempted"] == preempted
    arrays_out, summary = strategy.aggregate_train(2, [reply])
    client = strategy.current.clients[NODE_ID]
    assert client.accepted and client.reason == f"partial update ({steps} steps): {preempted}"
    assert summary["num-examples"] == 2 * steps and arrays_out is not None
