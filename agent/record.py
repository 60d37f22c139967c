"""The record loop: leader -> safety envelope -> follower at a fixed rate, every frame into the dataset store.

One tick: read the follower (joints + every camera), read the leader, pass the leader's target through the
safety envelope (`zk0.hw.safety`), send it, and add the frame holding the observation and the action
actually sent. The envelope forgets its last target at each episode start (the scene was reset); each
saved episode's metadata counts the frames whose action was not the leader's own (`interventions`), and
`SessionSummary.interventions` counts each kind of intervention.
Frames carry their capture time (`capture_time_s`, seconds since the episode's first frame) next to
lerobot's nominal `timestamp = frame_index / fps`, which video decoding relies on; ticks that miss
their deadline are counted, and an episode whose achieved rate falls below the configured fraction
of the fps is flagged in its zk0 metadata. A tick whose bus read or camera read fails (after lerobot's own
read retries) is dropped and counted; `max_failed_ticks_in_row` failures in a row end the session with
the episode in progress discarded and every committed one intact.

Operator controls work without a display: lines on stdin (`s` or an empty line: save now, `d`: discard,
`r`: re-record, `q`: save and stop) and signals (SIGUSR1: save now, SIGUSR2: re-record,
SIGINT/SIGTERM: save and stop).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

import numpy as np
from lerobot.robots import Robot
from lerobot.teleoperators import Teleoperator
from lerobot.utils.constants import ACTION, OBS_STR
from lerobot.utils.feature_utils import build_dataset_frame, hw_to_dataset_features
from lerobot.utils.robot_utils import precise_sleep

from zk0.agent.dataset_commit import EpisodeMeta
from zk0.agent.dataset_store import EpisodeRejected, fault_point, free_disk_mb
from zk0.hw.realtime import polling, realtime, shorten_gil_slices
from zk0.hw.safety import SafetyEnvelope

CAPTURE_TIME = "capture_time_s"
# What a lost status packet, a bus timeout or a stale camera frame raises in lerobot: a tick that hits
# one of these is dropped and counted, not fatal, until too many fail in a row.
TRANSIENT_HARDWARE_ERRORS = (ConnectionError, TimeoutError)
DISK_CHECK_PERIOD_S = 1.0

logger = logging.getLogger(__name__)


def dataset_features(robot: Robot) -> dict:
    """lerobot's features for this robot (state, action, one video per camera) plus the capture time."""
    return {
        **hw_to_dataset_features(robot.action_features, ACTION),
        **hw_to_dataset_features(robot.observation_features, OBS_STR),
        CAPTURE_TIME: {"dtype": "float32", "shape": (1,), "names": None},
    }


# ---------------------------------------------------------------- operator controls


class OperatorEvents:
    """What the operator asked for during the current phase; set from other threads or signal handlers."""

    COMMANDS = {"s": "save", "": "save", "d": "discard", "r": "rerecord", "q": "stop"}

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.ending: str | None = None  # "save" | "discard" | "rerecord": ends the phase
        self.stop = False

    def request(self, command: str) -> None:
        with self._lock:
            if command == "stop":
                self.stop = True
                self.ending = self.ending or "save"
            else:
                self.ending = command

    def take_ending(self) -> str | None:
        with self._lock:
            ending, self.ending = self.ending, None
            return ending

    def watch_stream(self, stream: IO[str]) -> threading.Thread:
        """Read operator commands, one per line, from `stream` (stdin) in a daemon thread."""

        def read() -> None:
            for line in stream:
                command = self.COMMANDS.get(line.strip().lower())
                if command:
                    self.request(command)

        thread = threading.Thread(target=read, name="zk0-operator-input", daemon=True)
        thread.start()
        return thread

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGUSR1, lambda *_: self.request("save"))
        signal.signal(signal.SIGUSR2, lambda *_: self.request("rerecord"))
        signal.signal(signal.SIGINT, lambda *_: self.request("stop"))
        signal.signal(signal.SIGTERM, lambda *_: self.request("stop"))


# ---------------------------------------------------------------- timing (pure)


@dataclass(frozen=True)
class TickTiming:
    """How well a phase kept its schedule."""

    ticks: int
    # Of all scheduled slots (ticks run, failed and skipped), those whose tick finished within one period of its deadline.
    on_time_fraction: float
    overruns: int
    failed: int  # ticks dropped because the hardware did not answer; not among `ticks`
    jitter_p50_ms: float
    jitter_p99_ms: float
    achieved_fps: float
    skipped: int = 0  # slots that passed without a tick because one before ran late (the schedule moved on)


def tick_timing(starts: np.ndarray, deadlines: np.ndarray, ends: np.ndarray, period_s: float, failed: int = 0) -> TickTiming:
    """Timing of completed ticks from their start times, scheduled deadlines and end times (seconds),
    plus the number of `failed` ticks (which count as late). A late tick moves the schedule instead of bursting
    to catch up, so the slots it pushed past show as gaps of more than a period between deadlines: they count
    as late too (failed ticks leave such gaps as well and are counted once)."""
    n = len(starts)
    if n == 0:
        return TickTiming(0, 0.0 if failed else 1.0, 0, failed, 0.0, 0.0, 0.0)
    jitter_ms = np.abs(starts - deadlines) * 1e3
    overran = (ends - deadlines) > period_s
    gaps = np.diff(deadlines) / period_s
    skipped = max(0, int(np.ceil(gaps - 1 - 1e-6).clip(min=0).sum()) - failed)
    span = starts[-1] - starts[0]
    return TickTiming(
        ticks=n,
        on_time_fraction=float((n - overran.sum()) / (n + failed + skipped)),
        overruns=int(overran.sum()),
        failed=failed,
        jitter_p50_ms=float(np.percentile(jitter_ms, 50)),
        jitter_p99_ms=float(np.percentile(jitter_ms, 99)),
        achieved_fps=float((n - 1) / span) if span > 0 else 0.0,
        skipped=skipped,
    )


def is_slow(achieved_fps: float, fps: int, min_rate_fraction: float) -> bool:
    return achieved_fps < min_rate_fraction * fps


# ---------------------------------------------------------------- environment hooks


class EpisodeEnvironment(Protocol):
    """What surrounds the arm: the sim world resets it per episode and judges success; a real host does neither."""

    def begin_episode(self, episode_index: int) -> int | None:
        """Prepare the scene; return the seed used, if any."""

    def end_episode(self) -> bool | None:
        """The success verdict, if the environment can judge it."""


class RealWorld:
    def begin_episode(self, episode_index: int) -> None:
        return None

    def end_episode(self) -> None:
        return None


# ---------------------------------------------------------------- the recorder


class EpisodeStore(Protocol):
    """Where episodes go: `DatasetStore` in-process, or `WriterProcess` (the same store in a child process)."""

    root: Path
    features: dict
    num_episodes: int

    def add_frame(self, frame: dict) -> None: ...

    def commit_episode(self, meta: EpisodeMeta) -> None:
        """Raises `EpisodeRejected` when the saved episode is incomplete (it is rolled back)."""

    def discard_episode(self) -> None: ...


@dataclass(frozen=True)
class RecordPlan:
    task: str
    episodes: int
    fps: int
    episode_time_s: float
    reset_time_s: float
    min_rate_fraction: float
    min_free_disk_mb: float
    calibration_hash: str
    max_failed_ticks_in_row: int = 15
    realtime_priority: int | None = None  # SCHED_FIFO priority of the loop while it runs; None: normal


class HardwareLost(ConnectionError):
    """Too many ticks in a row failed: the arm or a camera stopped answering."""


@dataclass
class SessionSummary:
    saved: list[EpisodeMeta] = field(default_factory=list)
    interventions: list[dict[str, int]] = field(default_factory=list)  # the envelope's counts, per saved episode
    discarded: int = 0
    rerecorded: int = 0
    stopped_for_disk: bool = False
    stopped_early: str | None = None  # why the session ended before its episodes; the episode in progress is not saved
    timings: list[TickTiming] = field(default_factory=list)


class Recorder:
    def __init__(
        self,
        robot: Robot,
        leader: Teleoperator,
        store: EpisodeStore,
        envelope: SafetyEnvelope,
        plan: RecordPlan,
        events: OperatorEvents,
        environment: EpisodeEnvironment | None = None,
        progress: Callable[[int, int], object] | None = None,
    ) -> None:
        self.robot = robot
        self.leader = leader
        self.store = store
        self.envelope = envelope
        self.plan = plan
        self.events = events
        self.environment = environment or RealWorld()
        self._progress = progress
        self._joint_keys = [f"{name}.pos" for name in envelope.spec.limits.names]
        self._features = store.features
        self._intervened_frames = 0

    def record(self) -> SessionSummary:
        shorten_gil_slices()
        summary = SessionSummary()
        while len(summary.saved) < self.plan.episodes and not self.events.stop:
            if free_disk_mb(self.store.root) < self.plan.min_free_disk_mb:
                summary.stopped_for_disk = True
                break
            index = self.store.num_episodes
            seed = self.environment.begin_episode(index)
            self.envelope.reset()
            self._intervened_frames = 0
            started_at = time.time()
            try:
                ending, timing, low_disk = self._run_phase(self.plan.episode_time_s, record=True, episode_index=index)
            except HardwareLost as error:
                self.store.discard_episode()
                summary.stopped_early = f"hardware stopped answering: {error}"
                break
            success = self.environment.end_episode()
            summary.timings.append(timing)
            summary.stopped_for_disk |= low_disk
            if ending in ("discard", "rerecord") or timing.ticks == 0:
                self.store.discard_episode()
                summary.discarded += ending == "discard"
                summary.rerecorded += ending == "rerecord"
            else:
                meta = EpisodeMeta(
                    episode_index=index, length=timing.ticks, task=self.plan.task, started_at=started_at,
                    achieved_fps=round(timing.achieved_fps, 3), overruns=timing.overruns, failed_ticks=timing.failed,
                    jitter_p99_ms=round(timing.jitter_p99_ms, 3), jitter_p50_ms=round(timing.jitter_p50_ms, 3),
                    slow=is_slow(timing.achieved_fps, self.plan.fps, self.plan.min_rate_fraction),
                    calibration_hash=self.plan.calibration_hash, seed=seed, success=success,
                    interventions=self._intervened_frames,
                )
                try:
                    self.store.commit_episode(meta)
                except EpisodeRejected as error:
                    # An episode saved incomplete points at the encoder or the disk: later ones would likely fare no better.
                    summary.stopped_early = f"episode {index} was saved incomplete and rolled back: {error}"
                    break
                summary.saved.append(meta)
                summary.interventions.append(dict(self.envelope.counts))
            if summary.stopped_for_disk:
                break
            more = len(summary.saved) < self.plan.episodes and not self.events.stop
            if more and self.plan.reset_time_s > 0:
                try:
                    self._run_phase(self.plan.reset_time_s, record=False, episode_index=index)
                except HardwareLost as error:
                    summary.stopped_early = f"hardware stopped answering: {error}"
                    break
        return summary

    def _run_phase(self, duration_s: float, record: bool, episode_index: int) -> tuple[str | None, TickTiming, bool]:
        """Teleoperate for `duration_s` (recording frames if `record`); return how it ended and its timing."""
        period = 1.0 / self.plan.fps
        # Ticks are at least a period apart, so a phase of `duration_s` holds at most this many.
        n_max = int(np.ceil(duration_s * self.plan.fps)) + 1
        starts, deadlines, ends = np.empty(n_max), np.empty(n_max), np.empty(n_max)
        ending, low_disk = None, False
        first = time.perf_counter()
        deadline = first
        next_disk_check = first + DISK_CHECK_PERIOD_S
        n = failed = failed_in_row = 0
        with realtime(self.plan.realtime_priority):
            # The phase lasts `duration_s` of wall time: a slow loop records fewer frames, never a longer episode.
            while deadline - first < duration_s - 1e-9 and n < n_max:
                precise_sleep(deadline - time.perf_counter())
                start = time.perf_counter()
                try:
                    self._tick(record, start - first)
                except TRANSIENT_HARDWARE_ERRORS as error:
                    failed += 1
                    failed_in_row += 1
                    if failed_in_row >= self.plan.max_failed_ticks_in_row:
                        raise HardwareLost(f"{failed_in_row} ticks in a row failed, the last with: {error}") from error
                    logger.warning("tick dropped (%d in a row): %s", failed_in_row, error)
                    end = time.perf_counter()
                    deadline = max(deadline + period, end)
                    continue
                failed_in_row = 0
                end = time.perf_counter()
                starts[n], deadlines[n], ends[n] = start, deadline, end
                n += 1
                if record and n == 10:
                    fault_point("mid_episode")
                ending = self.events.take_ending()
                if ending:
                    break
                if end >= next_disk_check:
                    next_disk_check = end + DISK_CHECK_PERIOD_S
                    if record and free_disk_mb(self.store.root) < self.plan.min_free_disk_mb:
                        low_disk = True
                        break
                    if self._progress:
                        self._progress(episode_index, n)
                elif n == 1 and self._progress:  # teleop runs from the first frame on: say so then, not a second later
                    self._progress(episode_index, n)
                # A late tick moves the schedule rather than bursting to catch up: a burst would capture
                # frames closer together than the fps the dataset claims.
                deadline = max(deadline + period, end)
        return ending, tick_timing(starts[:n], deadlines[:n], ends[:n], period, failed), low_disk

    def _tick(self, record: bool, capture_time_s: float) -> None:
        with polling():
            observation = self.robot.get_observation()
            target = self.leader.get_action()
            present = np.fromiter((observation[k] for k in self._joint_keys), dtype=np.float64, count=len(self._joint_keys))
            wanted = np.fromiter((target[k] for k in self._joint_keys), dtype=np.float64, count=len(self._joint_keys))
            command = self.envelope.propose(wanted, present)
            sent = self.robot.send_action(dict(zip(self._joint_keys, command.target.tolist(), strict=True)))
            self.envelope.sent(command)
        if not record:
            return
        self._intervened_frames += bool(command.interventions)
        frame = build_dataset_frame(self._features, observation, prefix=OBS_STR)
        frame[ACTION] = np.fromiter((sent[k] for k in self._joint_keys), dtype=np.float32, count=len(self._joint_keys))
        frame[CAPTURE_TIME] = np.array([capture_time_s], dtype=np.float32)
        frame["task"] = self.plan.task
        self.store.add_frame(frame)
