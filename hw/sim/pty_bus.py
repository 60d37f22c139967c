"""Serve a simulated Feetech bus on a pseudo-terminal, so any serial client (scservo_sdk, lerobot) can open it.

One thread per bus: select() on the pty master, parse whole packets, advance the motion model to
"now", answer. The only sleep is the wire time of each reply at the configured baud rate (plus the
configured servo latency), taken once per reply batch.
"""

from __future__ import annotations

import os
import select
import threading
import time
import tty
from dataclasses import dataclass

from zk0.hw.sim.feetech import FeetechBus
from zk0.hw.sim.feetech_protocol import PacketParser

BITS_PER_BYTE = 10  # 8N1: start + 8 data + stop
# Above a recorder's control loop (20 by default): simulated servos answer whatever the host is doing.
SIM_BUS_PRIORITY = 30


@dataclass(frozen=True)
class LinkConfig:
    baudrate: int = 1_000_000
    latency_s: float = 0.0  # servo turnaround before the first reply byte (Return_Delay_Time on hardware)
    pace: bool = True  # sleep each reply's wire time, as a real half-duplex line would take


def wire_time_s(n_bytes: int, baudrate: int) -> float:
    return n_bytes * BITS_PER_BYTE / baudrate


class PtyBusServer:
    """Owns a pty pair; `port` is the slave device path clients open."""

    def __init__(self, bus: FeetechBus, link: LinkConfig | None = None) -> None:
        self.bus = bus
        self.link = link or LinkConfig()
        self._master, self._slave = os.openpty()
        # Raw mode: no echo, no line discipline rewriting 0x0D/0x0A/0x11 bytes inside packets.
        tty.setraw(self._slave)
        # Keeping our own slave fd open means a client closing the port never hands us EIO.
        self.port = os.ttyname(self._slave)
        self._parser = PacketParser()
        self._wake_r, self._wake_w = os.pipe()
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name=f"feetech-pty {self.port}", daemon=True)
        self.packets_handled = 0

    def start(self) -> PtyBusServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping = True
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=2.0)
        for fd in (self._master, self._slave, self._wake_r, self._wake_w):
            os.close(fd)

    def __enter__(self) -> PtyBusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve(self) -> None:
        while not self._stopping:
            readable, _, _ = select.select([self._master, self._wake_r], [], [])
            if self._master not in readable:
                continue
            try:
                data = os.read(self._master, 4096)
            except OSError:
                continue
            for instruction in self._parser.feed(data):
                self.bus.advance(time.monotonic())
                replies = self.bus.handle(instruction)
                self.packets_handled += 1
                if replies:
                    self._send(b"".join(replies))

    def _send(self, reply: bytes) -> None:
        delay = self.link.latency_s + (wire_time_s(len(reply), self.link.baudrate) if self.link.pace else 0.0)
        if delay > 0:
            time.sleep(delay)
        os.write(self._master, reply)
