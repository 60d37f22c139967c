"""Stage one of a sim base: the vision tower learns where things are, on scenes rendered fresh for every batch.

smolvla_base's vision tower was pretrained on far more images than any robot dataset holds; a tower that learns
only from a base's few hundred demonstrations can memorise their placements. Here the tower and connector train
alone, before the policy (`SimBaseRecipe.vision_steps`), which then trains with the tower frozen: every
batch is a new set of scenes (a random task's placement from seeds `VISION_SEED_BASE` + i, disjoint from
recording, validation, the discrimination bench and the base's demonstrations; the arm at a joint state drawn
from the demonstrations), seen by the base's cameras, and a linear probe over every camera's image tokens
regresses where the cubes and the bin are (`zk0.learn.sim_demos.scene_vector`). The probe is discarded.

Rendering is ~1.6 ms a scene for two 128x96 cameras, so data is unlimited and costs about as much as the step.
Measured (NOTES "Sim base", session 10): the tower localises a cube on unseen scenes to ~0.6 / 1.2 cm this way,
but the policy's success did not rise with it, so the preset leaves this stage off (`vision_steps=0`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from zk0.learn.sim_demos import IMAGE_PREFIX, SCENE_DIMS, STATE, scene_vector

VISION_SEED_BASE = 4_000_000  # the base's demonstrations use [3_000_000, 4_000_000)
VISION_SEED_SPAN = 1_000_000


class SceneRenderer:
    """Random scenes of the simulated tasks, as the given cameras see them, with their scene vectors."""

    def __init__(self, cameras: dict[str, tuple[int, int]], poses: np.ndarray, tasks: Sequence[str],
                 seed: int) -> None:
        from zk0.hw.sim.render import CameraRenderer
        from zk0.hw.sim.world import World

        if len(poses) == 0 or not tasks:
            raise ValueError("the vision stage needs arm poses and tasks to render scenes from")
        self.poses, self.tasks = np.asarray(poses, dtype=float), list(tasks)
        self.rng = np.random.default_rng(seed)
        self.world = World(self.tasks[0], VISION_SEED_BASE)
        self.renderers = {name: CameraRenderer(name, width, height) for name, (width, height) in cameras.items()}

    def batch(self, size: int) -> tuple[dict[str, Any], Any]:
        """(policy batch with the cameras' images and a zero state, (size, SCENE_DIMS) targets) of new scenes."""
        import torch

        images: dict[str, list[np.ndarray]] = {name: [] for name in self.renderers}
        targets = []
        for _ in range(size):
            task = self.tasks[self.rng.integers(len(self.tasks))]
            self.world.reset(task, VISION_SEED_BASE + int(self.rng.integers(VISION_SEED_SPAN)))
            self.world.place_arm(self.poses[self.rng.integers(len(self.poses))])
            for name, renderer in self.renderers.items():
                images[name].append(renderer.render(self.world).transpose(2, 0, 1))
            targets.append(scene_vector(self.world))
        batch: dict[str, Any] = {IMAGE_PREFIX + name: torch.from_numpy(np.stack(frames)).float().div_(255.0)
                                 for name, frames in images.items()}
        batch[STATE] = torch.zeros(size, self.poses.shape[1])
        return batch, torch.from_numpy(np.stack(targets))


def pretrain_vision(policy: Any, scenes: SceneRenderer, steps: int, batch_size: int, lr: float,
                    progress: Callable[[], bool]) -> list[float]:
    """Probe losses per step of training the policy's vision tower and connector on `scenes` (in place).

    AdamW with a one-cycle LR (5 % warm-up to `lr`, cosine down); `progress()` returning True stops early.
    """
    if steps <= 0:
        return []
    import torch
    import torch.nn.functional as F

    model = policy.model.vlm_with_expert
    vlm = model.get_vlm_model()
    trained = list(vlm.vision_model.parameters()) + list(vlm.connector.parameters())
    for parameter in trained:
        parameter.requires_grad_(True)

    def tokens(batch: dict[str, Any]) -> Any:
        images, _ = policy.prepare_images(batch)
        return torch.cat([model.embed_image(image).flatten(1) for image in images], 1)

    with torch.no_grad():
        width = tokens(scenes.batch(1)[0]).shape[1]
    probe = torch.nn.Linear(width, SCENE_DIMS)
    optimizer = torch.optim.AdamW(trained + list(probe.parameters()), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.05)
    vlm.vision_model.train()
    losses = []
    for _ in range(steps):
        if progress():
            break
        batch, target = scenes.batch(batch_size)
        loss = F.mse_loss(probe(tokens(batch)), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    return losses
