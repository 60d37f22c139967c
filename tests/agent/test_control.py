"""The agent control API over real ZeroMQ sockets, and `zk0ctl` driving a real `zk0 record` session (which
refuses training leases while it records)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from zk0.agent import lease
from zk0.agent.control import ControlServer, Request, parse_request, request
from zk0.agent.ctl import main as zk0ctl
from zk0.agent.dataset_commit import read_commit

COMMANDS = ("status", "save", "stop")


def _speed(args: dict) -> int:
    """A command argument check: returns what the handler gets, raises ValueError naming the fault."""
    if set(args) != {"rpm"} or not isinstance(args["rpm"], int):
        raise ValueError('spin: needs an integer "rpm"')
    return args["rpm"]


@pytest.mark.parametrize(("raw", "error"), [
    (b"\xff\xfe", "not JSON"),
    (b"[1, 2]", 'string "command"'),
    (b'{"command": 3}', 'string "command"'),
    (b'{"command": "reboot"}', "unknown command 'reboot' (known: save, spin, status, stop)"),
    (b'{"command": "spin", "args": [1]}', 'spin: "args" must be an object'),
    (b'{"command": "spin", "args": {"rpm": "fast"}}', 'spin: needs an integer "rpm"'),
    (b'{"command": "spin"}', 'spin: needs an integer "rpm"'),
    (b'{"command": "status", "args": {"verbose": true}}', "status: takes no arguments (got verbose)"),
])
def test_malformed_requests_are_refused_with_a_reason(raw: bytes, error: str) -> None:
    with pytest.raises(ValueError, match=error.replace("(", r"\(").replace(")", r"\)")):
        parse_request(raw, {**dict.fromkeys(COMMANDS), "spin": _speed})


def test_requests_carry_checked_arguments() -> None:
    commands = {**dict.fromkeys(COMMANDS), "spin": _speed}
    assert parse_request(b'{"command": "spin", "args": {"rpm": 300}}', commands) == Request("spin", 300)
    # a request without "args" (every client before arguments existed) and one with empty args are the same
    assert parse_request(b'{"command": "status"}', COMMANDS) == Request("status", {})
    assert parse_request(b'{"command": "status", "args": {}}', COMMANDS) == Request("status", {})


def test_server_answers_commands_errors_and_handler_failures(tmp_path: Path) -> None:
    seen: list[str] = []

    def handler(req: Request) -> dict:
        if req.command == "stop":
            raise RuntimeError("disk on fire")
        seen.append(req.command)
        return {"state": "idle"}

    address = f"ipc://{tmp_path}/control.sock"
    server = ControlServer(address, COMMANDS, handler)
    try:
        assert request(address, "status") == {"ok": True, "state": "idle"}
        assert request(address, "reboot") == {"ok": False, "error": "unknown command 'reboot' (known: save, status, stop)"}
        assert request(address, "stop") == {"ok": False, "error": "internal error: disk on fire"}
        # a raw client sending garbage gets an error and the server keeps serving
        context = zmq.Context()
        raw = context.socket(zmq.REQ)
        raw.connect(address)
        raw.send(b"not json")
        assert json.loads(raw.recv())["ok"] is False
        raw.close()
        context.term()
        assert request(address, "save")["ok"] is True
        # malformed arguments are answered with an error and never reach the handler
        assert request(address, "save", args={"now": True}) == {"ok": False, "error": "save: takes no arguments (got now)"}
        assert seen == ["status", "save"]
    finally:
        server.close()


def test_server_passes_checked_arguments_to_the_handler(tmp_path: Path) -> None:
    seen: list[Request] = []

    def handler(req: Request) -> dict:
        seen.append(req)
        return {"spinning": req.args}

    address = f"ipc://{tmp_path}/control.sock"
    server = ControlServer(address, {"status": None, "spin": _speed}, handler)
    try:
        assert request(address, "spin", args={"rpm": 300}) == {"ok": True, "spinning": 300}
        assert request(address, "spin", args={"rpm": 1.5}) == {"ok": False, "error": 'spin: needs an integer "rpm"'}
        assert seen == [Request("spin", 300)]
    finally:
        server.close()


def test_zk0ctl_says_when_no_agent_answers(tmp_path: Path, capsys) -> None:
    assert zk0ctl(["status", "--address", f"ipc://{tmp_path}/nobody.sock", "--timeout", "0.2"]) == 1
    assert "no zk0 agent answering at ipc://" in capsys.readouterr().err


def test_zk0ctl_status_and_stop_a_recording_session(sim_arms_config: Path, capsys) -> None:
    address = f"ipc://{sim_arms_config.parent}/agent.sock"
    recorder = subprocess.Popen(
        [sys.executable, "-m", "zk0.cli", "record", "--config", str(sim_arms_config), "--dataset", "ctl",
         "--task", "pick the red cube", "--episodes", "5", "--episode-time-s", "60", "--no-progress",
         "--control", address],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        deadline = time.monotonic() + 90
        status: dict = {}
        while time.monotonic() < deadline and status.get("frames", 0) < 10:
            assert recorder.poll() is None, recorder.communicate()[1][-2000:]
            capsys.readouterr()
            if zk0ctl(["status", "--json", "--address", address, "--timeout", "0.5"]) == 0:
                status = json.loads(capsys.readouterr().out)
            time.sleep(0.5)
        assert status["state"] == "recording" and status["dataset"] == "ctl" and status["episode"] == 0
        assert status["task"] == "pick the red cube" and status["committed_episodes"] == 0
        # a federation node asking to train is refused, with the reason, and the recording goes on
        refusal = lease.acquire(address, holder="test node")
        assert refusal == lease.LeaseRefusal("recording in progress")
        renewal = request(address, lease.RENEW, args={"lease_id": "granted-earlier", "ttl_s": 30})
        assert renewal == {"ok": True, "granted": False, "reason": "recording in progress"}
        assert zk0ctl(["stop", "--address", address]) == 0
        assert json.loads(capsys.readouterr().out)["accepted"] == "stop"
        _, stderr = recorder.communicate(timeout=60)
        assert recorder.returncode == 0, stderr[-2000:]
    finally:
        if recorder.poll() is None:
            recorder.kill()
    # "stop" saves the episode in progress and ends the session long before its 60 s
    assert len(read_commit(sim_arms_config.parent / "datasets" / "ctl").episodes) == 1
