"""The agent's side of systemd supervision: the sd_notify protocol and logging to the journal.

`zk0-agent.service` is `Type=notify`: systemd passes the socket to notify in NOTIFY_SOCKET, considers the
service started when READY=1 arrives, shows STATUS= in `systemctl status`, and with `WatchdogSec=` kills and
restarts it when WATCHDOG=1 pings stop (the daemon pings from its control loop, so a hung loop stops them).
Messages go through libsystemd's sd_notify (systemd-python), which also handles abstract ('@') socket
addresses. Every call is a no-op returning False without NOTIFY_SOCKET, so the daemon runs unchanged from a
shell or a test.

Journal logging: `configure_logging` sends records to journald when stderr is connected to it, with
structured fields from `extra=`: `log.info("state %s", state, extra={"ZK0_STATE": state})` lets
`journalctl -u zk0-agent ZK0_STATE=recording` select them. Field names are upper case letters, digits and
'_' (journald drops others).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping

from systemd import daemon, journal

log = logging.getLogger(__name__)
# systemd reads notifications into a buffer of PIPE_BUF (4096) bytes and drops longer datagrams whole, which
# would lose the READY=1 sent along with a status; a status is a line for `systemctl status`, not a log.
STATUS_MAX_CHARS = 1000


def notify(*assignments: str) -> bool:
    """Send `KEY=value` assignments in one datagram; True if sent, False without NOTIFY_SOCKET or when the
    send fails (logged: a supervisor that cannot be told must not stop the robot's control loop)."""
    try:
        return daemon.notify("\n".join(assignments))
    except OSError as err:
        log.warning("sd_notify to %s failed: %s", os.environ.get("NOTIFY_SOCKET"), err)
        return False


def _status_line(text: str) -> str:
    # A newline would start another assignment (a status naming a bad config could otherwise say READY=1).
    return "STATUS=" + " ".join(text.splitlines())[:STATUS_MAX_CHARS]


def ready(status_text: str | None = None) -> bool:
    """The service is up (robot, cameras and IPC ready); systemd starts ordered units and `systemctl start`
    returns. Also after a reload, to end RELOADING=1."""
    return notify("READY=1", *([_status_line(status_text)] if status_text is not None else []))


def status(text: str) -> bool:
    """One line shown by `systemctl status zk0-agent` (e.g. the daemon's state)."""
    return notify(_status_line(text))


def watchdog() -> bool:
    """A watchdog ping: the control loop is healthy. Send at least twice per `watchdog_interval_s()`."""
    return notify("WATCHDOG=1")


def reloading() -> bool:
    """A configuration reload (SIGHUP) has begun; send `ready()` when it ends, whether or not the new
    configuration was accepted. MONOTONIC_USEC is what Type=notify-reload (systemd >= 253) requires."""
    return notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")


def stopping(status_text: str | None = None) -> bool:
    """Shutdown has begun (SIGTERM): systemd stops expecting watchdog pings and waits for the exit."""
    return notify("STOPPING=1", *([_status_line(status_text)] if status_text is not None else []))


def watchdog_interval_s(environ: Mapping[str, str] | None = None) -> float | None:
    """The watchdog timeout systemd enforces on this process (`WatchdogSec=`, passed as WATCHDOG_USEC), or None
    when it is not watched. WATCHDOG_PID names the process the watchdog is for: children started by the daemon
    inherit the environment but are not watched (sd_watchdog_enabled(3))."""
    env = os.environ if environ is None else environ
    try:
        usec = int(env["WATCHDOG_USEC"])
        watched_pid = int(env.get("WATCHDOG_PID", os.getpid()))
    except (KeyError, ValueError):
        return None
    if usec <= 0 or watched_pid != os.getpid():
        return None
    return usec / 1e6


def stderr_is_journal(environ: Mapping[str, str] | None = None) -> bool:
    """Whether stderr (fd 2) is systemd's journal stream: systemd sets JOURNAL_STREAM to the stream's
    `device:inode`; a redirected stderr (a child's log file, a shell pipe) no longer matches."""
    env = os.environ if environ is None else environ
    try:
        device, inode = (int(part) for part in env.get("JOURNAL_STREAM", "").split(":"))
        stat = os.fstat(2)
    except (ValueError, OSError):
        return False
    return (stat.st_dev, stat.st_ino) == (device, inode)


def configure_logging(level: int | str, identifier: str = "zk0-agent") -> logging.Handler:
    """Route the root logger to journald (native protocol: priority and `extra=` fields kept) when stderr is
    the journal, else to stderr with timestamps; replaces earlier root handlers. Returns the handler."""
    if stderr_is_journal():
        handler: logging.Handler = journal.JournalHandler(SYSLOG_IDENTIFIER=identifier)
        # The journal stamps time, unit and priority itself.
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    return handler
