"""zk0.agent.systemd against a real AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from systemd import journal

from tests.agent.notify_socket import NotifyListener, notify_socket  # noqa: F401 (fixture)
from zk0.agent import systemd as sd

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def notifying(notify_socket: NotifyListener, monkeypatch: pytest.MonkeyPatch) -> NotifyListener:  # noqa: F811
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.address)
    return notify_socket


def test_without_notify_socket_every_call_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert [sd.ready("idle"), sd.status("idle"), sd.watchdog(), sd.reloading(), sd.stopping()] == [False] * 5


def test_messages_arrive_from_this_process(notifying: NotifyListener) -> None:
    assert sd.ready("idle")
    assert sd.status("recording")
    assert sd.watchdog()
    assert sd.reloading()
    assert sd.stopping("shutting down")
    notifying.wait_for("STOPPING")
    fields = [m.fields for m in notifying.messages]
    assert fields[0] == {"READY": "1", "STATUS": "idle"}
    assert fields[1:3] == [{"STATUS": "recording"}, {"WATCHDOG": "1"}]
    assert fields[3]["RELOADING"] == "1"
    assert 0 < int(fields[3]["MONOTONIC_USEC"]) <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert fields[4] == {"STOPPING": "1", "STATUS": "shutting down"}
    assert {m.pid for m in notifying.messages} == {os.getpid()}


def test_status_cannot_inject_assignments(notifying: NotifyListener) -> None:
    sd.status("config refused: line 3\nREADY=1\r\nWATCHDOG=1")
    message = notifying.wait_for("STATUS", value=None)
    assert message.fields == {"STATUS": "config refused: line 3 READY=1 WATCHDOG=1"}


def test_an_oversized_status_is_cut_not_dropped(notifying: NotifyListener) -> None:
    sd.ready("é" * 10_000)  # 20 kB of UTF-8: systemd would drop the whole datagram, READY=1 with it
    message = notifying.wait_for("READY")
    assert message.fields["STATUS"] == "é" * sd.STATUS_MAX_CHARS


def test_a_filesystem_socket_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with NotifyListener(str(tmp_path / "notify")) as listener:
        monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
        assert sd.ready()
        assert listener.wait_for("READY").fields == {"READY": "1"}
    assert not (tmp_path / "notify").exists()


def test_a_missing_socket_is_logged_not_raised(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "@zk0-notify-test-nobody-listens")
    with caplog.at_level(logging.WARNING, logger=sd.__name__):
        assert sd.watchdog() is False
    assert "sd_notify to @zk0-notify-test-nobody-listens failed" in caplog.text


@pytest.mark.parametrize(("environ", "expected"), [
    ({}, None),
    ({"WATCHDOG_USEC": "10000000"}, 10.0),
    ({"WATCHDOG_USEC": "2500000", "WATCHDOG_PID": str(os.getpid())}, 2.5),
    ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),  # a parent's watchdog
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "ten"}, None),
    ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "me"}, None),
    ({"WATCHDOG_PID": str(os.getpid())}, None),
])
def test_watchdog_interval(environ: dict[str, str], expected: float | None) -> None:
    assert sd.watchdog_interval_s(environ) == expected


# A daemon's life in miniature: ready, a state change, pings at half the watchdog interval, then a hang.
CHILD = textwrap.dedent("""
    import time
    from zk0.agent import systemd as sd
    interval = sd.watchdog_interval_s()
    sd.ready("idle")
    for i in range(8):
        sd.watchdog()
        if i == 3:
            sd.status("recording")
        time.sleep(interval / 2)
    sd.status("hung")
    time.sleep(interval * 2)
    sd.stopping()
""")


def test_a_subprocess_under_a_watchdog(notify_socket: NotifyListener) -> None:  # noqa: F811
    interval_s = 0.4
    child = subprocess.Popen([sys.executable, "-c", CHILD], cwd=REPO, env=notify_socket.environ(watchdog_s=interval_s))
    ready = notify_socket.wait_for("READY", pid=child.pid, timeout_s=60)
    hung = notify_socket.wait_for("STATUS", value="hung", pid=child.pid)
    stopping = notify_socket.wait_for("STOPPING", pid=child.pid, timeout_s=10)
    assert child.wait(timeout=10) == 0
    pings = notify_socket.times("WATCHDOG", pid=child.pid)
    assert len(pings) == 8
    assert ready.time_s <= pings[0]
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    # Every gap below the interval systemd would enforce (loose upper bound: a busy 2-core test machine).
    assert all(interval_s / 2 * 0.9 <= gap < interval_s for gap in gaps), gaps
    assert notify_socket.values("STATUS", pid=child.pid) == ["idle", "recording", "hung"]
    assert not [t for t in pings if t > hung.time_s]
    assert stopping.time_s - pings[-1] >= interval_s  # the silence systemd's watchdog would act on


def test_the_childs_children_are_not_watched(notify_socket: NotifyListener) -> None:  # noqa: F811
    # systemd passes WATCHDOG_PID=<main pid>; a process the daemon starts inherits it and must not ping.
    env = notify_socket.environ(watchdog_s=10.0) | {"WATCHDOG_PID": str(os.getpid())}
    code = "from zk0.agent import systemd as sd; print(sd.watchdog_interval_s())"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"


def test_logging_goes_to_stderr_outside_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    handler = sd.configure_logging(logging.INFO)
    try:
        assert type(handler) is logging.StreamHandler
        assert logging.getLogger().handlers == [handler] and logging.getLogger().level == logging.INFO
    finally:
        logging.getLogger().removeHandler(handler)


def test_logging_goes_to_the_journal_with_structured_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    stderr = os.fstat(2)
    monkeypatch.setenv("JOURNAL_STREAM", f"{stderr.st_dev}:{stderr.st_ino}")
    handler = sd.configure_logging("DEBUG", identifier="zk0-agent")
    sent: list[tuple[str, dict[str, object]]] = []
    try:
        assert isinstance(handler, journal.JournalHandler)
        handler.send = lambda MESSAGE, **fields: sent.append((MESSAGE, fields))  # journald is not running here
        logging.getLogger("zk0.agent.daemon").warning("state %s", "recording", extra={"ZK0_STATE": "recording"})
    finally:
        logging.getLogger().removeHandler(handler)
    [(message, fields)] = sent
    assert message == "zk0.agent.daemon: state recording"
    assert fields["ZK0_STATE"] == "recording"
    assert fields["PRIORITY"] == str(journal.LOG_WARNING)
    assert fields["SYSLOG_IDENTIFIER"] == "zk0-agent"


@pytest.mark.parametrize("value", ["", "1:2", "garbage", "1:2:3"])
def test_a_journal_stream_that_is_not_stderr(value: str) -> None:
    assert sd.stderr_is_journal({"JOURNAL_STREAM": value}) is False
