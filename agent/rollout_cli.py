"""`zk0 rollout`: run a policy from the store on the follower (or the simulated rig with --sim), every target
through the safety envelope, with the watchdog and estop of zk0.agent.rollout_guard.

Stop it with `zk0ctl estop`, SIGINT (Ctrl-C) or SIGTERM: the arm holds its present position at once and goes
limp `rollout.estop_hold_s` later. Take over DAgger-style with `zk0ctl pause`, `correct` (the leader arm drives
the follower; needs --dagger), `release` and `resume` (zk0.agent.dagger). Exit status: 0 all episodes ran, 1 the watchdog cut torque or the hardware
stopped answering, 2 the command could not start (config, policy, calibration), 3 stopped by an estop.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
from contextlib import ExitStack
from pathlib import Path

from zk0.agent import lease
from zk0.agent.control import Request
from zk0.agent.dagger import VERBS
from zk0.agent.record_cli import (
    DEFAULT_CONFIG, SimEnvironment, add_sim_rig_argument, require_free_disk, sim_task_name,
)

CONTROL_COMMANDS = {**dict.fromkeys(("status", "estop", *VERBS)), **lease.COMMANDS}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", required=True, metavar="REF",
                        help="a store version, 'active', 'previous', or a lerobot checkpoint directory")
    parser.add_argument("--task", required=True, help="the task instruction given to the policy")
    parser.add_argument("--episodes", type=int, default=1, help="episodes to run (default %(default)s)")
    parser.add_argument("--episode-time-s", type=float, help="episode length (default: the config's record.episode_time_s)")
    parser.add_argument("--sim", action="store_true", help="run on the simulated rig; its task verdict judges each episode")
    parser.add_argument("--seed", type=int, default=0, help="with --sim: seed of the first episode's scene")
    add_sim_rig_argument(parser)
    parser.add_argument("--record", metavar="DATASET", help="also record the episodes into this dataset (under the datasets root)")
    parser.add_argument("--root", type=Path, help="datasets root (overrides the config's datasets_root)")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="agent config (default %(default)s)")
    parser.add_argument("--store", type=Path, metavar="DIR", help="policy store (default: the config's federation.policy_store)")
    parser.add_argument("--inference", choices=("sync", "rtc"), help="lerobot inference engine (default: the config's rollout.inference)")
    parser.add_argument("--device", default="cpu", help="torch device the policy runs on (default %(default)s)")
    parser.add_argument("--bus-trace", type=Path, metavar="FILE",
                        help="with --sim: the rig writes every Goal_Position / Torque_Enable write it receives here (JSON lines)")
    parser.add_argument("--report", type=Path, metavar="FILE", help="write the per-episode report here as JSON")
    parser.add_argument("--control", metavar="ADDRESS", help="control API address for zk0ctl (default from config)")
    parser.add_argument("--dagger", action="store_true",
                        help="connect the leader arm so the operator can take over (zk0ctl pause, correct, release, resume); "
                             "with --sim the scripted operator corrects")
    parser.add_argument("--write-calibration", action="store_true",
                        help="write the calibration file into the motors when they disagree (default: refuse to start)")


def run(args: argparse.Namespace) -> int:
    from zk0.agent.config import ConfigError, load_config
    from zk0.agent.dataset_commit import DatasetError
    from zk0.agent.ownership import RobotOwned, refuse_if_agent_owns_robot
    from zk0.agent.policy_store import PolicyStoreError
    from zk0.hw.robots import CalibrationError
    from zk0.learn.checkpoint import CheckpointInvalid

    if args.episodes <= 0 or (args.episode_time_s is not None and args.episode_time_s <= 0):
        print("zk0 rollout: --episodes and --episode-time-s must be positive", file=sys.stderr)
        return 2
    if args.bus_trace and not args.sim:
        print("zk0 rollout: --bus-trace needs --sim (it is the simulated servos' log)", file=sys.stderr)
        return 2
    try:
        if not args.sim:
            refuse_if_agent_owns_robot("rollout")
        config = load_config(args.config, check_devices=not args.sim)
        config = dataclasses.replace(
            config, datasets_root=args.root or config.datasets_root,
            record=dataclasses.replace(config.record, episode_time_s=args.episode_time_s or config.record.episode_time_s),
            rollout=dataclasses.replace(config.rollout, inference=args.inference or config.rollout.inference),
        )
        return _rollout(config, args)
    except (ConfigError, DatasetError, CalibrationError, PolicyStoreError, FileNotFoundError, CheckpointInvalid,
            RobotOwned) as exc:
        print(f"zk0 rollout: {exc}", file=sys.stderr)
        return 2
    except (ConnectionError, TimeoutError) as exc:
        print(f"zk0 rollout: hardware error, stopped: {exc}", file=sys.stderr)
        return 1


class RolloutSimEnvironment(SimEnvironment):
    """`zk0 record --sim`'s environment where the policy, not the leader, moves the arm; the scripted operator
    moves the leader only while the operator corrects (DAgger), and continues its plan at each correction."""

    def begin_episode(self, episode_index: int) -> int:
        seed = self._first_seed + episode_index
        self.rig.reset(self._task, seed)
        return seed

    def operator_hands(self, old, new) -> None:
        """Takeover phase hook: the scripted operator's hand is on the leader exactly while correcting."""
        from lerobot.rollout.strategies.dagger import DAggerPhase

        if new is DAggerPhase.CORRECTING:
            self.rig.start_operator()
        elif old is DAggerPhase.CORRECTING:
            self.rig.stop_operator()


def _rollout(config, args: argparse.Namespace) -> int:
    from zk0.agent.control import start_control_server
    from zk0.agent.dagger import Takeover
    from zk0.agent.dataset_commit import DatasetIdentity
    from zk0.agent.dataset_store import EncodingSettings
    from zk0.agent.policy_store import resolve_policy
    from zk0.agent.record_cli import _start_sim
    from zk0.agent.rollout import Rollout, rollout_features
    from zk0.agent.rollout_engines import load_policy, make_source, warm_up
    from zk0.agent.writer_process import WriterProcess
    from zk0.hw.realtime import polling
    from zk0.hw.robots import calibration_hash, connect_without_prompt, disconnect_quietly, make_follower, make_leader

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    fps = config.record.fps
    with ExitStack() as stack:
        environment = None
        if args.sim:
            config, recording_env = _start_sim(config, args, stack, bus_trace=args.bus_trace)
            environment = RolloutSimEnvironment(recording_env.rig, sim_task_name(args.task), args.seed)
        robot = make_follower(config.follower, config.cameras, config.record.read_retries)
        features = rollout_features(robot)
        cal_hash = calibration_hash((config.follower,))
        store = None
        if args.record:
            require_free_disk(config.datasets_root, config.record.min_free_disk_mb)
            # Forked before torch or any thread starts (see zk0.agent.writer_process).
            store, _ = WriterProcess.open(
                config.datasets_root, args.record, features, fps, DatasetIdentity(config.host_id, config.robot_type, cal_hash),
                EncodingSettings(config.record.video_codec, config.record.encoder_threads,
                                 queue_frames=int(config.record.encoder_buffer_s * fps)),
            )
            stack.callback(store.close)
        store_root = args.store or (config.federation.policy_store if config.federation else None)
        path = Path(resolve_policy(args.policy, store_root))  # a store version's checkpoint is named after it
        bundle, meta = load_policy(path, args.device, config.rollout)
        version = f"{path.name}@{meta.sha256[:12]}"
        estop = estop_on_signals()
        plan = rollout_plan(config, args.task, args.episodes, config.record.episode_time_s, version, cal_hash,
                            reset_time_s=0.0 if args.sim else config.record.reset_time_s)
        enveloped = connect_enveloped(robot, config, stack, args.write_calibration)
        leader = leader_envelope = None
        if args.dagger:
            leader = make_leader(config.leader, config.record.read_retries)
            connect_without_prompt(leader, write_calibration=args.write_calibration)
            stack.callback(disconnect_quietly, leader)
            leader_envelope = envelope_for(leader, config)
        takeover = Takeover(leader, leader_envelope, enveloped.keys,
                            environment.operator_hands if environment is not None else None)
        status = RolloutStatus(version, plan, takeover)
        # Started well before the loop goes real-time: libzmq aborts (thread.cpp:315, EINVAL) when its I/O threads
        # were made SCHED_FIFO|SCHED_RESET_ON_FORK before they applied their own scheduling at startup.
        control = start_control_server(args.control or config.control_address, CONTROL_COMMANDS, status.control_handler(estop))
        if control is not None:
            stack.callback(control.close)
        with polling():
            observation = enveloped.get_observation()
        warm_s = warm_up(bundle, observation, features, args.task, robot.robot_type, args.device)
        source = make_source(config.rollout.inference, bundle, enveloped, features, args.task, fps, args.device)
        print(f"zk0 rollout: policy {version} ({config.rollout.inference} inference on {config.rollout.backend}, "
              f"warm-up {warm_s:.2f} s), "
              f"{args.episodes} episode(s) of {plan.episode_time_s:g} s at {fps} fps", flush=True)
        summary = Rollout(enveloped, source, plan, estop, environment, store, status, takeover).run()
        print_summary(summary)
        if args.report:
            args.report.write_text(json.dumps({"policy": version, "inference": config.rollout.inference,
                                               "backend": config.rollout.backend, "fps": fps,
                                               "stopped": summary.stopped, "estop": estop.source, "warm_up_s": warm_s,
                                               "episodes": [dataclasses.asdict(e) for e in summary.episodes]}, indent=1))
        if summary.stopped is None:
            return 0
        by = f" (from {estop.source})" if estop.source else ""
        print(f"zk0 rollout: stopped: {summary.stopped}{by}", file=sys.stderr)
        return 3 if estop.requested_at is not None else 1


def estop_on_signals():
    """An Estop that SIGINT and SIGTERM request from now on."""
    from zk0.agent.rollout_guard import Estop

    estop = Estop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda num, _: estop.request(signal.Signals(num).name))
    return estop


def envelope_for(arm, config):
    """The config's safety envelope on a connected arm's calibrated limits."""
    from zk0.hw.robots import arm_limits
    from zk0.hw.safety import SafetyEnvelope, envelope_spec

    return SafetyEnvelope(envelope_spec(arm_limits(arm), config.safety, config.record.fps, config.robot_type))


def connect_enveloped(robot, config, stack: ExitStack, write_calibration: bool):
    """Connect the follower (refusing a calibration the motors disagree with, unless `write_calibration`), disconnect
    it when `stack` closes, and wrap it so every target passes the envelope."""
    from zk0.agent.rollout import EnvelopedRobot
    from zk0.hw.robots import connect_without_prompt, disconnect_quietly

    connect_without_prompt(robot, write_calibration=write_calibration)
    stack.callback(disconnect_quietly, robot)
    return EnvelopedRobot(robot, envelope_for(robot, config))


def rollout_plan(config, task: str, episodes: int, episode_time_s: float, policy: str, calibration_hash: str,
                 reset_time_s: float):
    """The rollout loop's plan from the agent config."""
    from zk0.agent.rollout import RolloutPlan

    return RolloutPlan(
        task=task, episodes=episodes, fps=config.record.fps, episode_time_s=episode_time_s, reset_time_s=reset_time_s,
        guard=config.rollout, policy=policy, calibration_hash=calibration_hash,
        min_rate_fraction=config.record.min_rate_fraction, max_failed_ticks_in_row=config.record.max_failed_ticks_in_row,
        realtime_priority=config.record.realtime_priority,
    )


class RolloutStatus:
    """What `zk0ctl status` reports; fed about once a second by the loop."""

    def __init__(self, policy: str, plan, takeover) -> None:
        self._policy, self._plan, self._takeover = policy, plan, takeover
        self.episode: int | None = None
        self.ticks = 0
        self.mode = "starting"

    def __call__(self, episode_index: int, ticks: int, mode) -> None:
        self.episode, self.ticks, self.mode = episode_index, ticks, mode.value

    def control_handler(self, estop):
        def handle(request: Request) -> dict:
            if request.command in lease.COMMANDS:
                return lease.busy_reply(request, "rollout in progress")
            if request.command == "estop":
                estop.request("zk0ctl")
            if request.command in VERBS:
                self._takeover.request(request.command)  # ValueError (the reply's error) when it does not apply now
            return {"accepted": request.command, "state": "rollout", "policy": self._policy, "task": self._plan.task,
                    "episode": self.episode, "ticks": self.ticks, "mode": self.mode,
                    "phase": self._takeover.phase.value, "leader": self._takeover.leader is not None}

        return handle


def print_summary(summary) -> None:
    for report in summary.episodes:
        timing = report.timing
        verdict = "" if report.success is None else f" success={report.success}"
        kinds = ", ".join(f"{name} {count}" for name, count in report.interventions.items()) or "none"
        print(f"  episode {report.index}: {timing.ticks} ticks, {timing.on_time_fraction:.2%} on time ({timing.skipped} slots skipped), jitter p50 {timing.jitter_p50_ms:.2f} / "
              f"p99 {timing.jitter_p99_ms:.2f} ms, inference p50 {report.inference_ms[0]:.1f} / p99 {report.inference_ms[1]:.1f} ms, "
              f"interventions {report.intervened_ticks} ticks ({kinds}), held {report.held_ticks} ticks, "
              f"corrected {report.corrected_ticks} ticks, "
              f"ended: {report.ended}{verdict}")
