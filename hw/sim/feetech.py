"""Simulated Feetech STS3215 servos on one bus: memory image, motion model, fault injection, dispatch.

Packets and the control table live in `zk0.hw.sim.feetech_protocol`; here each servo keeps a memory image
laid out by that table and moves its shaft like an STS3215, and the bus answers each instruction as real
servos do, with injectable faults (dropped or garbled replies, error bits).

Everything here is pure and clock-free: callers pass the time (`advance(now)`), which keeps the
model deterministic under test and lets the pty server integrate motion lazily, exactly when a packet
arrives, instead of ticking a timer.
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from zk0.hw.sim.feetech_protocol import (
    BAUDRATE_CODES,
    BROADCAST_ID,
    CONTROL_TABLE,
    INST_ACTION,
    INST_PING,
    INST_READ,
    INST_REG_WRITE,
    INST_SYNC_READ,
    INST_SYNC_WRITE,
    INST_WRITE,
    MODEL_NUMBER,
    RESOLUTION,
    SIGN_BITS,
    Instruction,
    decode_sign_magnitude,
    encode_sign_magnitude,
    status_packet,
)

# Present_* and friends are written by the servo only.
READ_ONLY = frozenset(
    {"Firmware_Major_Version", "Firmware_Minor_Version", "Model_Number", "Present_Position",
     "Present_Velocity", "Present_Load", "Present_Voltage", "Present_Temperature", "Status", "Moving",
     "Present_Current", "Goal_Position_2"}
)
_READ_ONLY_ADDRESSES = frozenset(
    CONTROL_TABLE[name][0] + i for name in READ_ONLY for i in range(CONTROL_TABLE[name][1])
)
MEMORY_SIZE = 256

FACTORY_DEFAULTS: dict[str, int] = {
    "Firmware_Major_Version": 3,
    "Firmware_Minor_Version": 10,
    "Model_Number": MODEL_NUMBER,
    "Baud_Rate": BAUDRATE_CODES[1_000_000],
    "Return_Delay_Time": 250,
    "Response_Status_Level": 1,
    "Min_Position_Limit": 0,
    "Max_Position_Limit": RESOLUTION - 1,
    "Max_Temperature_Limit": 70,
    "Max_Voltage_Limit": 140,
    "Min_Voltage_Limit": 40,
    "Max_Torque_Limit": 1000,
    "Phase": 0x0C,
    "Unloading_Condition": 44,
    "LED_Alarm_Condition": 47,
    "P_Coefficient": 32,
    "D_Coefficient": 32,
    "I_Coefficient": 0,
    "Minimum_Startup_Force": 16,
    "CW_Dead_Zone": 1,
    "CCW_Dead_Zone": 1,
    "Protection_Current": 500,
    "Angular_Resolution": 1,
    "Homing_Offset": 0,
    "Operating_Mode": 0,
    "Protective_Torque": 20,
    "Protection_Time": 200,
    "Overload_Torque": 80,
    "Torque_Limit": 1000,
    "Lock": 1,
    "Present_Voltage": 120,
    "Present_Temperature": 30,
    "Maximum_Velocity_Limit": 80,
    "Maximum_Acceleration": 150,
}

# STS3215 at 12 V: ~0.22 s per 60 degrees unloaded, i.e. about 3000 ticks/s.
MAX_SPEED_TICKS_S = 3000.0
ACCELERATION_UNIT_TICKS_S2 = 100.0  # the Acceleration register counts 100 steps/s^2
TORQUE_OFF_DRIFT_TICKS = 0.6  # random-walk scale (ticks per sqrt(s)) of an unpowered, back-driven joint


@dataclass
class FaultPlan:
    """Faults to inject into replies. Counted faults fire on the next replies; rates are per reply."""

    drop_next: int = 0
    garble_next: int = 0
    drop_rate: float = 0.0
    garble_rate: float = 0.0
    error_bits: dict[int, int] = field(default_factory=dict)  # servo id -> ERRBIT_* mask in every status
    seed: int = 0

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def take_drop(self) -> bool:
        if self.drop_next > 0:
            self.drop_next -= 1
            return True
        return self.drop_rate > 0 and self._rng.random() < self.drop_rate

    def take_garble(self) -> bool:
        if self.garble_next > 0:
            self.garble_next -= 1
            return True
        return self.garble_rate > 0 and self._rng.random() < self.garble_rate

    @classmethod
    def from_dict(cls, spec: dict) -> FaultPlan:
        known = {"drop_next", "garble_next", "drop_rate", "garble_rate", "error_bits", "seed"}
        unknown = set(spec) - known
        if unknown:
            raise ValueError(f"unknown fault fields {sorted(unknown)}; expected some of {sorted(known)}")
        spec = dict(spec)
        spec["error_bits"] = {int(k): int(v) for k, v in spec.get("error_bits", {}).items()}
        return cls(**spec)


def garble(packet: bytes) -> bytes:
    """Corrupt one payload byte so the checksum fails while the frame still parses as a status packet."""
    corrupted = bytearray(packet)
    corrupted[-2 if len(packet) > 6 else -1] ^= 0x5A
    return bytes(corrupted)


def step_toward(position: float, velocity: float, goal: float, max_speed: float, max_accel: float,
                dt: float) -> tuple[float, float]:
    """One step of a trapezoidal move: accelerate, cruise at `max_speed`, brake to stop at `goal`."""
    error = goal - position
    if abs(error) < 0.5 and abs(velocity) < max_accel * dt:
        return goal, 0.0
    brake_speed = math.sqrt(2.0 * max_accel * abs(error))
    desired = math.copysign(min(max_speed, brake_speed), error)
    dv = max(-max_accel * dt, min(max_accel * dt, desired - velocity))
    velocity += dv
    new_position = position + velocity * dt
    if (goal - new_position) * error <= 0:  # crossed the goal this step
        return goal, 0.0
    return new_position, velocity


class Servo:
    """One STS3215: its memory image plus the physical shaft angle.

    `shaft` is the absolute encoder angle in ticks. lerobot's convention (feetech.py,
    `_get_half_turn_homings`) is Present_Position = shaft - Homing_Offset, wrapped into one turn
    because Phase bit 4 is clear; the goal lives in the same homed frame.
    """

    def __init__(self, servo_id: int, shaft: float = RESOLUTION / 2, seed: int = 0) -> None:
        self.memory = bytearray(MEMORY_SIZE)
        for name, value in FACTORY_DEFAULTS.items():
            self.set(name, value)
        self.set("ID", servo_id)
        self.shaft = float(shaft)
        self.velocity = 0.0
        self.pending_write: tuple[int, bytes] | None = None
        self._rng = random.Random(seed * 1009 + servo_id)
        self._refresh_sensors()

    @property
    def servo_id(self) -> int:
        return self.memory[CONTROL_TABLE["ID"][0]]

    def get(self, name: str) -> int:
        address, size = CONTROL_TABLE[name]
        raw = int.from_bytes(self.memory[address : address + size], "little")
        return decode_sign_magnitude(raw, SIGN_BITS[name]) if name in SIGN_BITS else raw

    def set(self, name: str, value: int) -> None:
        address, size = CONTROL_TABLE[name]
        raw = encode_sign_magnitude(int(value), SIGN_BITS[name]) if name in SIGN_BITS else int(value)
        self.memory[address : address + size] = raw.to_bytes(size, "little")

    @property
    def torque_enabled(self) -> bool:
        return self.get("Torque_Enable") == 1

    @property
    def position(self) -> float:
        """Present position in the homed frame, unrounded."""
        return (self.shaft - self.get("Homing_Offset")) % RESOLUTION

    def place(self, position: float) -> None:
        """Set the present position directly: a hand (or the scripted operator) moving an unpowered joint."""
        self.shaft = (position + self.get("Homing_Offset")) % RESOLUTION
        self.velocity = 0.0
        self._refresh_sensors()

    def write(self, address: int, data: bytes) -> None:
        for offset, byte in enumerate(data):
            if address + offset < MEMORY_SIZE and address + offset not in _READ_ONLY_ADDRESSES:
                self.memory[address + offset] = byte
        self._refresh_sensors()

    def read(self, address: int, length: int) -> bytes:
        return bytes(self.memory[address : address + length])

    def _target(self) -> float:
        goal = self.get("Goal_Position")
        low, high = self.get("Min_Position_Limit"), self.get("Max_Position_Limit")
        if low < high:  # equal limits mean multi-turn mode: no clamp
            goal = min(high, max(low, goal))
        return float(goal)

    def _limits(self) -> tuple[float, float]:
        goal_speed = self.get("Goal_Velocity")
        speed = abs(goal_speed) if goal_speed else MAX_SPEED_TICKS_S
        accel_register = self.get("Acceleration") or self.get("Maximum_Acceleration")
        return min(speed, MAX_SPEED_TICKS_S), max(1, accel_register) * ACCELERATION_UNIT_TICKS_S2

    def advance(self, dt: float) -> None:
        if dt <= 0:
            return
        position = self.position
        if self.torque_enabled:
            speed, accel = self._limits()
            position, self.velocity = step_toward(position, self.velocity, self._target(), speed, accel, dt)
        else:
            position += self._rng.gauss(0.0, TORQUE_OFF_DRIFT_TICKS * math.sqrt(dt))
            self.velocity = 0.0
        self.shaft = (position + self.get("Homing_Offset")) % RESOLUTION
        self._refresh_sensors()

    def _refresh_sensors(self) -> None:
        present = int(round(self.position)) % RESOLUTION
        self.set("Present_Position", present)
        self.set("Present_Velocity", int(round(self.velocity)))
        if self.torque_enabled:
            load = min(1000, int(abs(self._target() - self.position) * self.get("P_Coefficient") / 8))
        else:
            load = 0
            # An unpowered servo's goal follows the shaft, so enabling torque holds the joint where it is
            # instead of jumping to a stale goal.
            self.set("Goal_Position", present)
        self.set("Present_Load", load)
        self.set("Present_Current", load // 2)
        self.set("Moving", int(abs(self.velocity) > 1.0))


class FeetechBus:
    """A chain of servos behind one serial line. `handle` turns one instruction into reply bytes.

    Thread-safe: the pty server handles packets while the rig reads follower positions and the
    scripted operator places leader joints.
    """

    def __init__(self, ids: list[int], start_positions: dict[int, float] | None = None, seed: int = 0) -> None:
        start_positions = start_positions or {}
        self.servos: dict[int, Servo] = {}
        for servo_id in ids:
            servo = Servo(servo_id, seed=seed)
            servo.place(start_positions.get(servo_id, RESOLUTION / 2))
            self.servos[servo_id] = servo
        self.faults = FaultPlan()
        self.lock = threading.RLock()
        self._time: float | None = None
        # Told (servo_id, address, data, via) of every write a servo applies, e.g. a `zk0.hw.sim.bus_trace.BusTrace`.
        self.write_observer: Callable[[int, int, bytes, str], None] | None = None

    def advance(self, now: float) -> None:
        with self.lock:
            if self._time is not None:
                for servo in self.servos.values():
                    servo.advance(now - self._time)
            self._time = now

    def positions(self) -> dict[int, float]:
        """Present positions (homed ticks) by servo id."""
        with self.lock:
            return {servo_id: servo.position for servo_id, servo in self.servos.items()}

    def place(self, positions: dict[int, float]) -> None:
        """Move joints by hand; joints with torque enabled resist and stay under position control."""
        with self.lock:
            for servo_id, position in positions.items():
                servo = self.servos[servo_id]
                if not servo.torque_enabled:
                    servo.place(position)

    def teleport(self, positions: dict[int, float]) -> None:
        """Reset joints to positions regardless of torque (episode reset), holding them there."""
        with self.lock:
            for servo_id, position in positions.items():
                servo = self.servos[servo_id]
                servo.place(position)
                servo.set("Goal_Position", int(round(position)) % RESOLUTION)

    def handle(self, instruction: Instruction) -> list[bytes]:
        with self.lock:
            return self._apply_faults(self._dispatch(instruction))

    def _apply_faults(self, replies: list[bytes]) -> list[bytes]:
        delivered: list[bytes] = []
        for reply in replies:
            if self.faults.take_drop():
                continue
            if self.faults.take_garble():
                # A noise burst ends the batch: the host discards a corrupt packet and flushes its input,
                # and bytes still arriving after that flush (a pty delivers them late) would desync every
                # later read, which no real adapter does to lerobot.
                delivered.append(garble(reply))
                break
            delivered.append(reply)
        return delivered

    def _status(self, servo: Servo, params: bytes = b"") -> bytes:
        return status_packet(servo.servo_id, self.faults.error_bits.get(servo.servo_id, 0), params)

    def _targets(self, servo_id: int) -> list[Servo]:
        if servo_id == BROADCAST_ID:
            return list(self.servos.values())
        servo = self._by_id(servo_id)
        return [servo] if servo else []

    def _by_id(self, servo_id: int) -> Servo | None:
        # Ids are EPROM contents and can be rewritten (lerobot's setup_motor), so look them up live.
        return next((s for s in self.servos.values() if s.servo_id == servo_id), None)

    def _write(self, servo: Servo, address: int, data: bytes, via: str) -> None:
        servo_id = servo.servo_id  # before the write: it may rewrite the ID
        servo.write(address, data)
        if self.write_observer is not None:
            self.write_observer(servo_id, address, bytes(data), via)

    def _acknowledge(self, servo: Servo, broadcast: bool) -> list[bytes]:
        if broadcast or servo.get("Response_Status_Level") == 0:
            return []
        return [self._status(servo)]

    def _dispatch(self, ins: Instruction) -> list[bytes]:
        broadcast = ins.servo_id == BROADCAST_ID
        code, params = ins.code, ins.params
        if code == INST_PING:
            return [self._status(servo) for servo in self._targets(ins.servo_id)]
        if code == INST_READ and len(params) == 2 and not broadcast:
            return [self._status(s, s.read(params[0], params[1])) for s in self._targets(ins.servo_id)]
        if code == INST_WRITE and params:
            replies: list[bytes] = []
            for servo in self._targets(ins.servo_id):
                self._write(servo, params[0], params[1:], "write")
                replies += self._acknowledge(servo, broadcast)
            return replies
        if code == INST_REG_WRITE and params:
            replies = []
            for servo in self._targets(ins.servo_id):
                servo.pending_write = (params[0], bytes(params[1:]))
                replies += self._acknowledge(servo, broadcast)
            return replies
        if code == INST_ACTION:
            replies = []
            for servo in self._targets(ins.servo_id):
                if servo.pending_write is not None:
                    self._write(servo, *servo.pending_write, "action")
                    servo.pending_write = None
                replies += self._acknowledge(servo, broadcast)
            return replies
        if code == INST_SYNC_READ and len(params) >= 2:
            address, length = params[0], params[1]
            servos = [self._by_id(servo_id) for servo_id in params[2:]]
            return [self._status(s, s.read(address, length)) for s in servos if s is not None]
        if code == INST_SYNC_WRITE and len(params) >= 2:
            address, length = params[0], params[1]
            for start in range(2, len(params) - length, length + 1):
                servo = self._by_id(params[start])
                if servo is not None:
                    self._write(servo, address, params[start + 1 : start + 1 + length], "sync_write")
            return []
        return []  # unknown or malformed instruction: a real servo stays silent
