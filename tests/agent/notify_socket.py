"""A stand-in for systemd's notification socket: what a Type=notify service under test tells its supervisor.

Usage (a daemon started as a subprocess):

    from tests.agent.notify_socket import NotifyListener, notify_socket  # noqa: F401 (the fixture)

    def test_ready(notify_socket: NotifyListener):
        proc = subprocess.Popen([...], env=notify_socket.environ(watchdog_s=2.0))
        notify_socket.wait_for("READY", pid=proc.pid, timeout_s=60)
        pings = notify_socket.times("WATCHDOG", pid=proc.pid)   # monotonic receive times
        states = notify_socket.values("STATUS")                 # in arrival order

`environ(watchdog_s=...)` sets WATCHDOG_USEC as systemd's WatchdogSec= would, without WATCHDOG_PID (the child's
pid is unknown before it starts; sd_watchdog_enabled treats a missing WATCHDOG_PID as "this process").
Each message records the sender's pid from SCM_CREDENTIALS, as systemd does to enforce NotifyAccess=main.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_MAX_DATAGRAM = 65536


@dataclass(frozen=True)
class Notification:
    time_s: float  # time.monotonic() when received
    pid: int  # the sending process (kernel-verified)
    fields: dict[str, str]


def parse(datagram: bytes) -> dict[str, str]:
    """`KEY=value` lines as systemd reads them (the last of repeated keys wins; lines without '=' ignored)."""
    lines = datagram.decode("utf-8", errors="replace").split("\n")
    return dict(line.split("=", 1) for line in lines if "=" in line)


class NotifyListener:
    """An AF_UNIX datagram socket collecting sd_notify messages on a background thread.

    `address` is the NOTIFY_SOCKET value: "@name" for the abstract namespace (no path length limit to hit
    in deep temporary directories, nothing to clean up), or a filesystem path."""

    def __init__(self, address: str | None = None) -> None:
        self.address = address or f"@zk0-notify-test-{uuid.uuid4().hex}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.bind("\0" + self.address[1:] if self.address.startswith("@") else self.address)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._sock.settimeout(0.05)  # how often the reader checks for close()
        self._messages: list[Notification] = []
        self._arrived = threading.Condition()
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read, name="notify-listener", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                data, ancillary, _, _ = self._sock.recvmsg(_MAX_DATAGRAM, socket.CMSG_SPACE(_UCRED.size))
            except TimeoutError:
                continue
            received = time.monotonic()
            pid = next((_UCRED.unpack(cmsg_data[:_UCRED.size])[0] for level, kind, cmsg_data in ancillary
                        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS), 0)
            with self._arrived:
                self._messages.append(Notification(received, pid, parse(data)))
                self._arrived.notify_all()

    def environ(self, watchdog_s: float | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """An environment for a child process (`base` defaults to os.environ) notifying this listener."""
        env = {k: v for k, v in (os.environ if base is None else base).items()
               if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        env["NOTIFY_SOCKET"] = self.address
        if watchdog_s is not None:
            env["WATCHDOG_USEC"] = str(round(watchdog_s * 1e6))
        return env

    @property
    def messages(self) -> list[Notification]:
        with self._arrived:
            return list(self._messages)

    def _matching(self, key: str, value: str | None, pid: int | None) -> list[Notification]:
        return [m for m in self.messages if key in m.fields and (value is None or m.fields[key] == value)
                and (pid is None or m.pid == pid)]

    def times(self, key: str, value: str | None = "1", pid: int | None = None) -> list[float]:
        """Receive times of messages setting `key` (to `value`; None: any value), oldest first."""
        return [m.time_s for m in self._matching(key, value, pid)]

    def values(self, key: str, pid: int | None = None) -> list[str]:
        """Every value sent for `key`, in arrival order (e.g. the STATUS lines)."""
        return [m.fields[key] for m in self._matching(key, None, pid)]

    def wait_for(self, key: str, value: str | None = "1", pid: int | None = None, timeout_s: float = 10.0,
                 after_s: float = 0.0) -> Notification:
        """The first message received at or after monotonic time `after_s` that sets `key` (to `value`),
        waiting up to `timeout_s`; AssertionError listing what did arrive otherwise."""
        deadline = time.monotonic() + timeout_s
        with self._arrived:
            while True:
                found = [m for m in self._matching(key, value, pid) if m.time_s >= after_s]
                if found:
                    return found[0]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no {key}={value if value is not None else '*'} within {timeout_s} s; "
                                         f"received: {[(m.pid, m.fields) for m in self._messages]}")
                self._arrived.wait(remaining)

    def close(self) -> None:
        self._closed.set()
        self._reader.join()
        self._sock.close()
        if not self.address.startswith("@"):
            Path(self.address).unlink(missing_ok=True)

    def __enter__(self) -> NotifyListener:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@pytest.fixture
def notify_socket() -> Iterator[NotifyListener]:
    """A NotifyListener on an abstract socket, closed after the test."""
    with NotifyListener() as listener:
        yield listener
