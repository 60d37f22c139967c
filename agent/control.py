"""The agent's control API: JSON requests over a ZeroMQ REP socket, answered from a background thread.

A request is `{"command": NAME}` or `{"command": NAME, "args": {...}}`; the reply is `{"ok": true, ...}` or
`{"ok": false, "error": "..."}`. A server declares its commands with, for each, the function that checks its
arguments (none: the command takes no arguments). Malformed requests, unknown commands and malformed
arguments get an error reply and never reach the handler, so a stray client cannot disturb a recording.
`zk0ctl` is the command-line client; `request()` is the one function every client goes through.
"""

from __future__ import annotations

import grp
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

DEFAULT_CONTROL_ADDRESS = "ipc:///run/zk0/agent.sock"
MAX_REQUEST_BYTES = 64 * 1024  # far above any real request; larger ones get an error reply
MAX_MESSAGE_BYTES = 16 * 2**20  # ZeroMQ drops a peer sending more, before it is buffered
log = logging.getLogger("zk0.agent.control")

# Checks a command's "args" object and returns what the handler gets; raises ValueError naming the fault.
ArgsCheck = Callable[[Mapping[str, Any]], Any]
# Command names (none takes arguments), or each name with its argument check (None: takes no arguments).
Commands = Iterable[str] | Mapping[str, ArgsCheck | None]


@dataclass(frozen=True)
class Request:
    """A well-formed request: the command and what its argument check returned ({} for a command without)."""

    command: str
    args: Any = field(default_factory=dict)


Handler = Callable[[Request], dict[str, Any]]


def refuse_unknown_arguments(args: Mapping[str, Any], command: str, known: Iterable[str]) -> None:
    """For an argument check: ValueError naming the first argument of `args` that `command` does not know."""
    known = sorted(known)
    extra = sorted(set(args) - set(known))
    if extra:
        raise ValueError(f"{command}: unknown argument {extra[0]!r} (known: {', '.join(known)})")


def command_table(commands: Commands) -> dict[str, ArgsCheck | None]:
    return dict(commands) if isinstance(commands, Mapping) else dict.fromkeys(commands)


def parse_request(raw: bytes, commands: Commands) -> Request:
    """The request in `raw` with its arguments checked, or ValueError saying what is wrong with it."""
    try:
        request = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("request is not JSON") from None
    if not isinstance(request, dict) or not isinstance(request.get("command"), str):
        raise ValueError('request must be an object with a string "command"')
    table = command_table(commands)
    command = request["command"]
    if command not in table:
        raise ValueError(f"unknown command {command!r} (known: {', '.join(sorted(table))})")
    args = request.get("args", {})
    if not isinstance(args, dict):
        raise ValueError(f'{command}: "args" must be an object')
    check = table[command]
    if check is None:
        if args:
            raise ValueError(f"{command}: takes no arguments (got {', '.join(sorted(args))})")
        return Request(command)
    return Request(command, check(args))


class ControlServer:
    """Serves `handler` for `commands` at `address` until closed. Binding failures are reported, not fatal:
    the agent's own work goes on without remote control."""

    def __init__(self, address: str, commands: Commands, handler: Handler) -> None:
        self.address = address
        self._commands = command_table(commands)
        self._handler = handler
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.REP)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        self._socket.bind(address)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="zk0-control", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        while not self._stop.is_set():
            if poller.poll(100):
                reply = self._answer(*self._receive())
                # default=str: a handler's odd value must not end this thread (REP would never answer again)
                self._socket.send_string(json.dumps(reply, default=str))

    def _receive(self) -> tuple[bytes, int]:
        """The request's bytes (up to the limit) and its whole size. REP must read every frame of a multipart
        request before it may reply; frames past the limit are read and dropped, never joined."""
        raw, size, more = b"", 0, True
        while more:
            frame = self._socket.recv()
            size += len(frame)
            if size <= MAX_REQUEST_BYTES:
                raw += frame
            more = bool(self._socket.getsockopt(zmq.RCVMORE))
        return raw, size

    def _answer(self, raw: bytes, size: int) -> dict[str, Any]:
        try:
            if size > MAX_REQUEST_BYTES:
                raise ValueError(f"request of {size} bytes is over the {MAX_REQUEST_BYTES} byte limit")
            return {"ok": True, **self._handler(parse_request(raw, self._commands))}
        except ValueError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # a failing handler must still answer, or the REP socket wedges
            log.exception("control command failed")
            return {"ok": False, "error": f"internal error: {exc}"}

    @property
    def alive(self) -> bool:
        """Whether requests are still answered (the serving thread runs): the daemon's watchdog pings depend on it,
        so systemd restarts an agent that can no longer hear `zk0ctl estop`."""
        return self._thread.is_alive()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)
        self._socket.close()
        self._context.term()


SOCKET_GROUP = "zk0"  # members reach the agent's sockets (systemd/zk0-agent.service, `make install-units`)


def share_with_group(path: Path | str, mode: int, group: str = SOCKET_GROUP) -> None:
    """`path` gets `mode` and, when `group` exists, that group: a socket (0660) or the folder holding it (0750)
    is then reachable by the agent's user and the group's members only."""
    try:
        os.chown(path, -1, grp.getgrnam(group).gr_gid)
    except (KeyError, PermissionError):
        pass  # no such group (a developer machine): the owner-only part of the mode still applies
    os.chmod(path, mode)


def start_control_server(address: str, commands: Commands, handler: Handler) -> ControlServer | None:
    """A ControlServer, or None with a logged warning when the address cannot be bound."""
    try:
        return ControlServer(address, commands, handler)
    except zmq.ZMQError as exc:
        log.warning("control API unavailable at %s: %s (zk0ctl cannot reach this process)", address, exc)
        return None


def request(address: str, command: str, timeout_s: float = 2.0, args: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Send one command (with `args`, if any) and return the reply; TimeoutError when nothing answers at `address`."""
    context = zmq.Context()
    socket = context.socket(zmq.REQ)
    socket.setsockopt(zmq.LINGER, 0)
    try:
        socket.connect(address)
        # Argument-free commands go out exactly as before, so agents predating "args" still understand them.
        socket.send_string(json.dumps({"command": command, **({"args": dict(args)} if args else {})}))
        if not socket.poll(int(timeout_s * 1000)):
            raise TimeoutError(f"no zk0 agent answering at {address}")
        return json.loads(socket.recv())
    finally:
        socket.close()
        context.term()
