"""Host sensors: parsed from a fake /proc and /sys tree of real files; anything absent or garbled is None."""

from __future__ import annotations

import dataclasses
import os
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from zk0.agent.sensors import Sensors, host_timezone, online_cpus, read_sensors


def write(root: Path, relative: str, text: str | bytes) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)


def supply(root: Path, name: str, kind: str, online: str | None) -> None:
    write(root, f"sys/class/power_supply/{name}/type", f"{kind}\n")
    if online is not None:
        write(root, f"sys/class/power_supply/{name}/online", f"{online}\n")


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """A laptop's kernel files: 2 of 4 CPUs' worth of load, 2000 MB available, 71.5 C, on AC."""
    root = tmp_path / "root"
    write(root, "proc/loadavg", "3.00 2.50 2.00 3/512 12345\n")
    write(root, "sys/devices/system/cpu/online", "0-1\n")
    write(root, "proc/meminfo", "MemTotal:       16000000 kB\nMemFree:          300000 kB\n"
                                "MemAvailable:    2048000 kB\nBuffers:          100000 kB\n")
    write(root, "sys/class/thermal/thermal_zone0/temp", "45000\n")
    write(root, "sys/class/thermal/thermal_zone1/temp", "71500\n")
    write(root, "sys/class/thermal/thermal_zone2/temp", "garbage\n")
    write(root, "sys/class/thermal/thermal_zone3/temp", "-273200\n")  # a sensor that is switched off
    (root / "sys/class/thermal/thermal_zone4").mkdir()  # no temp attribute
    (root / "sys/class/thermal/thermal_zone5/temp").mkdir(parents=True)  # unreadable as a file
    write(root, "sys/class/thermal/cooling_device0/cur_state", "0\n")
    supply(root, "BAT0", "Battery", None)
    supply(root, "AC", "Mains", "1")
    return root


def test_a_full_host(host: Path, tmp_path: Path) -> None:
    sensors = read_sensors(tmp_path, root=host)
    assert sensors.load_per_core == 1.5 and sensors.free_memory_mb == 2000.0
    assert sensors.temperature_c == 71.5 and sensors.on_ac_power is True
    assert sensors.free_disk_mb is not None and sensors.free_disk_mb > 0


def test_an_empty_tree_reports_nothing_but_disk(tmp_path: Path) -> None:
    sensors = read_sensors(tmp_path, root=tmp_path / "nothing")
    assert sensors.free_disk_mb is not None and dataclasses.replace(sensors, free_disk_mb=None) == Sensors()
    assert read_sensors(tmp_path / "missing", root=tmp_path / "nothing") == Sensors()


@pytest.mark.parametrize(("supplies", "on_ac"), [
    ([("AC", "Mains", "0"), ("BAT0", "Battery", "1")], False),  # unplugged laptop
    ([("ADP0", "Mains", "0"), ("ADP1", "Mains", "1")], True),  # any mains adapter online
    ([("BAT0", "Battery", None)], None),  # a battery says nothing about the wall
    ([("ucsi-source-psy-1", "USB", "1")], None),  # only type Mains counts
    ([("AC", "Mains", "maybe")], None),
    ([("AC", "Mains", None)], None),
])
def test_ac_power(tmp_path: Path, supplies: list, on_ac: bool | None) -> None:
    for name, kind, online in supplies:
        supply(tmp_path, name, kind, online)
    assert read_sensors(tmp_path, root=tmp_path).on_ac_power is on_ac


@pytest.mark.parametrize(("loadavg", "online", "per_core"), [
    ("0.50 0.40 0.30 1/100 7", "0", 0.5),
    ("7.00 1 1 1/1 1", "0-3,6,8-9", 1.0),
    ("garbage", "0-1", None),
    ("", "0-1", None),
    ("1.0 1.0 1.0 1/1 1", "3-1", None),
    ("1.0 1.0 1.0 1/1 1", "x", None),
    ("nan 1 1 1/1 1", "0-1", None),
    ("-1 1 1 1/1 1", "0-1", None),
])
def test_load_per_core(tmp_path: Path, loadavg: str, online: str, per_core: float | None) -> None:
    write(tmp_path, "proc/loadavg", loadavg)
    write(tmp_path, "sys/devices/system/cpu/online", online)
    assert read_sensors(tmp_path, root=tmp_path).load_per_core == per_core


def test_online_cpus() -> None:
    assert online_cpus("0-15") == 16 and online_cpus("0,2,4-5") == 4
    assert online_cpus("") is None and online_cpus("1-") is None


@pytest.mark.parametrize(("meminfo", "megabytes"), [
    ("MemTotal: 1000 kB\nMemAvailable:   524288 kB\n", 512.0),
    ("MemTotal: 1000 kB\nMemFree: 1000 kB\n", None),  # kernels before 3.14 have no MemAvailable
    ("MemAvailable: lots\n", None),
    ("MemAvailable:\n", None),
    (b"\xff\xfe binary", None),
])
def test_available_memory(tmp_path: Path, meminfo: str | bytes, megabytes: float | None) -> None:
    write(tmp_path, "proc/meminfo", meminfo)
    assert read_sensors(tmp_path, root=tmp_path).free_memory_mb == megabytes


def test_the_real_host_never_raises(tmp_path: Path) -> None:
    sensors = read_sensors(tmp_path)
    for name in ("load_per_core", "free_disk_mb", "free_memory_mb", "temperature_c"):
        assert getattr(sensors, name) is None or isinstance(getattr(sensors, name), float)
    assert sensors.on_ac_power in (None, True, False)
    if os.path.exists("/proc/meminfo"):
        assert sensors.free_memory_mb is not None
    if os.path.exists("/proc/loadavg") and os.path.exists("/sys/devices/system/cpu/online"):
        assert sensors.load_per_core is not None


def test_host_timezone_follows_dst(tmp_path: Path) -> None:
    import tzdata

    berlin = Path(tzdata.__file__).parent / "zoneinfo/Europe/Berlin"
    write(tmp_path, "etc/localtime", berlin.read_bytes())
    zone = host_timezone(tmp_path)
    assert datetime(2026, 1, 15, 12, tzinfo=zone).utcoffset() == timedelta(hours=1)
    assert datetime(2026, 7, 15, 12, tzinfo=zone).utcoffset() == timedelta(hours=2)


@pytest.mark.parametrize("localtime", [None, b"not a TZif file"])
def test_host_timezone_falls_back_to_the_current_offset(tmp_path: Path, localtime: bytes | None) -> None:
    if localtime is not None:
        write(tmp_path, "etc/localtime", localtime)
    zone = host_timezone(tmp_path)
    assert datetime.now(zone).utcoffset() == datetime.now().astimezone().utcoffset()
