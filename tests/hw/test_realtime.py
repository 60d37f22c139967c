"""Real-time scheduling of hardware processes, and giving up that right in bulk-work processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import pytest

from zk0.hw.realtime import POLLING_NICENESS, polling, realtime, set_realtime


def thread_ids() -> list[int]:
    """Native ids of every thread of this process, Python's and native libraries'."""
    return [int(name) for name in os.listdir("/proc/self/task")]


def test_realtime_covers_every_python_thread_and_restores_them() -> None:
    release = threading.Event()
    helper = threading.Thread(target=release.wait, daemon=True)
    helper.start()
    before = {tid: os.sched_getscheduler(tid) for tid in thread_ids()}
    try:
        with realtime(7) as granted:
            if not granted:
                pytest.skip("real-time scheduling not permitted here")
            assert os.sched_getscheduler(helper.native_id) & ~os.SCHED_RESET_ON_FORK == os.SCHED_FIFO
            assert os.sched_getparam(0).sched_priority == 7
            late = threading.Thread(target=lambda: None)  # started by a real-time thread: normal again
            policies = []
            late.run = lambda: policies.append(os.sched_getscheduler(0))
            late.start()
            late.join()
            assert policies == [os.SCHED_OTHER]
        assert {tid: os.sched_getscheduler(tid) for tid in before if tid in thread_ids()} == before
    finally:
        release.set()


def test_realtime_leaves_native_library_threads_alone() -> None:
    """ZeroMQ's I/O threads keep their policy: a libzmq thread switched while it starts aborts the process."""
    zmq = pytest.importorskip("zmq")
    context = zmq.Context()
    socket = context.socket(zmq.PUB)  # the context's I/O and reaper threads start with its first socket
    try:
        native = set(thread_ids()) - {t.native_id for t in threading.enumerate()}
        assert native, "ZeroMQ started no thread of its own"
        with realtime(7) as granted:
            if not granted:
                pytest.skip("real-time scheduling not permitted here")
            assert {os.sched_getscheduler(tid) for tid in native if tid in thread_ids()} == {os.SCHED_OTHER}
            assert os.sched_getscheduler(0) & ~os.SCHED_RESET_ON_FORK == os.SCHED_FIFO
    finally:
        socket.close(linger=0)
        context.term()


def test_realtime_none_changes_nothing() -> None:
    with realtime(None) as granted:
        assert granted is False
        assert os.sched_getscheduler(0) == os.SCHED_OTHER


def test_priority_out_of_range() -> None:
    with pytest.raises(ValueError, match="1..99"):
        set_realtime(0)


def test_dropped_rights_cover_threads_started_later() -> None:
    """What SVT-AV1 does (ask for SCHED_FIFO 99, fall back when refused) must be refused after dropping."""
    script = textwrap.dedent(
        """
        import os, threading
        from zk0.hw.realtime import drop_realtime_rights
        drop_realtime_rights()
        outcome = []
        def encoder_thread():
            try:
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(99))
                outcome.append("granted")
            except PermissionError:
                outcome.append("refused")
        thread = threading.Thread(target=encoder_thread)
        thread.start()
        thread.join()
        print(outcome[0])
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "refused"


def test_polling_runs_at_normal_policy_inside_realtime() -> None:
    with realtime(7) as granted:
        if not granted:
            pytest.skip("real-time scheduling not permitted here")
        with polling():
            assert os.sched_getscheduler(0) & ~os.SCHED_RESET_ON_FORK == os.SCHED_OTHER
            assert os.getpriority(os.PRIO_PROCESS, 0) == POLLING_NICENESS
        assert os.sched_getscheduler(0) & ~os.SCHED_RESET_ON_FORK == os.SCHED_FIFO
    assert os.sched_getscheduler(0) == os.SCHED_OTHER and os.getpriority(os.PRIO_PROCESS, 0) == 0
