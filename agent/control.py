"""The agent's control API: JSON requests over a ZeroMQ REP socket, answered from a background thread.

A request is `{"command": NAME}`; the reply is `{"ok": true, ...}` or `{"ok": false, "error": "..."}`.
Malformed requests get an error reply and never reach the handler, so a stray client cannot disturb a
recording. `zk0ctl` is the client.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

import zmq

DEFAULT_CONTROL_ADDRESS = "ipc:///run/zk0/agent.sock"
log = logging.getLogger("zk0.agent.control")

Handler = Callable[[str], dict[str, Any]]


def parse_request(raw: bytes, commands: Iterable[str]) -> str:
    """The command named by a raw request, or ValueError saying what is wrong with it."""
    try:
        request = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("request is not JSON") from None
    if not isinstance(request, dict) or not isinstance(request.get("command"), str):
        raise ValueError('request must be an object with a string "command"')
    known = sorted(commands)
    if request["command"] not in known:
        raise ValueError(f"unknown command {request['command']!r} (known: {', '.join(known)})")
    return request["command"]


class ControlServer:
    """Serves `handler` for `commands` at `address` until closed. Binding failures are reported, not fatal:
    the agent's own work goes on without remote control."""

    def __init__(self, address: str, commands: Iterable[str], handler: Handler) -> None:
        self.address = address
        self._commands = frozenset(commands)
        self._handler = handler
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.REP)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(address)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="zk0-control", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(100):
                continue
            raw = self._socket.recv()
            try:
                reply = {"ok": True, **self._handler(parse_request(raw, self._commands))}
            except ValueError as exc:
                reply = {"ok": False, "error": str(exc)}
            except Exception as exc:  # a failing handler must still answer, or the REP socket wedges
                log.exception("control command failed")
                reply = {"ok": False, "error": f"internal error: {exc}"}
            self._socket.send_string(json.dumps(reply))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)
        self._socket.close()
        self._context.term()


def start_control_server(address: str, commands: Iterable[str], handler: Handler) -> ControlServer | None:
    """A ControlServer, or None with a logged warning when the address cannot be bound."""
    try:
        return ControlServer(address, commands, handler)
    except zmq.ZMQError as exc:
        log.warning("control API unavailable at %s: %s (zk0ctl cannot reach this process)", address, exc)
        return None


def request(address: str, command: str, timeout_s: float = 2.0) -> dict[str, Any]:
    """Send one command and return the reply; TimeoutError when nothing answers at `address`."""
    context = zmq.Context()
    socket = context.socket(zmq.REQ)
    socket.setsockopt(zmq.LINGER, 0)
    try:
        socket.connect(address)
        socket.send_string(json.dumps({"command": command}))
        if not socket.poll(int(timeout_s * 1000)):
            raise TimeoutError(f"no zk0 agent answering at {address}")
        return json.loads(socket.recv())
    finally:
        socket.close()
        context.term()
