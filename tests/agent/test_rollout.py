"""The rollout loop against an in-memory arm: watchdog hold and torque off for a stalled policy, estop
sequencing, non-finite actions held and flagged in the recorded frames, the control API's estop, SIGINT and
SIGTERM requesting it."""

from __future__ import annotations

import os
import signal
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from zk0.agent.control import Request
from zk0.agent.rollout import EnvelopedRobot, Rollout, RolloutPlan
from zk0.agent.rollout_engines import SyncSource
from zk0.agent.config import RolloutSettings
from zk0.agent.rollout_guard import Estop
from zk0.hw.safety import EnvelopeSpec, JointLimits, SafetyEnvelope
from tests.agent.conftest import FEATURES, JOINTS
from tests.agent.test_rollout_engines import ScriptedEngine

FPS = 30
NAMES = tuple(j.removesuffix(".pos") for j in JOINTS)
TIMES = RolloutSettings(watchdog_hold_s=0.2, watchdog_torque_off_s=1.0, estop_hold_s=0.5)


class MemoryArm:
    """An ideal arm: the present position is the last goal. Logs (time, goal) and the torque-off time."""

    robot_type = name = "memory_arm"
    is_connected = True
    observation_features = {**dict.fromkeys(JOINTS, float), "front": (48, 64, 3)}
    action_features = dict.fromkeys(JOINTS, float)

    def __init__(self) -> None:
        self.position = np.zeros(6)
        self.goals: list[tuple[float, np.ndarray]] = []
        self.torque_off_at: float | None = None
        self.torque_off_retries: int | None = None
        self.fail_reads = False  # a camera or bus that stopped answering
        self.bus = SimpleNamespace(disable_torque=self._disable_torque)

    def _disable_torque(self, num_retry: int = 0) -> None:
        self.torque_off_at, self.torque_off_retries = time.perf_counter(), num_retry

    def get_observation(self) -> dict:
        if self.fail_reads:
            time.sleep(0.05)  # a read that times out
            raise TimeoutError("camera front: no frame")
        return {**dict(zip(JOINTS, self.position.tolist())), "front": np.zeros((48, 64, 3), np.uint8)}

    def send_action(self, action: dict) -> dict:
        self.position = np.array([action[k] for k in JOINTS])
        self.goals.append((time.perf_counter(), self.position.copy()))
        return action


class ConstantEngine(ScriptedEngine):
    """Always the same action (NaN allowed)."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self._value = value

    def get_action(self, obs_frame: dict | None) -> torch.Tensor:
        return torch.full((6,), self._value)


class FrameList:
    features = FEATURES
    num_episodes = 0

    def __init__(self) -> None:
        self.frames: list[dict] = []
        self.committed: list = []

    def add_frame(self, frame: dict) -> None:
        self.frames.append(frame)

    def commit_episode(self, meta) -> None:
        self.committed.append(meta)
        self.num_episodes += 1

    def discard_episode(self) -> None:
        self.frames.clear()


def rollout(engine, estop: Estop | None = None, store=None, seconds: float = 3.0, episodes: int = 1,
            reset_s: float = 0.0, max_failed_ticks_in_row: int = 15) -> tuple[MemoryArm, Rollout]:
    arm = MemoryArm()
    limits = JointLimits(NAMES, np.full(6, -90.0), np.full(6, 90.0))
    envelope = SafetyEnvelope(EnvelopeSpec(limits, np.full(6, 10.0), np.full(6, 180.0), FPS))
    plan = RolloutPlan(task="t", episodes=episodes, fps=FPS, episode_time_s=seconds, reset_time_s=reset_s,
                       guard=TIMES, policy="v1@cafe", calibration_hash="cafe",
                       max_failed_ticks_in_row=max_failed_ticks_in_row)
    return arm, Rollout(EnvelopedRobot(arm, envelope), SyncSource(engine, FEATURES), plan, estop or Estop(), store=store)


def test_a_stalled_policy_is_held_within_200_ms_and_cut_off_after_1_s() -> None:
    arm, loop = rollout(ScriptedEngine(stall_at=10))  # 9 actions, then inference never returns
    summary = loop.run()
    assert summary.stopped.startswith("watchdog: no action for")
    report = summary.episodes[0]
    moving = [(t, g) for t, g in arm.goals if g[0] < 9]
    held = [(t, g) for t, g in arm.goals if g[0] == 9 and t > moving[-1][0] + 0.05]
    last_action = [t for t, g in arm.goals if g[0] == 9][0]
    # The hold goes out on the first tick at or after 200 ms without an action, then every tick.
    assert 0.2 <= held[0][0] - last_action <= 0.2 + 1.5 / FPS
    assert 0.95 <= arm.torque_off_at - last_action <= 1.0 + 1.5 / FPS
    assert all(t < arm.torque_off_at for t, _ in arm.goals)
    assert report.held_ticks == len(held) and report.intervened_ticks >= len(held)


def test_estop_holds_the_present_position_at_once_then_cuts_torque() -> None:
    estop = Estop()
    arm, loop = rollout(ScriptedEngine(), estop)
    timer = threading.Timer(0.5, estop.request, args=("test",))
    timer.start()
    summary = loop.run()
    assert summary.stopped == "estop"
    after = [(t, g) for t, g in arm.goals if t >= estop.requested_at]
    assert after[0][0] - estop.requested_at < 1 / FPS  # the sleeping loop woke for it
    assert all(np.array_equal(g, after[0][1]) for _, g in after)  # held where it was
    assert 0.5 <= arm.torque_off_at - estop.requested_at <= 0.5 + 1.5 / FPS
    assert arm.torque_off_retries == 5  # a lost status packet must not leave a motor powered


@pytest.mark.parametrize("episodes", [1, 2])
def test_an_estop_at_the_end_of_an_episode_still_cuts_torque_after_its_hold_not_after_the_reset(episodes) -> None:
    """The estop lands 0.15 s before the episode's end: its hold outlasts the episode. With a next episode the
    3 s reset must not delay torque off; after the last one the rollout still reports and completes the estop."""
    estop = Estop()
    arm, loop = rollout(ScriptedEngine(), estop, seconds=0.5, episodes=episodes, reset_s=3.0)
    timer = threading.Timer(0.35, estop.request, args=("test",))
    timer.start()
    summary = loop.run()
    assert summary.stopped == "estop" and len(summary.episodes) == 1
    assert 0.5 <= arm.torque_off_at - estop.requested_at <= 0.5 + 2 / FPS


def test_a_watchdog_cut_is_not_delayed_by_reads_that_keep_failing() -> None:
    """The policy stalls and the cameras stop answering (more failed reads in a row than fit in a second are
    allowed, as with slow timeouts): torque still goes off 1 s after the last action."""
    arm, loop = rollout(ScriptedEngine(stall_at=10), max_failed_ticks_in_row=1000)
    original = arm.send_action

    def send_then_fail(action: dict) -> dict:
        sent = original(action)
        if len(arm.goals) >= 9:
            arm.fail_reads = True
        return sent

    arm.send_action = send_then_fail
    summary = loop.run()
    assert summary.stopped.startswith("watchdog: no action for")
    last_action = arm.goals[8][0]
    assert 0.95 <= arm.torque_off_at - last_action <= 1.0 + 0.1


@pytest.mark.parametrize("value", [float("nan"), 1e6])
def test_bad_actions_never_leave_the_envelope_and_are_flagged(value: float) -> None:
    store = FrameList()
    arm, loop = rollout(ConstantEngine(value), store=store, seconds=1.0)
    summary = loop.run()
    assert summary.stopped is None
    goals = np.array([g for _, g in arm.goals])
    assert np.isfinite(goals).all() and (np.abs(goals) <= 90).all()
    assert (np.abs(np.diff(goals, axis=0, prepend=0)) <= 10 + 1e-9).all()
    report = summary.episodes[0]
    if np.isnan(value):
        # every command sent was a hold of a non-finite action (a tick whose action came late sends nothing)
        assert report.interventions == {"non-finite": len(arm.goals)} and len(arm.goals) > 0.8 * report.timing.ticks
    else:  # the first target is step-bound (no previous one), then velocity-bound up to the joint limit
        assert {"step", "velocity", "joint-limit"} <= set(report.interventions)
    assert all(f["intervention"].item() for f in store.frames[:3])  # flagged frames, DAgger-style
    meta = store.committed[0]
    assert meta.policy == "v1@cafe" and meta.length == len(store.frames) and meta.interventions > 0


def test_control_api_takeover_estop_and_lease_refusal() -> None:
    from zk0.agent.dagger import Takeover
    from zk0.agent.rollout_cli import RolloutStatus

    estop, takeover = Estop(), Takeover()
    handle = RolloutStatus("v1@cafe", SimpleNamespace(task="t"), takeover).control_handler(estop)
    assert handle(Request("status"))["policy"] == "v1@cafe" and estop.requested_at is None
    assert handle(Request("pause"))["phase"] == "autonomous"  # asked for; the loop applies it at its next tick
    takeover.apply_requested()
    with pytest.raises(ValueError, match="--dagger"):  # the control server turns this into an error reply
        handle(Request("correct"))
    assert handle(Request("status"))["phase"] == "paused" and handle(Request("status"))["leader"] is False
    assert handle(Request("estop"))["accepted"] == "estop" and estop.source == "zk0ctl"
    refusal = handle(Request("lease", SimpleNamespace(purpose="train", ttl_s=30, holder="n")))
    assert refusal["granted"] is False and "rollout" in refusal["reason"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_request_the_estop_instead_of_ending_the_process(signum) -> None:
    from zk0.agent.rollout_cli import estop_on_signals

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        estop = estop_on_signals()
        os.kill(os.getpid(), signum)
        deadline = time.monotonic() + 5.0
        while estop.requested_at is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert estop.source == signum.name
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
