"""Bus trace of simulated arms: every Goal_Position and Torque_Enable write the servos receive, as JSON lines.

It is the simulator's witness of what actually reached the bus, whatever the client code believes it sent:
tests prove with it that a safety envelope, a watchdog or an estop held or released the arm. One line per
register written:

    {"t": 1717000000.123456, "arm": "follower", "id": 1, "register": "Goal_Position", "value": 2047, "via": "sync_write"}

`t` is Unix time (comparable with other processes' logs), `value` the register's decoded raw value (ticks
in the servo's homed frame for Goal_Position; 0/1 for Torque_Enable), `via` the instruction that applied
it: "write", "sync_write", or "action" (a reg-write applied by ACTION). Bus threads only append to a
deque; a writer thread formats and flushes it every `flush_interval_s` (100 ms) and on `close`, so
tracing never delays a reply.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

from zk0.hw.sim.feetech_protocol import CONTROL_TABLE, SIGN_BITS, decode_sign_magnitude

TRACED_REGISTERS = ("Goal_Position", "Torque_Enable")
FLUSH_INTERVAL_S = 0.1

# (servo_id, address, data, via): what FeetechBus tells its write observer.
WriteObserver = Callable[[int, int, bytes, str], None]


def traced_values(address: int, data: bytes) -> list[tuple[str, int]]:
    """The traced registers a write of `data` at `address` covers completely, with their decoded values."""
    values = []
    for name in TRACED_REGISTERS:
        start, size = CONTROL_TABLE[name]
        if address <= start and start + size <= address + len(data):
            raw = int.from_bytes(data[start - address : start - address + size], "little")
            values.append((name, decode_sign_magnitude(raw, SIGN_BITS[name]) if name in SIGN_BITS else raw))
    return values


class BusTrace:
    """An open trace file; `observer(arm)` is the write observer to install on that arm's `FeetechBus`."""

    def __init__(self, path: Path, flush_interval_s: float = FLUSH_INTERVAL_S) -> None:
        self.path = Path(path)
        self._file = self.path.open("w")
        self._pending: collections.deque[dict] = collections.deque()
        self._interval = flush_interval_s
        self._closing = threading.Event()
        self._writer = threading.Thread(target=self._write_loop, name=f"bus-trace {self.path.name}", daemon=True)
        self._writer.start()

    def observer(self, arm: str) -> WriteObserver:
        def observe(servo_id: int, address: int, data: bytes, via: str) -> None:
            now = time.time()
            for register, value in traced_values(address, data):
                self._pending.append({"t": round(now, 6), "arm": arm, "id": servo_id, "register": register,
                                      "value": value, "via": via})

        return observe

    def _write_loop(self) -> None:
        while not self._closing.wait(self._interval):
            self._flush()

    def _flush(self) -> None:
        lines = []
        while self._pending:
            lines.append(json.dumps(self._pending.popleft()) + "\n")
        if lines:
            self._file.write("".join(lines))
            self._file.flush()

    def close(self) -> None:
        """Write whatever is pending and close the file (idempotent)."""
        if self._file.closed:
            return
        self._closing.set()
        self._writer.join(timeout=2.0)
        self._flush()
        self._file.close()

    def __enter__(self) -> BusTrace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
