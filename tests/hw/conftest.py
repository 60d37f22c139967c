"""Fixtures for simulated-hardware tests: simulated arms as real `zk0 sim arm` processes on real ptys."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def responsive_bus_threads() -> Iterator[None]:
    """In-process bus servers share the GIL with the SDK's busy-polling client: switch threads every 0.5 ms
    (as `zk0 sim rig` does) so a reply is never stuck behind the client for lerobot's whole 50 ms timeout."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    yield
    sys.setswitchinterval(previous)


def spawn_sim(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "zk0.cli", "sim", *args], stdout=subprocess.PIPE, text=True
    )


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture
def sim_arm(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Start simulated arms; each call returns the pty path. Calibration files land in tmp_path/calibration;
    `extra` arguments go to `zk0 sim arm` (e.g. "--bus-trace", path)."""
    processes: list[subprocess.Popen] = []

    def start(role: str = "follower", robot: str = "so101", arm_id: str | None = None, *extra: str) -> str:
        args = ["arm", "--role", role, "--robot", robot, "--print-port",
                "--calibration-dir", str(tmp_path / "calibration"), "--id", arm_id or f"sim_{role}", *extra]
        process = spawn_sim(args)
        processes.append(process)
        port = process.stdout.readline().strip()
        assert port.startswith("/dev/"), f"zk0 sim arm printed {port!r}"
        return port

    yield start
    for process in processes:
        stop(process)


def connect_retrying(device, attempts: int = 3) -> None:
    """Connect a lerobot robot, teleoperator or bus, retrying like zk0's recorder (hw.robots).

    lerobot's connect handshake pings each motor once and never retries, so a single status packet lost on
    the pty fails the whole connect; in long test runs the simulator occasionally answers a first contact
    after the client's timeout (see NOTES.md, open items)."""
    bus = getattr(device, "bus", device)
    for attempt in range(1, attempts + 1):
        try:
            device.connect()
            return
        except (ConnectionError, RuntimeError, IndexError):  # IndexError: the SDK parsing a late, short reply
            if bus.port_handler.is_open:
                bus.port_handler.closePort()
            if attempt == attempts:
                raise


def ping_retrying(packet, port, servo_id: int, attempts: int = 3) -> tuple[int, int, int]:
    """The SDK's ping with the bounded retry every Feetech client uses (lerobot: `num_retry`). Before a retry
    the input is drained: the raw SDK never flushes it, so a reply that came after its timeout would
    otherwise answer the next request (the SDK then indexes a short reply and raises IndexError)."""
    result = model = error = -1
    for _ in range(attempts):
        try:
            model, result, error = packet.ping(port, servo_id)
        except IndexError:
            result = -1
        if result == 0:
            break
        time.sleep(0.05)
        port.ser.reset_input_buffer()
    return model, result, error
