"""`zk0 record`: tele-operated episodes into a local LeRobot dataset (real arms, or the simulated rig with --sim).

Operator controls while recording: type a line on stdin (`s` or Enter: save the episode now, `d`: discard it,
`r`: re-record it, `q`: save and stop), run `zk0ctl save|discard|rerecord|stop|status`, or send signals
(SIGUSR1: save now, SIGUSR2: re-record, SIGINT/SIGTERM: save and stop).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from contextlib import ExitStack
from pathlib import Path

from zk0.agent import lease
from zk0.agent.control import Request

DEFAULT_CONFIG = Path("configs/agent.yaml")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="agent config (default %(default)s)")
    parser.add_argument("--dataset", required=True, help="dataset name under the datasets root")
    parser.add_argument("--task", required=True, help="task instruction stored with every frame")
    parser.add_argument("--episodes", type=int, required=True, help="episodes to save in this session")
    parser.add_argument("--episode-time-s", type=float, help="episode length (default from config)")
    parser.add_argument("--reset-time-s", type=float, help="time between episodes (default from config)")
    parser.add_argument("--root", type=Path, help="datasets root (overrides the config's datasets_root)")
    parser.add_argument("--sim", action="store_true", help="record on the simulated rig with the scripted operator")
    parser.add_argument("--seed", type=int, default=0, help="with --sim: seed of the first episode's scene")
    add_sim_rig_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--control", metavar="ADDRESS", help="control API address for zk0ctl (default from config)")
    parser.add_argument("--write-calibration", action="store_true",
                        help="write the calibration files into the motors when they disagree (default: refuse to start)")


def run(args: argparse.Namespace) -> int:
    from zk0.agent.config import ConfigError, load_config
    from zk0.agent.dataset_commit import DatasetError
    from zk0.agent.ownership import RobotOwned, refuse_if_agent_owns_robot
    from zk0.agent.writer_process import WriterDied
    from zk0.hw.robots import CalibrationError

    if args.episodes <= 0:
        print("zk0 record: --episodes must be positive", file=sys.stderr)
        return 2
    try:
        if not args.sim:
            refuse_if_agent_owns_robot("record")
        config = load_config(args.config, check_devices=not args.sim)
        settings = dataclasses.replace(
            config.record,
            **({"episode_time_s": args.episode_time_s} if args.episode_time_s is not None else {}),
            **({"reset_time_s": args.reset_time_s} if args.reset_time_s is not None else {}),
        )
        if settings.episode_time_s <= 0 or settings.reset_time_s < 0:
            raise ConfigError("--episode-time-s must be positive and --reset-time-s not negative")
        config = dataclasses.replace(config, record=settings, datasets_root=args.root or config.datasets_root)
        return _record(config, args)
    except WriterDied as exc:
        print(f"zk0 record: {exc}", file=sys.stderr)
        return 1
    except (ConfigError, DatasetError, CalibrationError, RobotOwned) as exc:
        print(f"zk0 record: {exc}", file=sys.stderr)
        return 2
    except (ConnectionError, TimeoutError) as exc:
        # The episode in progress is dropped; committed episodes are safe on disk.
        print(f"zk0 record: hardware error, stopped: {exc}", file=sys.stderr)
        return 1


def _record(config, args: argparse.Namespace) -> int:
    from zk0.agent.dataset_commit import DatasetIdentity
    from zk0.agent.dataset_store import EncodingSettings
    from zk0.agent.writer_process import WriterProcess
    from zk0.agent.control import start_control_server
    from zk0.agent.record import OperatorEvents, Recorder, RecordPlan, dataset_features
    from zk0.hw.robots import (
        calibration_hash,
        connect_without_prompt,
        disconnect_quietly,
        arm_limits,
        make_follower,
        make_leader,
    )
    from zk0.hw.safety import SafetyEnvelope, envelope_spec

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    root = config.datasets_root
    require_free_disk(root, config.record.min_free_disk_mb)
    with ExitStack() as stack:
        environment = None
        if args.sim:
            config, environment = _start_sim(config, args, stack)
        robot = make_follower(config.follower, config.cameras, config.record.read_retries)
        leader = make_leader(config.leader, config.record.read_retries)
        # Opened before any thread starts: the writer is a forked child process (see zk0.agent.writer_process).
        store, repair = WriterProcess.open(
            root, args.dataset, dataset_features(robot), config.record.fps,
            DatasetIdentity(config.host_id, config.robot_type, calibration_hash((config.follower, config.leader))),
            EncodingSettings(config.record.video_codec, config.record.encoder_threads,
                             queue_frames=int(config.record.encoder_buffer_s * config.record.fps)),
        )
        stack.callback(store.close)
        if args.sim:
            check_recording_seeds(args.seed, store.num_episodes, args.episodes)
        if repair and repair.removed:
            print(f"zk0 record: repaired {root / args.dataset}: removed {len(repair.removed)} leftovers of an interrupted session", file=sys.stderr)
        connect_without_prompt(leader, write_calibration=args.write_calibration)
        stack.callback(disconnect_quietly, leader)
        connect_without_prompt(robot, write_calibration=args.write_calibration)
        stack.callback(disconnect_quietly, robot)
        events = OperatorEvents()
        events.install_signal_handlers()
        events.watch_stream(sys.stdin)
        plan = RecordPlan(
            task=args.task, episodes=args.episodes, fps=config.record.fps,
            episode_time_s=config.record.episode_time_s, reset_time_s=config.record.reset_time_s,
            min_rate_fraction=config.record.min_rate_fraction, min_free_disk_mb=config.record.min_free_disk_mb,
            calibration_hash=calibration_hash((config.follower, config.leader)),
            max_failed_ticks_in_row=config.record.max_failed_ticks_in_row,
            realtime_priority=config.record.realtime_priority,
        )
        bars = None if args.no_progress else _ProgressBars(plan)
        stack.callback(lambda: bars and bars.close())
        status = SessionStatus(args.dataset, plan, store, bars)
        control = start_control_server(args.control or config.control_address, CONTROL_COMMANDS,
                                       status.control_handler(events))
        if control is not None:
            stack.callback(control.close)
        envelope = SafetyEnvelope(envelope_spec(arm_limits(robot), config.safety, config.record.fps, config.robot_type))
        recorder = Recorder(robot, leader, store, envelope, plan, events, environment, status)
        summary = recorder.record()
        if bars:
            bars.close()
        _print_summary(summary, store, plan)
        if summary.stopped_early:
            print(f"zk0 record: session ended early: {summary.stopped_early}; "
                  f"{store.num_episodes} committed episodes are intact", file=sys.stderr)
            return 1
        return 3 if summary.stopped_for_disk else 0


def require_free_disk(root: Path, min_free_disk_mb: float) -> None:
    """Create the datasets root; DatasetError when it has less than `min_free_disk_mb` free."""
    from zk0.agent.dataset_commit import DatasetError
    from zk0.agent.dataset_store import free_disk_mb

    root.mkdir(parents=True, exist_ok=True)
    if free_disk_mb(root) < min_free_disk_mb:
        raise DatasetError(f"{root}: less than {min_free_disk_mb} MB free; free some space first")


def check_recording_seeds(first_seed: int, recorded: int, episodes: int) -> None:
    """ConfigError unless the scene seeds of the episodes to record (`first_seed` + episode index, after `recorded`
    episodes) stay in [0, VALIDATION_SEED_BASE): validation must only ever see scenes no policy trained on."""
    from zk0.agent.config import ConfigError
    from zk0.agent.validate import VALIDATION_SEED_BASE

    last = first_seed + recorded + episodes - 1
    if first_seed < 0 or last >= VALIDATION_SEED_BASE:
        raise ConfigError(f"--seed {first_seed}: these episodes would use scene seeds up to {last}; recording seeds "
                          f"must stay in [0, {VALIDATION_SEED_BASE}), validation uses the seeds from there")


def add_sim_rig_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sim-rig", type=Path, metavar="FILE",
                        help="with --sim: use the running rig this file describes (the agent's) when it serves this "
                             "config, instead of starting one")


def sim_rig_options(config) -> dict:
    """The `RigHandle.start` arguments (robot, cameras, rate, image size) that simulate `config`'s hardware."""
    width, height = (config.cameras[0].width, config.cameras[0].height) if config.cameras else (640, 480)
    return {"robot": config.robot_type, "cameras": tuple(c.name for c in config.cameras) or ("front", "wrist"),
            "fps": config.record.fps, "width": width, "height": height}


def _start_sim(config, args, stack: ExitStack, bus_trace: Path | None = None):
    """Attach to the running rig `--sim-rig` names, else start one; point the config at its ports, cameras and
    calibration files. `bus_trace`: where the rig logs the servo writes it receives (zk0.hw.sim.bus_trace); only a
    rig started here has one."""
    import tempfile

    from zk0.agent.config import ConfigError
    from zk0.hw.config import ArmConfig, CameraConfig
    from zk0.hw.sim.rig_handle import RigHandle

    task_name = sim_task_name(args.task)
    if task_name is None:
        raise ConfigError(f"--task {args.task!r} matches no simulated task ({', '.join(_sim_instructions())})")
    options = sim_rig_options(config)
    rig = None if args.sim_rig is None or bus_trace is not None else RigHandle.attach(args.sim_rig, **options)
    if rig is None:
        calibration_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="zk0-sim-calibration-")))
        rig = RigHandle.start(**options, calibration_dir=calibration_dir, seed=args.seed, bus_trace=bus_trace)
    stack.callback(rig.close)
    cameras = [
        CameraConfig(name=name, type="zmq", width=cam.width, height=cam.height, fps=cam.fps,
                     host=cam.server_address, port=cam.port)
        for name, cam in rig.camera_configs().items()
    ]
    config = dataclasses.replace(
        config,
        follower=ArmConfig(rig.follower_port, rig.info["follower_id"], rig.calibration_dir),
        leader=ArmConfig(rig.leader_port, rig.info["leader_id"], rig.calibration_dir),
        cameras=cameras,
    )
    return config, SimEnvironment(rig, task_name, args.seed)


def _sim_instructions() -> dict[str, str]:
    from zk0.hw.sim.tasks import TASKS

    return {task.instruction: name for name, task in TASKS.items()}


def sim_task_name(task: str) -> str | None:
    """The simulated task whose instruction shares the most words with the free-text `task`.

    None when fewer than three quarters of the task's words appear in any instruction, or when two
    instructions tie (say "push the red cube": left or right?).
    """
    instructions = _sim_instructions()
    if task in instructions.values():
        return task
    words = set(task.lower().split())
    if not words:
        return None
    scores = sorted(((len(words & set(i.lower().split())) / len(words), name) for i, name in instructions.items()), reverse=True)
    best, runner_up = scores[0], scores[1] if len(scores) > 1 else (0.0, "")
    return best[1] if best[0] >= 0.75 and best[0] > runner_up[0] else None


class SimEnvironment:
    """Per episode: reset the simulated world with seed `first_seed + episode`, let the scripted operator
    perform the task on the leader, and ask the world for its success verdict at the end."""

    def __init__(self, rig, task_name: str, first_seed: int) -> None:
        self.rig = rig
        self._task = task_name
        self._first_seed = first_seed

    def begin_episode(self, episode_index: int) -> int:
        seed = self._first_seed + episode_index
        self.rig.reset(self._task, seed)
        self.rig.start_operator()
        return seed

    def end_episode(self) -> bool:
        success = self.rig.success()
        self.rig.stop_operator()
        return success


# Argument-free session commands, plus the lease commands: a node asking to train is refused while this records.
CONTROL_COMMANDS = {**dict.fromkeys(("status", "save", "discard", "rerecord", "stop")), **lease.COMMANDS}


class SessionStatus:
    """What `zk0ctl status` reports about this recording session; fed by the record loop's progress calls."""

    def __init__(self, dataset: str, plan, store, bars=None) -> None:
        self._dataset, self._plan, self._store, self._bars = dataset, plan, store, bars
        self.episode: int | None = None
        self.frames = 0

    def __call__(self, episode_index: int, frames: int) -> None:
        self.episode, self.frames = episode_index, frames
        if self._bars is not None:
            self._bars(episode_index, frames)

    def snapshot(self) -> dict:
        return {"state": "recording", "dataset": self._dataset, "task": self._plan.task,
                "episode": self.episode, "frames": self.frames,
                "committed_episodes": self._store.num_episodes, "episodes_this_session": self._plan.episodes}

    def control_handler(self, events):
        def handle(request: Request) -> dict:
            if request.command in lease.COMMANDS:
                # The machine is busy recording: no training now, and a lease granted before is void.
                return lease.busy_reply(request, "recording in progress")
            if request.command != "status":
                events.request(request.command)
            return {"accepted": request.command, **self.snapshot()}

        return handle


class _ProgressBars:
    """One tqdm bar per episode, updated about once a second by the record loop."""

    def __init__(self, plan) -> None:
        self._plan = plan
        self._bar = None
        self._episode = None

    def __call__(self, episode_index: int, frames: int) -> None:
        from tqdm import tqdm

        if episode_index != self._episode:
            self.close()
            total = int(round(self._plan.episode_time_s * self._plan.fps))
            self._bar = tqdm(total=total, desc=f"episode {episode_index}", unit="frame", leave=True)
            self._episode = episode_index
        self._bar.update(frames - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            self._episode = None


def _print_summary(summary, store, plan) -> None:
    print(f"dataset {store.root}: {store.num_episodes} episodes in total")
    for meta, interventions in zip(summary.saved, summary.interventions, strict=True):
        verdict = "" if meta.success is None else f" success={meta.success}"
        seed = "" if meta.seed is None else f" seed={meta.seed}"
        flag = " SLOW" if meta.slow else ""
        failed = f", {meta.failed_ticks} failed ticks" if meta.failed_ticks else ""
        clipped = ", ".join(f"{name} {count}" for name, count in interventions.items() if count)
        safety = f", safety interventions: {clipped}" if clipped else ""
        print(f"  episode {meta.episode_index}: {meta.length} frames at {meta.achieved_fps:.2f} fps, "
              f"{meta.overruns} overruns{failed}, jitter p99 {meta.jitter_p99_ms:.2f} ms{seed}{verdict}{flag}{safety}")
    ticks = sum(t.ticks for t in summary.timings)
    overruns = sum(t.overruns for t in summary.timings)
    failed = sum(t.failed for t in summary.timings)
    print(f"session: saved {len(summary.saved)}/{plan.episodes}, discarded {summary.discarded}, "
          f"re-recorded {summary.rerecorded}, {overruns} overruns and {failed} failed ticks in {ticks} recorded ticks"
          + (", stopped: disk almost full" if summary.stopped_for_disk else ""))
