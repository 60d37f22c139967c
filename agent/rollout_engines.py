"""Policy actions for the rollout loop from lerobot 0.6.1's inference engines, without ever blocking the loop.

zk0 reuses lerobot's `SyncInferenceEngine` and `RTCInferenceEngine` (policy pre/post-processing, action
ordering, RTC's background chunking) but not its strategies' control loops (`lerobot/rollout/strategies`):
those run inference inline on the control thread, so a stalled policy stalls the loop and nothing can hold
the arm; they sleep with `precise_sleep` at normal priority; and they write datasets in the loop's process.
Here the loop only `offer`s observations and `take`s actions:

- `SyncSource` calls the sync engine from a worker thread, one call per offered observation (the newest:
  older ones are dropped), and the loop waits for that call's action at most until a set time within the tick.
- `RtcSource` is lerobot's RTC engine (its own background thread), with `GuardedActionQueue` in place of
  lerobot's `ActionQueue` (see there for the splice guard) and the RTC thread's observations in hardware
  feature layout, as lerobot's strategies hand them over.

Either way, an inference that never returns leaves the loop ticking on time, and the watchdog
(zk0.agent.rollout_guard) sees the actions stop.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Protocol

import numpy as np
import torch
from lerobot.policies.rtc import ActionQueue
from lerobot.rollout.inference import InferenceEngine, RTCInferenceEngine
from lerobot.utils.constants import OBS_STR
from lerobot.utils.feature_utils import build_dataset_frame

STOP_TIMEOUT_S = 3.0


class ActionSource(Protocol):
    """What the rollout loop needs from inference; `latencies_s` are per engine call (sync) or per chunk (rtc)."""

    latencies_s: list[float]

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def reset(self) -> None:
        """Forget the episode: the policy's queued actions and hidden state, and any pending observation."""

    def offer(self, observation: dict[str, Any]) -> None:
        """The newest raw observation (lerobot robot keys)."""

    def take(self, timeout_s: float) -> np.ndarray | None:
        """The freshest action not taken yet (in the dataset's action order), waiting at most `timeout_s`."""


class SyncSource:
    """lerobot's synchronous engine (one `get_action` per observation) in a worker thread."""

    def __init__(self, engine: InferenceEngine, features: dict) -> None:
        self._engine = engine
        self._features = features
        self._cond = threading.Condition()
        self._observation: dict[str, Any] | None = None
        self._action: np.ndarray | None = None
        self._busy = False
        self._stopping = False
        self._episode = 0  # an action computed for an earlier episode is never served
        self._thread = threading.Thread(target=self._work, name="zk0-inference", daemon=True)
        self.latencies_s: list[float] = []

    def start(self) -> None:
        self._engine.start()
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._engine.stop()  # first: an engine that can abandon a call in flight lets the worker go
        self._thread.join(timeout=STOP_TIMEOUT_S)

    def reset(self) -> None:
        with self._cond:
            self._observation = None
            # A call in flight belongs to the old episode; a stalled one is left to finish whenever it does.
            self._cond.wait_for(lambda: not self._busy, timeout=STOP_TIMEOUT_S)
            self._action = None
            self._episode += 1
            self._engine.reset()

    def offer(self, observation: dict[str, Any]) -> None:
        with self._cond:
            self._observation = observation
            self._cond.notify_all()

    def take(self, timeout_s: float) -> np.ndarray | None:
        with self._cond:
            self._cond.wait_for(lambda: self._action is not None, timeout=max(timeout_s, 0.0))
            action, self._action = self._action, None
            return action

    def _work(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopping or self._observation is not None)
                if self._stopping:
                    return
                observation, self._observation, self._busy = self._observation, None, True
                episode = self._episode
            started, action = time.perf_counter(), None
            try:
                action = self._engine.get_action(build_dataset_frame(self._features, observation, prefix=OBS_STR))
            finally:  # a raising policy leaves the worker; the watchdog then sees the actions stop
                with self._cond:
                    self._busy = False
                    if action is not None and episode == self._episode:
                        self.latencies_s.append(time.perf_counter() - started)
                        self._action = action.numpy().astype(np.float64)
                    self._cond.notify_all()


class GuardedActionQueue(ActionQueue):
    """lerobot's RTC action queue, spliced at the action the robot actually reached.

    The bug (lerobot 0.6.1, PR #4223, fixed upstream after 0.6.1 by #4454): when a new chunk arrives,
    `ActionQueue.merge` drops its first `real_delay` actions, `real_delay` being the inference latency in
    ticks (`ceil(latency * fps)`), on the theory that the robot executed that many old actions meanwhile. When
    fewer were executed (the first chunk of an episode, executed count 0; a queue that ran dry; a latency
    rounding up a tick), `_check_and_resolve_delays` only logs the mismatch and still trusts the estimate: the
    queue restarts deeper into the new chunk than the arm is, and the arm jumps to catch up.

    The guard: a new chunk's first action belongs to the tick when its observation was taken, so its index
    `k` belongs to the `k`-th action executed since. `_check_and_resolve_delays` returns the number actually
    executed during inference (`last_index - index before inference`), capped by the estimate: the queue is
    re-anchored to the executed index, and no action of the new chunk is skipped that the arm has not
    lived through. Also from #4454: `get_left_over` never hands RTC an empty or short prefix, which
    lerobot's `_normalize_prev_actions_length` would zero-pad (zero in normalized space decodes to the
    dataset mean: a one-tick pull toward a neutral pose); a short prefix is padded with its last action, an
    empty one is None (RTC then has nothing to blend, as on the first chunk). The safety envelope's step
    bound stays the last line behind this, not the fix.

    It also times each inference, from RTC reading the leftover (its first step) to the merge (its last).
    """

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self._inference_started: float | None = None
        self._idle = threading.Condition()
        self.latencies_s: list[float] = []

    def wait_idle(self, timeout_s: float) -> None:
        """Wait until no inference is between reading the leftover and merging (bounded: one may have failed)."""
        with self._idle:
            self._idle.wait_for(lambda: self._inference_started is None, timeout=timeout_s)

    def get_left_over(self) -> torch.Tensor | None:
        with self._idle:
            self._inference_started = time.perf_counter()
        left = super().get_left_over()
        if left is None or len(left) == 0:
            return None
        short = self.cfg.execution_horizon - len(left)
        return torch.cat([left, left[-1:].expand(short, -1)]) if short > 0 else left

    def merge(self, original_actions: torch.Tensor, processed_actions: torch.Tensor, real_delay: int,
              action_index_before_inference: int | None = None) -> None:
        super().merge(original_actions, processed_actions, real_delay, action_index_before_inference)
        with self._idle:
            if self._inference_started is not None:
                self.latencies_s.append(time.perf_counter() - self._inference_started)
            self._inference_started = None
            self._idle.notify_all()

    def _check_and_resolve_delays(self, real_delay: int, action_index_before_inference: int | None = None) -> int:
        estimate = max(0, real_delay)
        if action_index_before_inference is None:
            return estimate
        return min(estimate, max(0, self.last_index - action_index_before_inference))


class GuardedRTCEngine(RTCInferenceEngine):
    """lerobot's RTC engine with `GuardedActionQueue`. `start` builds a fresh queue and the RTC thread reads
    the queue attribute on every iteration, so swapping it before any observation is offered is race-free."""

    def start(self) -> None:
        super().start()
        self._action_queue = GuardedActionQueue(self._rtc_config)


class RtcSource:
    """lerobot's RTC engine: chunks computed in its background thread, one queued action per tick."""

    def __init__(self, engine: GuardedRTCEngine) -> None:
        self._engine = engine

    @property
    def latencies_s(self) -> list[float]:
        queue = self._engine.action_queue
        return queue.latencies_s if isinstance(queue, GuardedActionQueue) else []

    def start(self) -> None:
        self._engine.start()
        self._engine.resume()

    def stop(self) -> None:
        self._engine.stop()

    def reset(self) -> None:
        # An inference in flight would merge a chunk planned for the old scene after the reset, and RTC would
        # plan the first chunk from the old episode's last observation: pause, drop it, let the flight land.
        self._engine.pause()
        self._engine.notify_observation(None)
        queue = self._engine.action_queue
        if isinstance(queue, GuardedActionQueue):
            queue.wait_idle(STOP_TIMEOUT_S)
        self._engine.reset()
        self._engine.resume()

    def offer(self, observation: dict[str, Any]) -> None:
        self._engine.notify_observation(observation)

    def take(self, timeout_s: float) -> np.ndarray | None:
        if self._engine.failed:
            return None
        action = self._engine.get_action(None)
        return None if action is None else action.numpy().astype(np.float64)


def load_policy(path: Any, device: str, settings: Any) -> tuple[Any, Any]:
    """(PolicyBundle, CheckpointMeta) of the checkpoint at `path` on the backend `settings`
    (zk0.agent.config.RolloutSettings) names: torch, or onnxruntime over a cached export."""
    from zk0.learn.onnx_export import ExportOptions
    from zk0.learn.onnx_runtime import load_backend

    return load_backend(path, device, settings.backend, ExportOptions(settings.onnx_steps, settings.onnx_quantize))


def make_source(kind: str, bundle: Any, robot: Any, features: dict, task: str, fps: int, device: str) -> ActionSource:
    """The `kind` ("sync" or "rtc") action source for a loaded policy bundle, wired the way lerobot's
    `build_rollout_context` wires its engines. `robot`: the ThreadSafeRobot the loop sends through."""
    from lerobot.policies.rtc.configuration_rtc import RTCConfig
    from lerobot.rollout.inference import SyncInferenceEngine
    from lerobot.utils.constants import ACTION
    from lerobot.utils.feature_utils import hw_to_dataset_features

    policy = bundle.policy.to(device).eval()
    if kind == "sync":
        engine = SyncInferenceEngine(policy, bundle.preprocessor, bundle.postprocessor, features,
                                     list(features[ACTION]["names"]), task, device, robot.robot_type)
        return SyncSource(engine, features)
    if kind != "rtc":
        raise ValueError(f"unknown inference engine {kind!r} (sync or rtc)")
    policy.config.rtc_config = RTCConfig()
    policy.init_rtc_processor()
    engine = GuardedRTCEngine(policy, bundle.preprocessor, bundle.postprocessor, robot, policy.config.rtc_config,
                              hw_to_dataset_features(robot.observation_features, OBS_STR), task, fps, device)
    return RtcSource(engine)


def warm_up(bundle: Any, observation: dict[str, Any], features: dict, task: str, robot_type: str, device: str) -> float:
    """Compute one action chunk from a real observation and forget it; return the seconds it took.

    The first inference of a fresh policy is several times slower than the next (lazy allocations); without
    this the first episode would start with a watchdog hold, and RTC would size every later delay on it.
    """
    from copy import copy

    from lerobot.policies.utils import prepare_observation_for_inference

    started = time.perf_counter()
    with torch.inference_mode():
        batch = prepare_observation_for_inference(copy(build_dataset_frame(features, observation, prefix=OBS_STR)),
                                                  torch.device(device), task, robot_type)
        bundle.policy.predict_action_chunk(bundle.preprocessor(batch))
    bundle.policy.reset()
    bundle.preprocessor.reset()
    return time.perf_counter() - started
