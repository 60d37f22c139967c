"""The agent control API over real ZeroMQ sockets, its socket's access rule (the agent's group only) against
clients running as other users, and `zk0ctl` driving a real `zk0 record` session (which refuses training leases
while it records)."""

from __future__ import annotations

import errno
import grp
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import zmq

from zk0.agent import lease
from zk0.agent.control import SOCKET_GROUP, ControlServer, Request, parse_request, request, share_with_group
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


def test_a_reply_value_json_cannot_encode_is_sent_as_text(tmp_path: Path) -> None:
    """A handler's value outside JSON (a Path) is sent as text: the serving thread must not die on it, or every
    later request would go unanswered."""
    address = f"ipc://{tmp_path}/control.sock"
    server = ControlServer(address, COMMANDS, lambda req: {"where": tmp_path / req.command})
    try:
        assert request(address, "status") == {"ok": True, "where": str(tmp_path / "status")}
        assert request(address, "save") == {"ok": True, "where": str(tmp_path / "save")}
        assert server.alive  # what the agent's watchdog pings depend on
    finally:
        server.close()
    assert not server.alive


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


AS_OTHER_USERS = pytest.mark.skipif(os.geteuid() != 0, reason="acting as other users needs root")
NOBODY = 65534  # uid and gid of the clients: no file of the test belongs to them


def as_nobody(groups: list[int], action: Callable[[], int]) -> int:
    """The exit status of `action()` run as user and group nobody with supplementary `groups` only: a forked child,
    not a new interpreter (this one may live where nobody may not read, as pyenv's under /root)."""
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            os.setgroups(groups)
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            code = action()
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def connect_errno(path: Path) -> int:
    """0 when this process may connect to the unix socket at `path`, else the errno the kernel refused it with."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError as error:
            return error.errno
    return 0


def answers_status(address: str, timeout_s: float) -> int:
    """0 when `status` gets an ok reply at `address`, 1 when nothing answers (what zk0ctl exits with), else 2."""
    try:
        return 0 if request(address, "status", timeout_s)["ok"] else 2
    except TimeoutError:
        return 1


def socket_group() -> grp.struct_group:
    """The agent's socket group (zk0) where it exists, else a system group standing in for it (not nobody's)."""
    groups = [g for g in grp.getgrall() if g.gr_gid not in (0, NOBODY)]
    return next((g for g in groups if g.gr_name == SOCKET_GROUP), groups[0])


@AS_OTHER_USERS
def test_the_control_socket_answers_its_group_and_no_other_user() -> None:
    group = socket_group()
    # under /tmp itself, passable by anyone (tmp_path's parents are root's alone): the socket's mode is the gate
    runtime = Path(tempfile.mkdtemp(prefix="zk0-run-", dir="/tmp"))
    runtime.chmod(0o711)
    seen: list[str] = []
    path, address = runtime / "agent.sock", f"ipc://{runtime}/agent.sock"
    server = ControlServer(address, COMMANDS, lambda req: seen.append(req.command) or {"state": "idle"})
    try:
        share_with_group(path, 0o660, group.gr_name)  # what the agent does to its sockets once they are bound
        info = os.stat(path)
        assert stat.S_IMODE(info.st_mode) == 0o660 and info.st_gid == group.gr_gid
        assert as_nobody([], lambda: connect_errno(path)) == errno.EACCES  # the kernel refuses the connection
        assert as_nobody([], lambda: answers_status(address, 1.0)) == 1
        assert seen == []  # nothing reached the server
        assert as_nobody([group.gr_gid], lambda: answers_status(address, 10.0)) == 0
        assert seen == ["status"]
    finally:
        server.close()
        shutil.rmtree(runtime)


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
