"""Real-time scheduling for processes that talk to hardware.

A control loop at 30 Hz must start every tick within a few milliseconds of its deadline even while video
encoders or other programs saturate every core. Linux's SCHED_FIFO gives a thread precedence over all
normally scheduled work. It is applied to every Python thread of the process, not just the loop: the loop
needs the GIL, and a normally scheduled thread holding it (a camera reader, say) could be preempted by
anything for tens of milliseconds. Threads of native libraries, which never hold the GIL (ZeroMQ's I/O
threads, torch's pools), are left alone: a new libzmq thread reads its own policy and priority in two calls
and aborts the process if writing them back fails, which it does when its policy was switched in between.
SCHED_RESET_ON_FORK makes threads and processes started later (lerobot's encoder threads, the dataset writer)
normal again. The real-time threads here sleep most of each period.

Unprivileged users need `LimitRTPRIO=` (systemd) or CAP_SYS_NICE; without it the process runs at normal
priority and says so once.
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress

log = logging.getLogger(__name__)
# Python hands the GIL over every `switchinterval` seconds: a thread waiting for it waits that long behind
# any other Python thread, so hardware processes shorten it from the default 5 ms.
HARDWARE_SWITCH_INTERVAL_S = 0.0005
POLLING_NICENESS = -20
_warned = False
CAP_SYS_NICE = 23
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def python_thread_ids() -> list[int]:
    """Native ids of this process's Python threads: the ones that can hold the GIL."""
    return [thread.native_id for thread in threading.enumerate() if thread.native_id is not None]


def set_realtime(priority: int, thread_id: int = 0) -> bool:
    """Make a thread (0: the calling one) SCHED_FIFO at `priority` (1-99); False where the OS refuses."""
    global _warned
    if not 1 <= priority <= 99:
        raise ValueError(f"real-time priority must be 1..99, got {priority}")
    try:
        os.sched_setscheduler(thread_id, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, os.sched_param(priority))
    except ProcessLookupError:  # the thread ended meanwhile
        return True
    except PermissionError:
        if not _warned:
            log.warning("real-time priority %d not permitted (needs LimitRTPRIO or CAP_SYS_NICE); "
                        "timing will suffer when the CPU is busy", priority)
            _warned = True
        return False
    return True


def make_realtime(priority: int) -> bool:
    """Every Python thread this process has now at real-time `priority`, for good."""
    return all(set_realtime(priority, thread) for thread in python_thread_ids())


@contextmanager
def realtime(priority: int | None) -> Iterator[bool]:
    """Run the body with every Python thread of this process at real-time `priority` (None: unchanged),
    restoring each one's policy and niceness afterwards; yields whether the OS granted it. The threads also get
    the highest niceness, which is what they run with inside `polling()`."""
    if priority is None:
        yield False
        return
    previous = {}
    for thread in python_thread_ids():
        try:
            previous[thread] = (os.sched_getscheduler(thread), os.sched_getparam(thread),
                                os.getpriority(os.PRIO_PROCESS, thread))
        except ProcessLookupError:
            continue
    granted = all(set_realtime(priority, thread) for thread in previous)
    if granted:
        for thread in previous:
            with suppress(ProcessLookupError, PermissionError):
                os.setpriority(os.PRIO_PROCESS, thread, POLLING_NICENESS)
    try:
        yield granted
    finally:
        for thread, (policy, param, niceness) in previous.items():
            with suppress(ProcessLookupError, PermissionError):
                os.sched_setscheduler(thread, policy, param)
                os.setpriority(os.PRIO_PROCESS, thread, niceness)


@contextmanager
def polling() -> Iterator[None]:
    """Run the body at normal policy (keeping the thread's niceness) if the calling thread is real-time.

    scservo_sdk reads the serial port without blocking (pyserial `timeout=0`) in a loop until a reply is
    complete. A real-time thread spinning there keeps its CPU from the kernel worker that delivers the
    reply's bytes (pty and USB-serial input are pushed to the line discipline from a workqueue), which
    delayed replies by tens of milliseconds. Bus transactions therefore run at normal policy."""
    policy = os.sched_getscheduler(0)
    if policy & ~os.SCHED_RESET_ON_FORK != os.SCHED_FIFO:
        yield
        return
    param = os.sched_getparam(0)
    os.sched_setscheduler(0, os.SCHED_OTHER | os.SCHED_RESET_ON_FORK, os.sched_param(0))
    try:
        yield
    finally:
        os.sched_setscheduler(0, policy, param)


def shorten_gil_slices() -> None:
    sys.setswitchinterval(min(sys.getswitchinterval(), HARDWARE_SWITCH_INTERVAL_S))


def _capabilities() -> tuple[ctypes.CDLL, _CapHeader, ctypes.Array]:
    libc = ctypes.CDLL(None, use_errno=True)
    header, data = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0), (_CapData * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget failed")
    return libc, header, data


def _set_capabilities(libc: ctypes.CDLL, header: _CapHeader, data: ctypes.Array) -> None:
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")


def drop_realtime_rights() -> None:
    """Give up the right to real-time scheduling in the calling thread and the threads it starts later, for
    good: RLIMIT_RTPRIO 0 for the process and, as root, CAP_SYS_NICE (capabilities are per thread and
    inherited by the threads a thread creates).

    Some libraries take real-time priority whenever they can: SVT-AV1 creates every encoder thread
    SCHED_FIFO at priority 99 when permitted (as root), above any control loop, and falls back to normal
    threads when refused."""
    resource.setrlimit(resource.RLIMIT_RTPRIO, (0, 0))
    libc, header, data = _capabilities()
    if data[0].permitted & (1 << CAP_SYS_NICE):
        data[0].effective &= ~(1 << CAP_SYS_NICE)
        data[0].permitted &= ~(1 << CAP_SYS_NICE)
        _set_capabilities(libc, header, data)


@contextmanager
def threads_without_realtime() -> Iterator[None]:
    """Threads started in the body (and the threads they start) cannot take real-time priority as root;
    the calling thread gets its rights back afterwards. For bulk work started from a process that keeps its
    rights (lerobot's video encoders in a root process)."""
    libc, header, data = _capabilities()
    if not data[0].effective & (1 << CAP_SYS_NICE):
        yield
        return
    data[0].effective &= ~(1 << CAP_SYS_NICE)
    _set_capabilities(libc, header, data)
    try:
        yield
    finally:
        data[0].effective |= 1 << CAP_SYS_NICE
        _set_capabilities(libc, header, data)
