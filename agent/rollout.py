"""The rollout loop: a policy drives the follower at a fixed rate, every target through the safety envelope.

One tick: read the follower (joints + cameras), offer the observation to the policy (zk0.agent.rollout_engines),
take its freshest action (waiting at most `action_wait_fraction` of the period), decide the mode with the
watchdog/estop transition (zk0.agent.rollout_guard), and send: the action in RUN, in HOLD the joints where they
were when the hold began and the gripper at its last goal (zk0.hw.safety.hold_target), torque off in TORQUE_OFF (which ends the rollout). Every target goes through
`EnvelopedRobot`, lerobot's `ThreadSafeRobot` with zk0's envelope in `send_action`: it is the one path from
the policy to the bus, and because it is the wrapper lerobot's own strategies and RTC engine send through
(`HardwareContext.robot_wrapper`), it would keep the envelope between action and bus under lerobot's loops too.

Timing follows the record loop (zk0.agent.record, NOTES "Recording"): the loop thread runs SCHED_FIFO
(`realtime`) while bus transactions run at normal policy (`polling`); a late tick moves the schedule instead
of bursting; ticks, on-time fraction and jitter come from the recorder's `tick_timing`. Inference threads are
started inside the real-time section so they are normally scheduled (SCHED_RESET_ON_FORK): a chunk being
computed never delays a tick. With `store`, each episode is recorded like a teleoperated one (observation,
the target actually sent, capture time) plus lerobot's DAgger `intervention` flag: true on frames whose
target was not the policy's own (the envelope changed it, the arm was held, or the operator paused the policy
or drove the arm with the leader: zk0.agent.dagger). Each episode starts autonomous; one ends on time even
during a correction (the next starts with the policy in control).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from lerobot.robots import Robot
from lerobot.rollout.strategies.dagger import DAggerPhase
from lerobot.rollout.robot_wrapper import ThreadSafeRobot
from lerobot.utils.constants import ACTION, OBS_STR
from lerobot.utils.feature_utils import build_dataset_frame

from zk0.agent.config import RolloutSettings
from zk0.agent.dataset_commit import EpisodeMeta
from zk0.agent.record import (
    CAPTURE_TIME, TRANSIENT_HARDWARE_ERRORS, EpisodeEnvironment, EpisodeStore, HardwareLost, RealWorld, TickTiming,
    dataset_features, is_slow, tick_timing,
)
from zk0.agent.dagger import Takeover
from zk0.agent.rollout_engines import ActionSource
from zk0.agent.rollout_guard import Estop, GuardState, Mode, guard_step
from zk0.hw.realtime import polling, realtime, shorten_gil_slices
from zk0.hw.safety import SafeCommand, SafetyEnvelope, hold_target

INTERVENTION = "intervention"  # lerobot's DAgger feature name and layout, so its tools read these datasets
TORQUE_OFF_RETRIES = 5  # per write, as lerobot's disconnect: one lost status packet must not leave a motor on
TORQUE_OFF_ATTEMPTS = 3
ENDED_ON_TIME, ENDED_BY_OPERATOR = "time", "operator"  # the episode ends that leave the arm under control
logger = logging.getLogger(__name__)


def rollout_features(robot: Robot) -> dict:
    """The recorder's features plus the per-frame intervention flag."""
    return {**dataset_features(robot), INTERVENTION: {"dtype": "bool", "shape": (1,), "names": None}}


class EnvelopedRobot(ThreadSafeRobot):
    """`ThreadSafeRobot` whose `send_action` passes the target through the safety envelope, against the
    present position of the latest `get_observation` (read every tick before sending)."""

    def __init__(self, robot: Robot, envelope: SafetyEnvelope) -> None:
        super().__init__(robot)
        self.envelope = envelope
        self.keys = [f"{name}.pos" for name in envelope.spec.limits.names]
        self.present: np.ndarray | None = None
        self.last_command: SafeCommand | None = None

    def get_observation(self) -> dict:
        observation = super().get_observation()
        self.present = np.array([observation[k] for k in self.keys], dtype=np.float64)
        return observation

    def send_action(self, action: dict) -> dict:
        if self.present is None:
            raise RuntimeError("send_action before any observation: the envelope needs the present position")
        command = self.envelope.propose(np.array([action[k] for k in self.keys], dtype=np.float64), self.present)
        sent = super().send_action(dict(zip(self.keys, command.target.tolist(), strict=True)))
        self.envelope.sent(command)
        self.last_command = command
        return sent

    def disable_torque(self) -> None:
        """Torque off on every motor, retrying lost status packets like lerobot's own disconnect does."""
        with self._lock:
            self.inner.bus.disable_torque(num_retry=TORQUE_OFF_RETRIES)


def cut_torque(robot: EnvelopedRobot, reason: str) -> None:
    """Torque off, or HardwareLost when the bus refuses it again and again (the caller's disconnect, with its
    own retries, is then the last resort)."""
    logger.warning("torque off: %s", reason)
    for attempt in range(1, TORQUE_OFF_ATTEMPTS + 1):
        try:
            with polling():
                robot.disable_torque()
            return
        except TRANSIENT_HARDWARE_ERRORS as error:
            if attempt == TORQUE_OFF_ATTEMPTS:
                raise HardwareLost(f"torque off failed {attempt} times ({reason}): {error}") from error


def finish_estop(robot: EnvelopedRobot, estop: Estop, hold_s: float) -> str:
    """The estop's torque off for an arm that is not moving (the servos hold their last goal): `hold_s` after the
    request. Returns the reason for the record, "estop"."""
    time.sleep(max(0.0, estop.requested_at + hold_s - time.perf_counter()))
    cut_torque(robot, "estop")
    return "estop"


@dataclass(frozen=True)
class RolloutPlan:
    task: str
    episodes: int
    fps: int
    episode_time_s: float
    reset_time_s: float  # between episodes the arm keeps its last goal while the scene is reset
    guard: RolloutSettings  # watchdog and estop times
    policy: str  # the version recorded with every episode
    calibration_hash: str
    min_rate_fraction: float = 0.95
    max_failed_ticks_in_row: int = 15
    realtime_priority: int | None = None
    # How far into its period a tick waits for the policy's action; the rest is left for the bus write.
    action_wait_fraction: float = 0.6


@dataclass(frozen=True)
class EpisodeReport:
    index: int
    seed: int | None
    success: bool | None
    timing: TickTiming
    interventions: dict[str, int]  # envelope interventions by kind (ticks)
    intervened_ticks: int  # ticks whose target was not the policy's own (envelope, hold or operator)
    held_ticks: int  # the watchdog's or estop's holds
    corrected_ticks: int  # ticks the operator drove the follower with the leader (DAgger correction)
    ended: str  # ENDED_ON_TIME, ENDED_BY_OPERATOR, or why the guard took the arm
    inference_ms: tuple[float, float]  # p50, p99 of the policy's latencies during the episode


@dataclass
class RolloutSummary:
    episodes: list[EpisodeReport] = field(default_factory=list)
    stopped: str | None = None  # why the rollout ended before its episodes (estop, watchdog, hardware)


class Rollout:
    def __init__(self, robot: EnvelopedRobot, source: ActionSource, plan: RolloutPlan, estop: Estop,
                 environment: EpisodeEnvironment | None = None, store: EpisodeStore | None = None,
                 progress: Callable[[int, int, Mode], object] | None = None, takeover: Takeover | None = None,
                 episode_over: Callable[[], bool] | None = None) -> None:
        """`episode_over`: asked every tick; True ends the episode early (an operator's verdict came in)."""
        self.robot = robot
        self.takeover = takeover or Takeover()
        self._episode_over = episode_over
        self.source = source
        self.plan = plan
        self.estop = estop
        self.environment = environment or RealWorld()
        self.store = store
        self._progress = progress

    def run(self) -> RolloutSummary:
        shorten_gil_slices()
        summary = RolloutSummary()
        with realtime(self.plan.realtime_priority):
            self.source.start()
            try:
                for index in range(self.plan.episodes):
                    if self.estop.requested_at is not None:  # before the first episode
                        summary.stopped = self._finish_estop()
                        break
                    report = self._episode(index)
                    summary.episodes.append(report)
                    if report.ended not in (ENDED_ON_TIME, ENDED_BY_OPERATOR):
                        summary.stopped = report.ended
                        break
                    if self.estop.requested_at is None and index + 1 < self.plan.episodes:
                        self.estop.sleep(self.plan.reset_time_s)  # wakes at once on an estop
                    if self.estop.requested_at is not None:  # during the episode's last hold, or the reset
                        summary.stopped = self._finish_estop()
                        break
            except HardwareLost as error:
                summary.stopped = f"hardware stopped answering: {error}"
            finally:
                self.source.stop()
        return summary

    def _finish_estop(self) -> str:
        return finish_estop(self.robot, self.estop, self.plan.guard.estop_hold_s)

    def _episode(self, index: int) -> EpisodeReport:
        store_index = self.store.num_episodes if self.store else index
        seed = self.environment.begin_episode(store_index)
        self.robot.envelope.reset()
        self.takeover.reset()
        self.source.reset()
        latencies_before = len(self.source.latencies_s)
        started_at = time.time()
        try:
            ended, timing, intervened, held, corrected = self._run_ticks(store_index)
        except HardwareLost:
            if self.store:
                self.store.discard_episode()
            raise
        success = self.environment.end_episode()
        latencies = np.array(self.source.latencies_s[latencies_before:]) * 1e3
        report = EpisodeReport(
            index=store_index, seed=seed, success=success, timing=timing,
            interventions={k: v for k, v in self.robot.envelope.counts.items() if v}, intervened_ticks=intervened,
            held_ticks=held, corrected_ticks=corrected, ended=ended,
            inference_ms=(float(np.percentile(latencies, 50)), float(np.percentile(latencies, 99))) if len(latencies) else (0.0, 0.0),
        )
        if self.store:
            self._commit(report, started_at)
        return report

    def _commit(self, report: EpisodeReport, started_at: float) -> None:
        timing = report.timing
        if timing.ticks == 0:
            self.store.discard_episode()
            return
        self.store.commit_episode(EpisodeMeta(
            episode_index=report.index, length=timing.ticks, task=self.plan.task, started_at=started_at,
            achieved_fps=round(timing.achieved_fps, 3), overruns=timing.overruns, failed_ticks=timing.failed,
            jitter_p99_ms=round(timing.jitter_p99_ms, 3), jitter_p50_ms=round(timing.jitter_p50_ms, 3),
            slow=is_slow(timing.achieved_fps, self.plan.fps, self.plan.min_rate_fraction),
            calibration_hash=self.plan.calibration_hash, seed=report.seed, success=report.success,
            policy=self.plan.policy, interventions=report.intervened_ticks,
        ))

    def _run_ticks(self, episode_index: int) -> tuple[str, TickTiming, int, int, int]:
        """Run one episode's ticks; return how it ended, its timing, and its intervened, held and corrected ticks."""
        plan, period = self.plan, 1.0 / self.plan.fps
        n_max = int(np.ceil(plan.episode_time_s * plan.fps)) + 1
        starts, deadlines, ends = np.empty(n_max), np.empty(n_max), np.empty(n_max)
        first = time.perf_counter()
        deadline, last_action_at, next_progress = first, first, first + 1.0
        state, held_at, goal = GuardState(), None, None
        n = failed = failed_in_row = intervened = held = corrected = 0
        ended = ENDED_ON_TIME
        while deadline - first < plan.episode_time_s - 1e-9 and n < n_max:
            if self._episode_over is not None and self._episode_over():
                ended = ENDED_BY_OPERATOR
                break
            self.estop.sleep(deadline - time.perf_counter())
            start = time.perf_counter()
            deadline = min(deadline, start)  # woken early by an estop: an unscheduled tick, not a late one
            try:
                if self.takeover.apply_requested() is not None and self.takeover.phase is DAggerPhase.AUTONOMOUS:
                    self.source.reset()  # the policy resumes from what it sees now, not from a chunk planned before
                phase = self.takeover.phase
                with polling():
                    observation = self.robot.get_observation()
                action = self._next_action(phase, observation, goal, deadline + plan.action_wait_fraction * period)
                now = time.perf_counter()
                if action is not None:
                    last_action_at = now
                state = guard_step(state, now, last_action_at, self.estop.requested_at, plan.guard)
                if state.mode is Mode.TORQUE_OFF:
                    ended = state.reason or "torque off"
                    cut_torque(self.robot, ended)
                    break
                if state.mode is not Mode.HOLD:
                    held_at = None
                elif held_at is None:  # the target of the whole hold, fixed when it begins
                    held_at = hold_target(self.robot.present, goal, self.robot.envelope.spec.limits.names)
                wanted = held_at if held_at is not None else action
                intervention = False
                if wanted is not None:
                    with polling():
                        self.robot.send_action(dict(zip(self.robot.keys, wanted.tolist(), strict=True)))
                    goal = self.robot.last_command.target
                    intervention = (held_at is not None or phase is not DAggerPhase.AUTONOMOUS
                                    or bool(self.robot.last_command.interventions))
                elif goal is None:  # nothing sent yet this episode: the servos keep the position they have
                    goal, intervention = self.robot.present, True
            except TRANSIENT_HARDWARE_ERRORS as error:
                # The guard's clock runs on without an observation: a stalled read must not delay torque off.
                state = guard_step(state, time.perf_counter(), last_action_at, self.estop.requested_at, plan.guard)
                if state.mode is Mode.TORQUE_OFF:
                    ended = state.reason or "torque off"
                    cut_torque(self.robot, ended)
                    break
                failed += 1
                failed_in_row += 1
                if failed_in_row >= plan.max_failed_ticks_in_row:
                    raise HardwareLost(f"{failed_in_row} ticks in a row failed, the last with: {error}") from error
                logger.warning("tick dropped (%d in a row): %s", failed_in_row, error)
                deadline = max(deadline + period, time.perf_counter())
                continue
            failed_in_row = 0
            held += held_at is not None
            corrected += held_at is None and phase is DAggerPhase.CORRECTING
            intervened += intervention
            if self.store:
                self._add_frame(observation, goal, start - first, intervention)
            end = time.perf_counter()
            starts[n], deadlines[n], ends[n] = start, deadline, end
            n += 1
            if self._progress and end >= next_progress:
                next_progress = end + 1.0
                self._progress(episode_index, n, state.mode)
            deadline = max(deadline + period, end)
        return ended, tick_timing(starts[:n], deadlines[:n], ends[:n], period, failed), intervened, held, corrected

    def _next_action(self, phase: DAggerPhase, observation: dict, goal: np.ndarray | None,
                     wait_until: float) -> np.ndarray | None:
        """This tick's target before the envelope: the policy's freshest action (AUTONOMOUS, waiting at most until
        `wait_until`), the last goal while the leader is brought to it (PAUSED), or the leader's position
        (CORRECTING); None when there is none or an estop was asked for."""
        if phase is DAggerPhase.AUTONOMOUS:
            self.source.offer(observation)
            if self.estop.requested_at is not None:
                return None
            return self.source.take(wait_until - time.perf_counter())
        if self.estop.requested_at is not None:
            return None
        with polling():
            if phase is DAggerPhase.PAUSED:
                target = goal if goal is not None else self.robot.present
                self.takeover.meet(target)
                return target
            return self.takeover.leader_position()

    def _add_frame(self, observation: dict, goal: np.ndarray, capture_time_s: float, intervention: bool) -> None:
        frame = build_dataset_frame(self.store.features, observation, prefix=OBS_STR)
        frame[ACTION] = goal.astype(np.float32)
        frame[CAPTURE_TIME] = np.array([capture_time_s], dtype=np.float32)
        frame[INTERVENTION] = np.array([intervention], dtype=bool)
        frame["task"] = self.plan.task
        self.store.add_frame(frame)
