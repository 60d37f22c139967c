"""The Feetech STS3215 wire format the simulated bus speaks: protocol-0 packets and the control table.

Packets are built (`instruction_packet`, `status_packet`) and parsed from a byte stream (`PacketParser`) as
Feetech's own SDK frames them. The control table (addresses and sizes) and the sign-magnitude encodings are
lerobot's own (`lerobot/motors/feetech/tables.py`, `lerobot/motors/encoding_utils.py`). Both files are
import-free, so they are loaded straight from their paths: importing the `lerobot` package would pull in
torch, and a simulated arm must start in well under a second.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType


def _load_lerobot_file(relative: str) -> ModuleType:
    spec = importlib.util.find_spec("lerobot")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("lerobot is not installed; the simulated bus reads its Feetech control table")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    module_spec = importlib.util.spec_from_file_location(f"_zk0_lerobot_{path.stem}", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


_TABLES = _load_lerobot_file("motors/feetech/tables.py")
_ENCODING = _load_lerobot_file("motors/encoding_utils.py")
encode_sign_magnitude = _ENCODING.encode_sign_magnitude
decode_sign_magnitude = _ENCODING.decode_sign_magnitude

MODEL = "sts3215"
CONTROL_TABLE: dict[str, tuple[int, int]] = _TABLES.MODEL_CONTROL_TABLE[MODEL]
SIGN_BITS: dict[str, int] = _TABLES.MODEL_ENCODING_TABLE[MODEL]
MODEL_NUMBER: int = _TABLES.MODEL_NUMBER_TABLE[MODEL]
RESOLUTION: int = _TABLES.MODEL_RESOLUTION[MODEL]
BAUDRATE_CODES: dict[int, int] = _TABLES.MODEL_BAUDRATE_TABLE[MODEL]

# Protocol 0 (scservo_sdk/scservo_def.py).
BROADCAST_ID = 0xFE
INST_PING, INST_READ, INST_WRITE, INST_REG_WRITE, INST_ACTION = 1, 2, 3, 4, 5
INST_SYNC_READ, INST_SYNC_WRITE = 0x82, 0x83
ERRBIT_VOLTAGE, ERRBIT_ANGLE, ERRBIT_OVERHEAT, ERRBIT_OVERELE, ERRBIT_OVERLOAD = 1, 2, 4, 8, 32


def checksum(body: bytes | bytearray) -> int:
    """Protocol-0 checksum over ID, LENGTH, INSTRUCTION/ERROR and parameters."""
    return ~sum(body) & 0xFF


def status_packet(servo_id: int, error: int, params: bytes = b"") -> bytes:
    body = bytes([servo_id, len(params) + 2, error]) + params
    return b"\xff\xff" + body + bytes([checksum(body)])


def instruction_packet(servo_id: int, instruction: int, params: bytes = b"") -> bytes:
    body = bytes([servo_id, len(params) + 2, instruction]) + params
    return b"\xff\xff" + body + bytes([checksum(body)])


@dataclass(frozen=True)
class Instruction:
    servo_id: int
    code: int
    params: bytes


class PacketParser:
    """Splits a byte stream into instruction packets; drops noise and packets with a bad checksum."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.rejected = 0

    def feed(self, data: bytes) -> list[Instruction]:
        self._buffer += data
        packets: list[Instruction] = []
        while True:
            start = self._buffer.find(b"\xff\xff")
            if start < 0:
                # Keep a trailing 0xFF: it may be the first half of the next header.
                del self._buffer[: max(0, len(self._buffer) - 1)]
                return packets
            del self._buffer[:start]
            # Real servos tolerate runs of 0xFF before the ID.
            while len(self._buffer) > 2 and self._buffer[2] == 0xFF:
                del self._buffer[0]
            if len(self._buffer) < 4:
                return packets
            length = self._buffer[3]
            total = length + 4
            if length < 2:
                del self._buffer[:2]
                self.rejected += 1
                continue
            if len(self._buffer) < total:
                return packets
            packet = bytes(self._buffer[:total])
            del self._buffer[:total]
            if packet[-1] != checksum(packet[2:-1]):
                self.rejected += 1
                continue
            packets.append(Instruction(packet[2], packet[4], packet[5:-1]))
