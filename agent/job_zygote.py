"""A warm start for the agent's jobs: a child process that has imported what `zk0 record|rollout|validate` need
and forks each job from itself, so a job starts in milliseconds instead of paying Python's and lerobot's
imports (~6 s on a loaded 2-core host) every time.

The agent talks to it over a Unix socket pair: a request carries the job's command line and environment plus,
as an SCM_RIGHTS file descriptor, the write end of the pipe that becomes the job's stdout and stderr; the
answer is the job's pid. The zygote reaps its children and reports each exit status. The forked job is a new
session (its own process group, like a `Popen(start_new_session=True)` job) and runs `zk0.cli.main` with that
command line, so it is the same code path as the standalone command. When the agent dies, however it dies, the
zygote sees its socket close and stops the jobs still running (SIGINT: a recording saves its episode, a rollout
holds then cuts torque), so no job drives the arm unsupervised.

Forking after the imports is safe here because the zygote never starts a thread of its own; the BLAS pool's
threads that numpy and torch start at import are not carried into a child (only the forking thread is), and
both libraries reinitialise their pools after a fork. When the zygote is not ready (still importing) or has
died, the agent starts the job as a fresh process instead (zk0.agent.daemon_jobs).
"""

from __future__ import annotations

import array
import gc
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

log = logging.getLogger("zk0.agent.zygote")
PRELOAD = ("zk0.agent.record_cli", "zk0.agent.record", "zk0.agent.writer_process", "zk0.agent.dataset_store",
           "zk0.agent.rollout_cli", "zk0.agent.rollout", "zk0.agent.rollout_engines", "zk0.agent.validate_cli",
           "zk0.hw.robots", "zk0.hw.sim.rig_handle", "lerobot.robots.so_follower", "lerobot.teleoperators.so_leader",
           "lerobot.datasets.lerobot_dataset", "lerobot.cameras.zmq", "lerobot.policies.smolvla.modeling_smolvla",
           "torchcodec")  # lerobot picks its video backend by importing it when a dataset is created
MAX_MESSAGE = 1 << 20


# -- the zygote process -----------------------------------------------------------------------------------------
def serve(fd: int, preload: Sequence[str] = PRELOAD) -> int:
    """The zygote's main loop on its end of the socket pair `fd` (`python -m zk0.agent.job_zygote FD [MODULE ...]`)."""
    import importlib

    channel = socket.socket(fileno=fd)
    for name in preload:
        importlib.import_module(name)
    # Out of the collector's sight: a job's first full collection would otherwise walk (and so write to, copying
    # each page on write) the ~450k objects the imports made, which cost a forked job ~0.6 s before its first step.
    gc.freeze()
    channel.send(json.dumps({"ready": True}).encode())
    jobs: set[int] = set()
    while True:
        readable, _, _ = select.select([channel], [], [], 0.05)
        _report_exits(channel, jobs)
        if not readable:
            continue
        try:
            message, fds, _, _ = socket.recv_fds(channel, MAX_MESSAGE, 1)
        except ConnectionResetError:
            message, fds = b"", []
        if not message:  # the agent is gone (however it died): its jobs must not run on unsupervised
            return _stop_orphans(jobs)
        request = json.loads(message)
        pid = os.fork()
        if pid == 0:
            channel.close()
            _run_job(request["argv"], request["env"], fds[0])
        os.close(fds[0])
        jobs.add(pid)
        channel.send(json.dumps({"pid": pid}).encode())


def _report_exits(channel: socket.socket | None, jobs: set[int]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        jobs.discard(pid)
        if channel is not None:
            channel.send(json.dumps({"exit": pid, "code": os.waitstatus_to_exitcode(status)}).encode())


def _stop_orphans(jobs: set[int], grace_s: float = 30.0) -> int:
    """SIGINT to every job still running (a recording saves its episode, a rollout holds then cuts torque), then
    SIGKILL to what is left after `grace_s`."""
    for signum in (signal.SIGINT, signal.SIGKILL):
        for pid in list(jobs):
            try:
                os.killpg(pid, signum)
            except ProcessLookupError:
                jobs.discard(pid)
        deadline = time.monotonic() + grace_s
        while jobs and time.monotonic() < deadline:
            _report_exits(None, jobs)
            time.sleep(0.05)
    return 0


def _run_job(argv: list[str], env: Mapping[str, str], output: int) -> None:
    """In the forked child: become a session of its own with the job's environment and output, run the command."""
    code = 1
    try:
        os.setsid()
        os.dup2(output, 1)
        os.dup2(output, 2)
        os.close(output)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.environ.clear()
        os.environ.update(env)
        sys.stdout.reconfigure(line_buffering=True)
        sys.stderr.reconfigure(line_buffering=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from zk0.cli import main

        code = main(list(argv))
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:  # the job's own crash: its traceback goes to its output, its status says it failed
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


# -- the agent's side -------------------------------------------------------------------------------------------
class ForkedJob:
    """A job forked by the zygote, with the part of `subprocess.Popen`'s interface the agent's Job uses."""

    def __init__(self, pid: int, stdout: Any) -> None:
        self.pid = pid
        self.stdout = stdout
        self.returncode: int | None = None
        self._done = threading.Event()

    def _exited(self, code: int) -> None:
        self.returncode = code
        self._done.set()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._done.wait(timeout):
            raise subprocess.TimeoutExpired(f"job {self.pid}", timeout)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass


class Zygote:
    """The agent's handle on its zygote: `spawn` forks a job from it once it is ready, else returns None."""

    def __init__(self, log_path: Any, env: Mapping[str, str], preload: Sequence[str] = PRELOAD) -> None:
        self._channel, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with open(log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "zk0.agent.job_zygote", str(theirs.fileno()), *preload],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=dict(env),
                start_new_session=True)
        theirs.close()
        self._lock = threading.Lock()  # one spawn at a time: its answer is the next pid message
        self._pids: list[int] = []
        self._pid_ready = threading.Condition()
        self._jobs: dict[int, ForkedJob] = {}
        self._exits: dict[int, int] = {}  # exits reported before their spawn was answered
        self.ready = False
        self._reader = threading.Thread(target=self._read, name="zk0-zygote", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                message = self._channel.recv(MAX_MESSAGE)
            except OSError:
                message = b""
            if not message:
                self.ready = False
                with self._pid_ready:
                    self._pid_ready.notify_all()
                return
            event = json.loads(message)
            if event.get("ready"):
                self.ready = True
            elif "pid" in event:
                with self._pid_ready:
                    self._pids.append(event["pid"])
                    self._pid_ready.notify_all()
            elif "exit" in event:
                with self._pid_ready:
                    job = self._jobs.pop(event["exit"], None)
                    if job is None:
                        self._exits[event["exit"]] = event["code"]
                if job is not None:
                    job._exited(event["code"])

    def spawn(self, argv: list[str], env: Mapping[str, str], timeout_s: float = 5.0) -> ForkedJob | None:
        """Fork `zk0 ARGV` from the zygote; None when it is not ready or does not answer."""
        if not self.ready or self.process.poll() is not None:
            return None
        read_end, write_end = os.pipe()
        with self._lock:
            try:
                socket.send_fds(self._channel, [json.dumps({"argv": argv, "env": dict(env)}).encode()], [write_end])
            except OSError:
                os.close(read_end)
                return None
            finally:
                os.close(write_end)
            deadline = time.monotonic() + timeout_s
            with self._pid_ready:
                while not self._pids and self.ready and time.monotonic() < deadline:
                    self._pid_ready.wait(0.1)
                if not self._pids:
                    os.close(read_end)
                    return None
                pid = self._pids.pop(0)
                job = ForkedJob(pid, os.fdopen(read_end, "r", buffering=1))
                if pid in self._exits:
                    job._exited(self._exits.pop(pid))
                else:
                    self._jobs[pid] = job
        return job

    def close(self) -> None:
        """End the zygote as the agent's death would: it stops the jobs still running, then exits."""
        try:
            self._channel.shutdown(socket.SHUT_RDWR)  # wakes the reader; close() alone would not while it waits
        except OSError:
            pass
        self._channel.close()
        try:
            self.process.wait(timeout=60)  # up to the orphans' grace: a recording saving its episode
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


if __name__ == "__main__":
    raise SystemExit(serve(int(sys.argv[1]), sys.argv[2:]))
