"""Simulated episodes driven by a controller in lock-step: observe, act, clamp, one tick of the world.

A controller is anything with `reset(task, seed)` and `act(observation) -> joint target`; `PolicyController`
wraps a SmolVLA bundle the way lerobot's rollout does (observation to tensors, pre-processor,
`select_action`, post-processor). Every target passes the same safety envelope a real rollout uses
(zk0.hw.safety) before it becomes the servos' goal. Nothing here reads a clock, so an episode is a function
of (task, seed, controller) and machine load changes only how long it takes: the policy's flow-matching
noise comes from a generator seeded with the episode seed, which also gives both policies of a pair the
same noise stream.

An episode ends at the first tick the task's success predicate holds (time to success = ticks / fps) or
after `max_ticks`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from zk0.hw.sim.lockstep import LockstepSim, Observation
from zk0.hw.sim.tasks import Task, get_task

STATE_KEY = "observation.state"
IMAGE_PREFIX = "observation.images."


class Controller(Protocol):
    def reset(self, task: Task, seed: int) -> None:
        """Start an episode of `task`; `seed` fixes any randomness the controller has."""

    def act(self, observation: Observation) -> np.ndarray:
        """Joint target (normalized units) for this tick."""


class Envelope(Protocol):
    """zk0.hw.safety.SafetyEnvelope: a SafeCommand (target, held, interventions) for a target given the
    present joints, and per-kind counts of the ticks it intervened on."""

    counts: dict[str, int]

    def __call__(self, target: np.ndarray, present: np.ndarray) -> Any: ...


@dataclass(frozen=True)
class EpisodeOutcome:
    """One episode's verdict and what it took; `trajectory_sha256` fingerprints every commanded and present
    joint vector, so two runs that agree on it ran the same episode."""

    task: str
    seed: int
    success: bool
    time_to_success_s: float | None
    ticks: int
    intervened_ticks: int = 0  # ticks whose target the envelope changed
    interventions: dict[str, int] = field(default_factory=dict)  # ticks per kind (zk0.hw.safety.INTERVENTIONS)
    trajectory_sha256: str = ""
    table_contacts: int = 0  # ticks the arm spent pressing into the table (the world stopped it there)


def run_episode(sim: LockstepSim, controller: Controller, envelope: Envelope, task: str, seed: int,
                max_ticks: int) -> EpisodeOutcome:
    """Run one episode of `task` with `seed`; `envelope` must be fresh (its counts are the episode's)."""
    spec = get_task(task)
    sim.reset(spec.name, seed)
    controller.reset(spec, seed)
    digest = hashlib.sha256()
    success, intervened = False, 0
    while sim.ticks < max_ticks and not success:
        observation = sim.observe()
        command = envelope(np.asarray(controller.act(observation), dtype=np.float64), observation.joints)
        target = np.asarray(command.target, dtype=np.float64)
        intervened += bool(command.interventions)
        digest.update(observation.joints.astype(np.float64).tobytes())
        digest.update(target.tobytes())
        sim.step(target)
        success = sim.success()
    return EpisodeOutcome(
        task=spec.name, seed=seed, success=success, time_to_success_s=sim.t if success else None, ticks=sim.ticks,
        intervened_ticks=intervened, interventions={k: v for k, v in envelope.counts.items() if v},
        trajectory_sha256=digest.hexdigest(), table_contacts=sim.table_contact_ticks,
    )


class PolicyController:
    """A SmolVLA bundle (zk0.learn.policy.PolicyBundle) as a controller: state = present joints, one image per
    camera the policy was trained with, task = the task's instruction.

    The steps are lerobot's (`lerobot.common.control_utils.predict_action`) except that the flow-matching
    noise comes from the controller's own generator, seeded per episode, instead of torch's global one.
    """

    def __init__(self, bundle: Any, robot_type: str, device: str = "cpu") -> None:
        import torch

        self.bundle, self.robot_type = bundle, robot_type
        self.device = torch.device(device)
        config = bundle.policy.config
        self._noise_shape = (1, config.chunk_size, config.max_action_dim)
        self._generator = torch.Generator()
        self.instruction = ""

    def reset(self, task: Task, seed: int) -> None:
        self.bundle.policy.reset()
        self.bundle.preprocessor.reset()
        self.bundle.postprocessor.reset()
        self._generator.manual_seed(seed)
        self.instruction = task.instruction

    def act(self, observation: Observation) -> np.ndarray:
        import torch
        from lerobot.policies.utils import prepare_observation_for_inference

        frame = {STATE_KEY: observation.joints.astype(np.float32)}
        frame.update({IMAGE_PREFIX + name: image for name, image in observation.images.items()})
        # drawn every tick, used when the policy starts a new chunk: the stream depends on ticks only
        noise = torch.randn(self._noise_shape, generator=self._generator).to(self.device)
        with torch.inference_mode():
            batch = prepare_observation_for_inference(frame, self.device, self.instruction, self.robot_type)
            action = self.bundle.policy.select_action(self.bundle.preprocessor(batch), noise=noise)
            action = self.bundle.postprocessor(action)
        return action.squeeze(0).to("cpu").numpy().astype(np.float64)


def policy_cameras(policy_config: Any) -> dict[str, tuple[int, int]]:
    """Camera name -> (width, height) from the policy's image input features (shape C, H, W)."""
    cameras = {}
    for key, feature in policy_config.input_features.items():
        if key.startswith(IMAGE_PREFIX):
            _, height, width = feature.shape
            cameras[key[len(IMAGE_PREFIX):]] = (int(width), int(height))
    return cameras


def policy_in_sim(bundle: Any, fps: int, robot: str, device: str = "cpu") -> tuple[LockstepSim, PolicyController]:
    """A simulation rendering exactly the cameras the policy was trained with, and the policy as its
    controller; ValueError (one line) when the policy's inputs are not an SO-10x arm with simulated cameras."""
    from zk0.hw.sim.calibration import MOTOR_NAMES
    from zk0.hw.sim.render import CAMERA_NAMES

    config = bundle.policy.config
    state = config.input_features.get(STATE_KEY)
    if state is None or tuple(state.shape) != (len(MOTOR_NAMES),):
        raise ValueError(f"the policy's {STATE_KEY} is {None if state is None else tuple(state.shape)}, "
                         f"not the {len(MOTOR_NAMES)} joints of an SO-10x arm")
    cameras = policy_cameras(config)
    unknown = sorted(set(cameras) - set(CAMERA_NAMES))
    if unknown:
        raise ValueError(f"the policy's cameras {unknown} have no simulated counterpart ({', '.join(CAMERA_NAMES)})")
    return LockstepSim(cameras, fps, robot), PolicyController(bundle, f"{robot}_follower", device)
