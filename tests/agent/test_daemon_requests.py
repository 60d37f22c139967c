"""The agent's pure parts besides the state table: request checks, job command lines, how a job's exit status
ends it, the restart backoff, and the effective config a job reads (it must parse back to the same config)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from zk0.agent.daemon import rig_needs_start, sim_defaults
from zk0.common.typed_yaml import to_plain
from zk0.agent.daemon_core import job_end
from zk0.agent.daemon_requests import (
    JobPaths, PolicyAction, RecordStart, RolloutStart, ValidateStart, record_action, record_argv, rollout_argv,
    validate_argv,
)
from zk0.agent.daemon_state import Event
from zk0.agent.supernode import next_backoff

PATHS = JobPaths(config=Path("/run/zk0/agent.yaml"), datasets_root=Path("/var/lib/zk0/datasets"),
                 policy_store=Path("/var/lib/zk0/policies"), control="ipc:///run/zk0/job.sock", sim=False)


@pytest.mark.parametrize(("args", "error"), [
    ({"action": "start", "task": "t"}, '"dataset" must be a dataset name'),
    ({"action": "start", "dataset": "../etc", "task": "t"}, '"dataset" must be a dataset name'),
    ({"action": "start", "dataset": "..", "task": "t"}, '"dataset" must be a dataset name'),
    ({"action": "start", "dataset": "d", "task": ""}, '"task" must be a non-empty string'),
    ({"action": "start", "dataset": "d", "task": "t", "episodes": 0}, '"episodes" must be a whole number'),
    ({"action": "start", "dataset": "d", "task": "t", "episodes": True}, '"episodes" must be a whole number'),
    ({"action": "start", "dataset": "d", "task": "t", "seed": 1_000_000}, '"seed" must be a whole number'),
    ({"action": "start", "dataset": "d", "task": "t", "episode_time_s": -1}, '"episode_time_s" must be a number'),
    ({"action": "start", "dataset": "d", "task": "t", "rm": "-rf"}, "unknown argument 'rm'"),
    ({"action": "save", "dataset": "d"}, "unknown argument 'dataset'"),
    ({"action": "explode"}, '"action" must be one of'),
])
def test_bad_record_requests_are_refused_naming_the_fault(args, error) -> None:
    with pytest.raises(ValueError, match=error):
        record_action(args)


def test_job_command_lines_are_the_standalone_commands() -> None:
    record = record_action({"action": "start", "dataset": "kitchen", "task": "pick it", "episodes": 3, "seed": 7})
    assert record == RecordStart("kitchen", "pick it", 3, None, 7)
    assert record_argv(record, PATHS) == [
        "record", "--config", "/run/zk0/agent.yaml", "--root", "/var/lib/zk0/datasets", "--dataset", "kitchen",
        "--task", "pick it", "--episodes", "3", "--control", "ipc:///run/zk0/job.sock", "--no-progress", "--seed", "7"]
    rollout = RolloutStart.from_args({"task": "pick it", "dagger": True, "record": "corrections"})
    assert rollout_argv(rollout, PATHS)[-5:] == ["--dagger", "--record", "corrections", "--root", "/var/lib/zk0/datasets"]
    validate = ValidateStart.from_args({"policy": "run1-round3", "tasks": ["a", "b"], "promote": True})
    argv = validate_argv(validate, PATHS, Path("/var/lib/zk0/reports/x"))
    assert argv[:2] == ["validate", "--config"] and argv[-5:] == ["--task", "a", "--task", "b", "--promote"]
    assert "--sim" not in argv and "--sim" in validate_argv(validate, PATHS.__class__(**{**PATHS.__dict__, "sim": True}),
                                                             Path("r"))
    on_sim = JobPaths(**{**PATHS.__dict__, "sim": True, "sim_rig": Path("/run/zk0/sim-rig.json")})
    assert record_argv(record, on_sim)[-3:] == rollout_argv(rollout, on_sim)[-3:] == [
        "--sim", "--sim-rig", "/run/zk0/sim-rig.json"]  # the agent's running rig
    assert "--sim-rig" not in validate_argv(validate, on_sim, Path("r"))  # validation runs in the lock-step sim
    with pytest.raises(ValueError, match='"policy" must be a store version'):
        ValidateStart.from_args({"policy": "/etc/passwd"})
    assert PolicyAction.from_args({"action": "promote", "version": "run1-round3"}).version == "run1-round3"
    with pytest.raises(ValueError, match='"version"'):
        PolicyAction.from_args({"action": "promote"})


@pytest.mark.parametrize(("kind", "code", "event"), [
    ("record", 0, Event.JOB_DONE), ("record", 3, Event.JOB_DONE), ("record", 2, Event.JOB_DONE),
    ("record", 1, Event.JOB_FAILED), ("record", -9, Event.JOB_FAILED),
    ("rollout", 0, Event.JOB_DONE), ("rollout", 1, Event.JOB_FAILED), ("rollout", 3, Event.ESTOP),
    ("validate", 0, Event.JOB_DONE), ("validate", 1, Event.JOB_DONE), ("validate", 3, Event.JOB_FAILED),
])
def test_how_a_job_exit_status_moves_the_agent(kind, code, event) -> None:
    assert job_end(kind, code)[0] is event


@pytest.mark.parametrize(("previous", "ran", "expected"), [
    (0.0, 0.5, 1.0), (1.0, 0.5, 2.0), (32.0, 10.0, 60.0), (60.0, 10.0, 60.0), (60.0, 300.0, 1.0),
])
def test_restart_backoff(previous, ran, expected) -> None:
    assert next_backoff(previous, ran) == expected


def test_the_effective_config_a_job_reads_parses_back_to_the_same_config(tmp_path: Path) -> None:
    from zk0.agent.config import load_config, parse_config

    repo = Path(__file__).resolve().parents[2]
    for config in (parse_config(sim_defaults(tmp_path)), load_config(repo / "configs" / "agent.so101.example.yaml",
                                                                      check_devices=False)):
        path = tmp_path / "effective.yaml"
        path.write_text(yaml.safe_dump(to_plain(config)))
        assert load_config(path, check_devices=False) == config


def test_an_unwritable_directory_is_one_clear_line(tmp_path: Path) -> None:
    from zk0.agent.daemon import prepare_dir

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError, match=r"^state dir .*file/zk0 is not writable by this user .*; pass --state-dir"):
        prepare_dir(blocker / "zk0", "state dir", 0o750)
    assert prepare_dir(tmp_path / "new" / "zk0", "state dir", 0o750).is_dir()


def test_check_config_prints_the_effective_config_or_the_error(tmp_path: Path, capsys) -> None:
    from zk0.agent.daemon import main

    assert main(["--sim", "--check-config", "--state-dir", str(tmp_path)]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["datasets_root"] == str(tmp_path / "datasets")
    bad = tmp_path / "agent.yaml"
    bad.write_text("host_id: h\nrobot_type: so102\n")
    assert main(["--config", str(bad), "--check-config"]) == 2
    assert "robot_type" in capsys.readouterr().err


def test_zk0ctl_events_follows_the_stream_the_agent_names(tmp_path: Path, capsys) -> None:
    import threading
    import time

    from tests.agent.test_lease import Agent
    from zk0.agent.control import ControlServer
    from zk0.agent.ctl import main as zk0ctl

    address = f"ipc://{tmp_path}/agent.sock"
    agent = Agent(address)
    try:
        threading.Thread(target=zk0ctl, args=(["events", "--address", address],), daemon=True).start()
        deadline = time.monotonic() + 10
        while '"type": "training"' not in (seen := capsys.readouterr().out):
            assert time.monotonic() < deadline, seen
            agent.operator("train", "pause")  # published while the follower subscribes: repeat until one arrives
            time.sleep(0.2)
        assert json_line(seen, "training")["mode"] == "paused"
    finally:
        agent.close()
    recorder = ControlServer(f"ipc://{tmp_path}/record.sock", ["status"], lambda request: {"state": "recording"})
    try:  # a standalone command's control API has no event stream
        assert zk0ctl(["events", "--address", f"ipc://{tmp_path}/record.sock"]) == 2
        assert "has no event stream" in capsys.readouterr().err
    finally:
        recorder.close()


def json_line(output: str, kind: str) -> dict:
    import json

    return next(event for event in map(json.loads, output.splitlines()) if event["type"] == kind)


RIG = {"robot": "so101", "cameras": ("front", "wrist"), "fps": 30, "width": 640, "height": 480}


@pytest.mark.parametrize(("serving", "wanted", "job_running", "retry_at", "start"), [
    (None, RIG, False, 0.0, True),  # none yet, or it died
    (RIG, RIG, False, 0.0, False),  # the running rig simulates the config
    (RIG, {**RIG, "fps": 15}, False, 0.0, True),  # a reloaded config wants other hardware
    (None, RIG, True, 0.0, False),  # never under a job (it drives the rig, or its own)
    (None, RIG, False, 20.0, False),  # a failed start is retried later
])
def test_the_agent_restarts_its_sim_rig_only_when_it_must(serving, wanted, job_running, retry_at, start) -> None:
    assert rig_needs_start(serving, wanted, job_running, retry_at, now=10.0) is start


def test_zk0ctl_sends_zero_values_and_leaves_out_unset_flags() -> None:
    from zk0.agent.ctl import _parser, request_of

    args = _parser().parse_args(["record", "start", "--dataset", "demo", "--task", "t", "--seed", "0"])
    command, fields = request_of(args)
    assert command == "record" and fields["seed"] == 0 and fields["action"] == "start"
    assert "episodes" not in fields  # not given: the agent's config decides
