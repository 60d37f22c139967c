"""`zk0 validate` on the robot: the same paired plan and report as in simulation, each verdict from the operator.

Each pair runs the candidate and the active policy on one task, in an order drawn from the pair's seed (so it is
reproducible, recorded in the report, and the operator watching cannot tell which policy runs: the console names
neither). Each episode: `record.reset_time_s` for the operator to set the scene, then the policy drives the arm
through the rollout loop (zk0.agent.rollout: envelope, watchdog, estop) for at most `validation.max_episode_s`.
`zk0ctl verdict success|fail` ends the episode at once; when the time runs out first, the arm holds its last goal
and the session waits for the verdict. Time to success is known only for a success declared during the episode.
`zk0ctl estop`, SIGINT or SIGTERM stop the session (hold, then torque off); the pairs done so far are reported,
with a verdict that refuses promotion.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from typing import Any

from zk0.agent import lease
from zk0.agent.control import Request
from zk0.agent.lockstep import EpisodeOutcome
from zk0.agent.validate import ROLES, episode_plan

VERDICTS = {"success": True, "fail": False}


def verdict_args(args: Mapping[str, Any]) -> bool:
    """The control API's check of `verdict`'s arguments, {"outcome": "success"|"fail"}: True for a success."""
    if set(args) != {"outcome"} or args["outcome"] not in VERDICTS:
        raise ValueError('verdict: args must be {"outcome": "success"} or {"outcome": "fail"}')
    return VERDICTS[args["outcome"]]


CONTROL_COMMANDS = {"status": None, "estop": None, "verdict": verdict_args, **lease.COMMANDS}


def pair_order(seed: int) -> tuple[str, str]:
    """The roles in the order they run in the pair with this seed (a fair coin seeded by it)."""
    return ROLES if random.Random(seed).random() < 0.5 else ROLES[::-1]


class OperatorVerdicts:
    """The verdict of the episode running now: `give` from the control thread, `episode_over` every tick,
    `wait` after the episode."""

    def __init__(self, estop: Any) -> None:
        self._estop = estop
        self._cond = threading.Condition()
        self._open = False  # an episode runs or waits for its verdict
        self._verdict: bool | None = None
        self._started = self._given_after = 0.0

    def begin(self) -> None:
        with self._cond:
            self._open, self._verdict, self._started = True, None, time.monotonic()

    def give(self, success: bool) -> None:
        with self._cond:
            if not self._open:
                raise ValueError("no validation episode is waiting for a verdict")
            if self._verdict is not None:
                raise ValueError("this episode has its verdict already")
            self._verdict, self._given_after = success, time.monotonic() - self._started
            self._cond.notify_all()

    def episode_over(self) -> bool:
        return self._verdict is not None

    def wait(self) -> tuple[bool, float] | None:
        """(success, seconds from the episode's start to the verdict), or None when an estop ends the wait."""
        with self._cond:
            while self._verdict is None:
                if self._estop.requested_at is not None:
                    return None
                self._cond.wait(0.1)
            self._open = False
            return self._verdict, self._given_after


class ValidationStatus:
    """What `zk0ctl status` reports, and the control handler: verdicts go to the episode that waits for one."""

    def __init__(self, pairs: int, verdicts: OperatorVerdicts) -> None:
        self.pairs, self.verdicts = pairs, verdicts
        self.pair: int | None = None
        self.episode_in_pair: int | None = None
        self.task: str | None = None
        self.ticks, self.mode = 0, "starting"
        self.step = "warm-up"  # then per episode: "reset" (scene), "episode" (the policy drives), "verdict" (waiting)

    def __call__(self, episode_index: int, ticks: int, mode: Any) -> None:
        self.ticks, self.mode = ticks, mode.value

    def control_handler(self, estop: Any) -> Callable[[Request], dict]:
        def handle(request: Request) -> dict:
            if request.command in lease.COMMANDS:
                return lease.busy_reply(request, "validation in progress")
            if request.command == "estop":
                estop.request("zk0ctl")
            if request.command == "verdict":
                self.verdicts.give(request.args)  # ValueError (the reply's error) when no episode waits for one
            return {"accepted": request.command, "state": "validating", "pair": self.pair, "pairs": self.pairs,
                    "episode_in_pair": self.episode_in_pair, "task": self.task, "step": self.step, "ticks": self.ticks,
                    "mode": self.mode}

        return handle


def robot_outcomes(config: Any, setup: Any, policies: Mapping[str, Any], control_address: str | None,
                   write_calibration: bool, device: str) -> tuple[dict[str, list[EpisodeOutcome]], str | None]:
    """Run the paired episodes on the config's follower; return each role's outcomes of the completed pairs and
    why the session stopped early (None when every pair ran)."""
    from zk0.agent.control import start_control_server
    from zk0.agent.rollout import ENDED_BY_OPERATOR, Rollout, finish_estop, rollout_features
    from zk0.agent.rollout_cli import connect_enveloped, estop_on_signals, rollout_plan
    from zk0.agent.rollout_engines import make_source, warm_up
    from zk0.hw.realtime import polling
    from zk0.hw.robots import calibration_hash, make_follower

    plan = episode_plan(setup.tasks, setup.episodes)
    outcomes: dict[str, list[EpisodeOutcome]] = {role: [] for role in ROLES}
    with ExitStack() as stack:
        robot = make_follower(config.follower, config.cameras, config.record.read_retries)
        features = rollout_features(robot)
        cal_hash = calibration_hash((config.follower,))
        estop = estop_on_signals()
        verdicts = OperatorVerdicts(estop)
        status = ValidationStatus(len(plan), verdicts)
        enveloped = connect_enveloped(robot, config, stack, write_calibration)
        control = start_control_server(control_address or config.control_address, CONTROL_COMMANDS,
                                       status.control_handler(estop))
        if control is not None:
            stack.callback(control.close)
        with polling():
            observation = enveloped.get_observation()
        for policy in policies.values():
            warm_up(policy.bundle, observation, features, setup.tasks[0], robot.robot_type, device)
        hold_s = config.rollout.estop_hold_s
        for index, (task, seed) in enumerate(plan):
            status.pair, status.task = index + 1, task
            results: dict[str, EpisodeOutcome] = {}
            for number, role in enumerate(pair_order(seed), start=1):
                status.episode_in_pair = number
                print(f"pair {index + 1}/{len(plan)}, episode {number}/2: {task!r}. Set the scene; the policy starts in "
                      f"{config.record.reset_time_s:g} s. End it with `zk0ctl verdict success|fail`.", flush=True)
                status.step = "reset"
                estop.sleep(config.record.reset_time_s)
                if estop.requested_at is not None:
                    return outcomes, finish_estop(enveloped, estop, hold_s)
                verdicts.begin()
                status.step, status.ticks = "episode", 0
                episode_plan_ = rollout_plan(config, task, 1, setup.max_episode_s, policies[role].label(), cal_hash,
                                             reset_time_s=0.0)
                source = make_source(config.rollout.inference, policies[role].bundle, enveloped, features, task,
                                     config.record.fps, device)
                summary = Rollout(enveloped, source, episode_plan_, estop, progress=status,
                                  episode_over=verdicts.episode_over).run()
                if summary.stopped is not None:  # estop (torque already off), watchdog, hardware
                    return outcomes, summary.stopped
                report = summary.episodes[0]
                status.step = "verdict"
                if report.ended != ENDED_BY_OPERATOR:
                    print("time is up; the arm holds. Verdict: `zk0ctl verdict success|fail`", flush=True)
                verdict = verdicts.wait()
                if verdict is None:
                    return outcomes, finish_estop(enveloped, estop, hold_s)
                success, after_s = verdict
                results[role] = EpisodeOutcome(
                    task=task, seed=seed, success=success, ticks=report.timing.ticks,
                    time_to_success_s=round(after_s, 3) if success and report.ended == ENDED_BY_OPERATOR else None,
                    intervened_ticks=report.intervened_ticks, interventions=dict(report.interventions),
                )
            for role in ROLES:
                outcomes[role].append(results[role])
            print(f"pair {index + 1}/{len(plan)} done: verdicts recorded", flush=True)
    return outcomes, None
