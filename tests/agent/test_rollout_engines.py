"""The RTC splice guard against lerobot 0.6.1's delay mis-estimate, and the sync engine's worker thread (a
stalled inference never blocks the loop's `take`)."""

from __future__ import annotations

import threading
import time

import numpy as np
import torch
from lerobot.policies.rtc import ActionQueue
from lerobot.policies.rtc.configuration_rtc import RTCConfig
from lerobot.rollout.inference import InferenceEngine

from zk0.agent.rollout_engines import GuardedActionQueue, SyncSource
from tests.agent.conftest import FEATURES, JOINTS


def chunk(start: float, n: int = 30) -> torch.Tensor:
    """A chunk whose action k is `start + k` on every joint: a queue position reads as its chunk index."""
    return (start + torch.arange(n, dtype=torch.float32))[:, None].expand(n, 6).clone()


def test_first_chunk_is_not_spliced_ahead_of_a_standing_arm() -> None:
    # lerobot 0.6.1: the first inference's warm-up latency (21 ticks) drops 21 actions the arm never executed.
    lerobot, guarded = ActionQueue(RTCConfig()), GuardedActionQueue(RTCConfig())
    for queue in (lerobot, guarded):
        queue.get_left_over()
        queue.merge(chunk(0), chunk(0), real_delay=21, action_index_before_inference=0)
    assert lerobot.get()[0] == 21  # the jump
    assert guarded.get()[0] == 0


def test_new_chunk_is_anchored_at_the_executed_index() -> None:
    queue = GuardedActionQueue(RTCConfig())
    queue.merge(chunk(0), chunk(0), real_delay=0, action_index_before_inference=0)
    for _ in range(5):
        queue.get()
    before = queue.get_action_index()
    left = queue.get_left_over()
    assert left[0, 0] == 5
    queue.get(), queue.get()  # the robot executes two actions while the next chunk is computed
    queue.merge(chunk(100), chunk(100), real_delay=3, action_index_before_inference=before)  # estimate: 3
    assert queue.get()[0] == 102  # two executed -> the third action of the new chunk, not the fourth
    assert len(queue.latencies_s) == 1
    # An estimate below the executed count is kept (RTC's own delay bound for its guidance).
    before = queue.get_action_index()
    queue.get_left_over()
    for _ in range(4):
        queue.get()
    queue.merge(chunk(200), chunk(200), real_delay=1, action_index_before_inference=before)
    assert queue.get()[0] == 201


def test_leftover_prefix_is_never_zero_padded() -> None:
    queue = GuardedActionQueue(RTCConfig(execution_horizon=10))
    assert queue.get_left_over() is None
    queue.merge(chunk(0, 12), chunk(0, 12), real_delay=0, action_index_before_inference=0)
    for _ in range(9):
        queue.get()
    left = queue.get_left_over()  # 3 real actions left: padded with the last one, not with zeros (the mean)
    assert left[:, 0].tolist() == [9, 10, 11] + [11] * 7
    for _ in range(3):
        queue.get()
    assert queue.get_left_over() is None  # empty: nothing to blend, as on a first chunk


class ScriptedEngine(InferenceEngine):
    """Returns its call count as a 6-joint action; blocks from call `stall_at` on until stopped. `returned_at`:
    Unix time its last action was returned (what a bus trace's timestamps compare with)."""

    def __init__(self, stall_at: int | None = None, delay_s: float = 0.0) -> None:
        self.calls = 0
        self.resets = 0
        self.returned_at: float | None = None
        self._stall_at, self._delay_s = stall_at, delay_s
        self._released = threading.Event()

    def start(self) -> None: ...

    def stop(self) -> None:
        self._released.set()

    def reset(self) -> None:
        self.resets += 1

    def get_action(self, obs_frame: dict | None) -> torch.Tensor | None:
        assert obs_frame["observation.state"].shape == (6,)
        self.calls += 1
        if self._stall_at is not None and self.calls >= self._stall_at:
            self._released.wait()
            return None
        time.sleep(self._delay_s)
        self.returned_at = time.time()
        return torch.full((6,), float(self.calls))


def observation(value: float = 0.0) -> dict:
    return {**dict.fromkeys(JOINTS, value), "front": np.zeros((48, 64, 3), np.uint8)}


def test_sync_source_serves_the_newest_observation_and_never_blocks_on_a_stall() -> None:
    engine = ScriptedEngine(stall_at=3, delay_s=0.01)
    source = SyncSource(engine, FEATURES)
    source.start()
    try:
        assert source.take(0.0) is None
        source.offer(observation())
        assert source.take(1.0).tolist() == [1.0] * 6
        source.offer(observation())
        assert source.take(1.0)[0] == 2.0
        assert source.take(0.0) is None  # each action is taken once
        source.offer(observation())  # call 3 stalls
        started = time.perf_counter()
        assert source.take(0.05) is None
        assert time.perf_counter() - started < 0.5
        assert len(source.latencies_s) == 2
    finally:
        source.stop()


def test_sync_source_reset_forgets_pending_work() -> None:
    engine = ScriptedEngine(delay_s=0.05)
    source = SyncSource(engine, FEATURES)
    source.start()
    try:
        source.offer(observation())
        time.sleep(0.01)  # the call is in flight
        source.reset()
        assert engine.resets == 1 and source.take(0.1) is None  # its action belonged to the old episode
    finally:
        source.stop()
