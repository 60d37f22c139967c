"""zk0.agent.lockstep: episodes driven in lock-step inside the safety envelope succeed, and replay exactly."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from zk0.hw.sim.lockstep import OperatorController as ScriptedController
from zk0.agent.lockstep import policy_in_sim, run_episode
from zk0.agent.validate import episode_plan
from zk0.hw.config import SafetySettings
from zk0.hw.safety import SafetyEnvelope, envelope_spec
from zk0.hw.sim.lockstep import LockstepSim, Observation, follower_limits
from zk0.hw.sim.tasks import TASKS

FPS = 30


@pytest.fixture(scope="module")
def spec():
    return envelope_spec(follower_limits(), SafetySettings(), FPS)


def test_the_loop_can_succeed_scripted_operator_over_validation_seeds(spec):
    """The scripted operator (reading the world, so not a gate) as the controller: if it could not finish
    the tasks through envelope, servo model and lock-step world, no policy could."""
    sim = LockstepSim({}, FPS)
    plan = episode_plan(list(TASKS), 10)  # every task at least once
    outcomes = [run_episode(sim, ScriptedController(sim), SafetyEnvelope(spec), t, s, 20 * FPS) for t, s in plan]
    successes = sum(o.success for o in outcomes)
    assert successes >= 0.9 * len(plan), [(o.task, o.seed, o.success) for o in outcomes]
    assert all(2.0 < o.time_to_success_s < 15.0 for o in outcomes if o.success)
    assert all(o.ticks == round(o.time_to_success_s * FPS) for o in outcomes if o.success)


def test_same_seed_same_trajectory_and_verdict(spec):
    sim = LockstepSim({}, FPS)
    first = run_episode(sim, ScriptedController(sim), SafetyEnvelope(spec), "push_green_right", 1_000_003, 20 * FPS)
    run_episode(sim, ScriptedController(sim), SafetyEnvelope(spec), "pick_place_red", 5, 40)
    again = run_episode(sim, ScriptedController(sim), SafetyEnvelope(spec), "push_green_right", 1_000_003, 20 * FPS)
    assert first == again and first.success
    other = run_episode(sim, ScriptedController(sim), SafetyEnvelope(spec), "push_green_right", 1_000_004, 20 * FPS)
    assert other.trajectory_sha256 != first.trajectory_sha256


class _Lunge:
    """Asks for a pan of 90 degrees at once, then a non-finite target: the envelope must step in."""

    def reset(self, task, seed) -> None:
        self.calls = 0

    def act(self, observation: Observation) -> np.ndarray:
        self.calls += 1
        return np.array([np.nan if self.calls == 5 else 90.0, 0, 0, 0, 0, 0])


def test_targets_pass_the_envelope_and_its_interventions_are_counted(spec):
    sim = LockstepSim({}, FPS)
    outcome = run_episode(sim, _Lunge(), SafetyEnvelope(spec), "pick_place_red", 0, 10)
    assert not outcome.success and outcome.ticks == 10 and outcome.time_to_success_s is None
    # every tick clamped: a step bound first, then the velocity bound (from the last safe target on), and
    # the non-finite target held
    assert outcome.intervened_ticks == 10
    assert outcome.interventions["non-finite"] == 1 and outcome.interventions["velocity"] == 8
    assert sim.present()[0] <= 10 * spec.max_velocity[0] / FPS + 1e-6


class _Press:
    """Drives the gripper 7 cm into the table and holds it there."""

    def reset(self, task, seed) -> None:
        pass

    def act(self, observation: Observation) -> np.ndarray:
        return np.array([0.0, 40.0, 30.0, 20.0, 0.0, 0.0])


def test_ticks_pressing_into_the_table_are_counted(spec):
    sim = LockstepSim({}, FPS)
    outcome = run_episode(sim, _Press(), SafetyEnvelope(spec), "push_red_left", 0, 60)
    assert 30 < outcome.table_contacts < 60  # every tick from the first touch on
    assert sim.world.pose.tip[2] == pytest.approx(0.0, abs=1e-4)
    assert run_episode(sim, ScriptedController(sim), SafetyEnvelope(spec), "push_red_left", 0, 20).table_contacts == 0


def _bundle(**features) -> SimpleNamespace:
    inputs = {key: SimpleNamespace(shape=shape) for key, shape in features.items()}
    return SimpleNamespace(policy=SimpleNamespace(config=SimpleNamespace(input_features=inputs)))


@pytest.mark.parametrize(("features", "message"), [
    ({"observation.images.laptop": (3, 48, 64), "observation.state": (6,)}, r"cameras \['laptop'\] have no simulated"),
    ({"observation.images.front": (3, 48, 64), "observation.state": (14,)}, r"is \(14,\), not the 6 joints"),
    ({"observation.images.front": (3, 48, 64)}, "is None"),
])
def test_a_policy_that_does_not_fit_the_simulated_arm_is_refused(features, message):
    with pytest.raises(ValueError, match=message):
        policy_in_sim(_bundle(**features), FPS, "so101")
