"""Scripted demonstrations of the simulated tasks, recorded in lock-step, and served as training batches.

The scripted operator performs each (task, scene seed) in the loop `zk0 validate --sim` judges in
(zk0.hw.sim.lockstep, safety envelope included); what it saw (present joints, each camera's image at the size
hosts record), what it commanded and where the objects were (the privileged scene vector the sim base's vision
probe learns from) are kept per tick. `DemoData` serves them with the keys, chunking and padding
zk0.learn.data.EpisodeData serves recorded datasets with, so the trainer cannot tell them apart. The sim base
(zk0.learn.sim_base) pretrains on them; benches fine-tune on them as a host would.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

FPS = 30
ROBOT = "so101"
STATE = "observation.state"
ACTION = "action"
IMAGE_PREFIX = "observation.images."


@dataclass
class Demo:
    """One demonstration: per tick the present joints, the commanded target and each camera's image."""

    task: str  # the instruction, as recorded datasets store it
    seed: int
    state: np.ndarray  # (T, 6) float32
    action: np.ndarray  # (T, 6) float32
    images: dict[str, np.ndarray]  # camera -> (ceil(T / image_stride), 3, H, W) uint8: ticks 0, stride, ...
    success: bool
    scene: np.ndarray | None = None  # (T, SCENE_DIMS) float32: `scene_vector` per tick (privileged, sim only)
    image_stride: int = 1


SCENE_COLORS = ("red", "green", "blue")
SCENE_DIMS = 3 * len(SCENE_COLORS) + 2
# Rough centre and spread of the table's objects (metres), so the probe's targets are O(1).
_SCENE_CENTRE = np.array([0.2, 0.0, 0.03] * len(SCENE_COLORS) + [0.18, 0.0])
_SCENE_SCALE = np.array([0.05, 0.1, 0.03] * len(SCENE_COLORS) + [0.05, 0.15])


def scene_vector(world: Any) -> np.ndarray:
    """Where the cubes (x, y, z each) and the bin (x, y) are, scaled to O(1): the vision probe's target."""
    cubes = world.scene.cubes
    raw = np.concatenate([cubes[c].position if c in cubes else _SCENE_CENTRE[3 * k:3 * k + 3]
                          for k, c in enumerate(SCENE_COLORS)] + [np.asarray(world.scene.bin.center)])
    return ((raw - _SCENE_CENTRE) / _SCENE_SCALE).astype(np.float32)


class _Recorder:
    """A lock-step controller that keeps what it saw and what it commanded, and where things were."""

    def __init__(self, controller: Any, renderers: dict[str, Any], image_stride: int) -> None:
        self.controller, self.renderers, self.image_stride = controller, renderers, image_stride
        self.states: list[np.ndarray] = []
        self.actions: list[np.ndarray] = []
        self.scene: list[np.ndarray] = []
        self.images: dict[str, list[np.ndarray]] = {}

    def reset(self, task: Any, seed: int) -> None:
        self.states, self.actions, self.scene, self.images = [], [], [], {}
        self.controller.reset(task, seed)

    def act(self, observation: Any) -> np.ndarray:
        action = np.asarray(self.controller.act(observation), dtype=np.float64)
        self.scene.append(scene_vector(self.controller.sim.world))
        self.states.append(observation.joints.astype(np.float32))
        self.actions.append(action.astype(np.float32))
        if (len(self.states) - 1) % self.image_stride == 0:
            for name, renderer in self.renderers.items():
                image = renderer.render(self.controller.sim.world)
                self.images.setdefault(name, []).append(np.ascontiguousarray(image.transpose(2, 0, 1)))
        return action


def record_demos(plan: Sequence[tuple[str, int]], cameras: dict[str, tuple[int, int]],
                 max_episode_s: float = 20.0, image_stride: int = 1,
                 on_demo: Callable[[int, int], None] = lambda done, total: None) -> list[Demo]:
    """The scripted operator performing each (task, seed) of `plan` in lock-step, until success or the limit
    (a recorded episode runs on for its full length; the ticks after success teach little). Cameras are
    rendered only on the ticks whose images are kept (the operator does not look). `on_demo(done, total)`
    follows progress."""
    from zk0.agent.lockstep import run_episode
    from zk0.hw.config import SafetySettings
    from zk0.hw.safety import SafetyEnvelope, envelope_spec
    from zk0.hw.sim.lockstep import LockstepSim, OperatorController, follower_limits
    from zk0.hw.sim.tasks import get_task

    spec = envelope_spec(follower_limits(), SafetySettings(), FPS, ROBOT)
    if image_stride < 1:
        raise ValueError(f"image_stride must be at least 1, not {image_stride}")
    from zk0.hw.sim.render import CameraRenderer

    sim = LockstepSim({}, FPS, ROBOT)
    renderers = {name: CameraRenderer(name, width, height) for name, (width, height) in cameras.items()}
    recorder = _Recorder(OperatorController(sim), renderers, image_stride)
    demos = []
    for task, seed in plan:
        outcome = run_episode(sim, recorder, SafetyEnvelope(spec), task, seed, int(round(max_episode_s * FPS)))
        demos.append(Demo(get_task(task).instruction, seed, np.stack(recorder.states), np.stack(recorder.actions),
                          {name: np.stack(frames) for name, frames in recorder.images.items()}, outcome.success,
                          np.stack(recorder.scene), image_stride))
        on_demo(len(demos), len(plan))
    return demos


class DemoData:
    """Demonstrations served as the batches zk0.learn.data.EpisodeData serves (same keys, chunking, padding)."""

    def __init__(self, demos: Sequence[Demo], chunk_size: int):
        self.demos = [d for d in demos if d.success]  # recorded datasets keep failures too; a base need not
        if not self.demos:
            raise ValueError("no successful demonstrations")
        self.chunk_size = chunk_size

    def frame_index(self) -> list[tuple[int, int]]:
        """(demo, tick) of every sample: the ticks with an image."""
        return [(k, i) for k, demo in enumerate(self.demos) for i in range(0, len(demo.state), demo.image_stride)]

    def batch(self, samples: Sequence[tuple[int, int]]) -> dict[str, Any]:
        import torch

        offsets = np.arange(self.chunk_size)
        rows = []
        for k, i in samples:
            demo = self.demos[k]
            idx = i + offsets
            rows.append((demo, i, np.minimum(idx, len(demo.state) - 1), idx >= len(demo.state)))
        batch: dict[str, Any] = {
            STATE: torch.from_numpy(np.stack([d.state[i] for d, i, _, _ in rows])),
            ACTION: torch.from_numpy(np.stack([d.action[chunk] for d, _, chunk, _ in rows])),
            "action_is_pad": torch.from_numpy(np.stack([pad for *_, pad in rows])),
            "task": [d.task for d, *_ in rows],
        }
        for camera in self.demos[0].images:
            frames = np.stack([d.images[camera][i // d.image_stride] for d, i, _, _ in rows])
            batch[IMAGE_PREFIX + camera] = torch.from_numpy(frames).float().div_(255.0)
        return batch

    def scene_targets(self, samples: Sequence[tuple[int, int]]) -> Any:
        """(B, SCENE_DIMS) tensor: the scene vector of each sample's tick."""
        import torch

        return torch.from_numpy(np.stack([self.demos[k].scene[i] for k, i in samples]))


def demo_meta(demos: Sequence[Demo], cameras: dict[str, tuple[int, int]]) -> tuple[SimpleNamespace, Any]:
    """(dataset metadata a policy is built from, zk0 sufficient statistics) of these demonstrations."""
    from zk0.hw.sim.calibration import MOTOR_NAMES
    from zk0.learn.stats import to_lerobot_stats
    from zk0.learn.sufficient_stats import from_arrays

    names = [f"{name}.pos" for name in MOTOR_NAMES]
    features: dict[str, Any] = {key: {"dtype": "float32", "shape": (len(names),), "names": names}
                                for key in (STATE, ACTION)}
    for camera, (width, height) in cameras.items():
        features[IMAGE_PREFIX + camera] = {"dtype": "video", "shape": (height, width, 3),
                                           "names": ["height", "width", "channels"]}
    stats = from_arrays({STATE: np.concatenate([d.state for d in demos]),
                         ACTION: np.concatenate([d.action for d in demos])})
    return SimpleNamespace(features=features, stats=to_lerobot_stats(stats)), stats
