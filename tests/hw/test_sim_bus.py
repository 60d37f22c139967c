"""The simulated STS3215 bus: protocol, control table, motion model, driven through Feetech's own SDK."""

from __future__ import annotations

import time

import pytest
import scservo_sdk as scs

from zk0.hw.sim.feetech import FeetechBus, Servo, step_toward
from zk0.hw.sim.feetech_protocol import (
    BROADCAST_ID,
    CONTROL_TABLE,
    ERRBIT_OVERHEAT,
    INST_ACTION,
    INST_PING,
    INST_REG_WRITE,
    MODEL_NUMBER,
    PacketParser,
    instruction_packet,
)
from zk0.hw.sim.pty_bus import LinkConfig, PtyBusServer
from tests.hw.conftest import ping_retrying

PRESENT = CONTROL_TABLE["Present_Position"][0]
GOAL = CONTROL_TABLE["Goal_Position"][0]
TORQUE = CONTROL_TABLE["Torque_Enable"][0]


def open_sdk(port: str) -> tuple[scs.PortHandler, scs.PacketHandler]:
    handler = scs.PortHandler(port)
    assert handler.openPort() and handler.setBaudRate(1_000_000)
    return handler, scs.PacketHandler(0)


def wait_for(predicate, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def instruction_packet_to(servo_id: int, code: int, params: bytes = b""):
    (packet,) = PacketParser().feed(instruction_packet(servo_id, code, params))
    return packet


def test_table_matches_lerobot():
    from lerobot.motors.feetech.tables import MODEL_CONTROL_TABLE, MODEL_NUMBER_TABLE

    assert CONTROL_TABLE == MODEL_CONTROL_TABLE["sts3215"]
    assert MODEL_NUMBER == MODEL_NUMBER_TABLE["sts3215"] == 777


def test_parser_skips_noise_and_bad_checksums():
    parser = PacketParser()
    good = instruction_packet(3, INST_PING)
    bad = bytearray(instruction_packet(4, INST_PING))
    bad[-1] ^= 0xFF
    packets = parser.feed(b"\x00\x13" + bytes(bad) + good[:3])
    assert packets == [] and parser.rejected == 1
    (packet,) = parser.feed(good[3:])
    assert (packet.servo_id, packet.code) == (3, INST_PING)


def test_homing_offset_is_sign_magnitude_and_shifts_present_position():
    servo = Servo(1, shaft=1000)
    servo.set("Homing_Offset", -300)
    address, _ = CONTROL_TABLE["Homing_Offset"]
    assert int.from_bytes(servo.read(address, 2), "little") == (1 << 11) | 300
    servo.place(servo.position)
    assert servo.get("Present_Position") == 1300  # present = shaft - offset


def test_goal_clamped_to_limits_and_reached_with_bounded_speed():
    servo = Servo(1, shaft=2047)
    servo.set("Max_Position_Limit", 2500)
    servo.write(TORQUE, b"\x01")
    servo.write(GOAL, (4000).to_bytes(2, "little"))
    servo.advance(0.05)
    assert 2047 < servo.position < 2047 + 3000 * 0.05 + 1
    for _ in range(100):
        servo.advance(0.01)
    assert servo.get("Present_Position") == 2500 and servo.get("Moving") == 0


def test_step_toward_never_overshoots():
    position, velocity = 0.0, 0.0
    for _ in range(1000):
        position, velocity = step_toward(position, velocity, 100.0, 3000.0, 25400.0, 0.001)
        assert position <= 100.0
    assert position == 100.0 and velocity == 0.0


def test_reg_write_applies_on_action():
    bus = FeetechBus([1, 2])
    bus.handle(instruction_packet_to(1, INST_REG_WRITE, bytes([TORQUE, 1])))
    assert not bus.servos[1].torque_enabled
    bus.handle(instruction_packet_to(BROADCAST_ID, INST_ACTION))
    assert bus.servos[1].torque_enabled and not bus.servos[2].torque_enabled


def test_sdk_pings_reads_sync_reads_and_moves_in_process():
    bus = FeetechBus([1, 2, 3, 4, 5, 6])
    with PtyBusServer(bus) as server:
        port, packet = open_sdk(server.port)
        for servo_id in range(1, 7):
            assert packet.ping(port, servo_id)[:2] == (MODEL_NUMBER, scs.COMM_SUCCESS)
        assert packet.ping(port, 9)[1] == scs.COMM_RX_TIMEOUT
        reader = scs.GroupSyncRead(port, packet, PRESENT, 2)
        for servo_id in range(1, 7):
            reader.addParam(servo_id)
        assert reader.txRxPacket() == scs.COMM_SUCCESS
        assert [reader.getData(i, PRESENT, 2) for i in range(1, 7)] == [2048] * 6

        writer = scs.GroupSyncWrite(port, packet, GOAL, 2)
        for servo_id in range(1, 7):
            packet.write1ByteTxRx(port, servo_id, TORQUE, 1)
            writer.addParam(servo_id, [scs.SCS_LOBYTE(1500), scs.SCS_HIBYTE(1500)])
        assert writer.txPacket() == scs.COMM_SUCCESS
        assert wait_for(lambda: packet.read2ByteTxRx(port, 6, PRESENT)[0] == 1500)
        port.closePort()


def test_status_error_bits_reported():
    bus = FeetechBus([1])
    bus.faults.error_bits[1] = ERRBIT_OVERHEAT
    with PtyBusServer(bus) as server:
        port, packet = open_sdk(server.port)
        _, result, error = packet.read2ByteTxRx(port, 1, PRESENT)
        assert result == scs.COMM_SUCCESS and error & ERRBIT_OVERHEAT
        assert "Overheat" in packet.getRxPacketError(error)
        port.closePort()


@pytest.mark.parametrize("fault", ["drop_next", "garble_next"])
def test_faulty_reply_surfaces_as_sdk_error_then_recovers(fault):
    bus = FeetechBus([1])
    setattr(bus.faults, fault, 1)
    with PtyBusServer(bus) as server:
        port, packet = open_sdk(server.port)
        expected = scs.COMM_RX_TIMEOUT if fault == "drop_next" else scs.COMM_RX_CORRUPT
        assert packet.read2ByteTxRx(port, 1, PRESENT)[1] == expected
        assert packet.read2ByteTxRx(port, 1, PRESENT)[1] == scs.COMM_SUCCESS
        port.closePort()


def test_reply_paced_at_baudrate():
    bus = FeetechBus([1])
    with PtyBusServer(bus, LinkConfig(baudrate=9_600)) as server:
        port, packet = open_sdk(server.port)
        started = time.perf_counter()
        assert packet.read2ByteTxRx(port, 1, PRESENT)[1] == scs.COMM_SUCCESS
        # an 8-byte status at 9600 baud takes 8.3 ms on the wire
        assert time.perf_counter() - started >= 8 * 10 / 9_600
        port.closePort()


def test_external_program_drives_sim_arm_process(sim_arm):
    """Done-when: an outside program opens `zk0 sim arm --print-port` with the SDK and moves joint 1."""
    port, packet = open_sdk(sim_arm("follower"))
    for servo_id in range(1, 7):
        assert ping_retrying(packet, port, servo_id) == (777, scs.COMM_SUCCESS, 0)
    start = packet.read2ByteTxRx(port, 1, PRESENT)[0]
    assert packet.write1ByteTxRx(port, 1, TORQUE, 1) == (scs.COMM_SUCCESS, 0)
    assert packet.write2ByteTxRx(port, 1, GOAL, start + 600) == (scs.COMM_SUCCESS, 0)
    assert wait_for(lambda: packet.read2ByteTxRx(port, 1, PRESENT)[0] >= start + 590)
    port.closePort()
