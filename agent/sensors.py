"""What the host reports about itself, for the training-lease guards (zk0.agent.idle).

`read_sensors` reads load, free disk, available memory, temperature and AC power from the kernel's own
files. Each reading is None when the host does not report it or the file cannot be read or parsed (a
container without /sys/class/thermal, a desktop without a power supply class): a missing reading never
refuses a lease, so it must never raise either. `host_timezone` is the zone of the host's local clock,
which the training hours are read in. `root` is where /proc, /sys and /etc are looked for, so tests parse
a fake tree of real files.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from datetime import datetime, tzinfo
from pathlib import Path
from zoneinfo import ZoneInfo

MB = 1024 * 1024


@dataclass(frozen=True)
class Sensors:
    """One reading of the host; None: not reported."""

    load_per_core: float | None = None  # 1-minute load average / online CPUs
    free_disk_mb: float | None = None  # free space where the agent keeps its state
    free_memory_mb: float | None = None  # the kernel's MemAvailable
    temperature_c: float | None = None  # the hottest thermal zone
    on_ac_power: bool | None = None  # None: no mains supply reported (a desktop, a Pi, a VM)


def _text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):  # sysfs attributes may fail with EIO/ENODATA when the device sleeps
        return None


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def online_cpus(text: str) -> int | None:
    """Count the CPUs of /sys/devices/system/cpu/online, a list of ranges such as "0-3,6,8-9"."""
    count = 0
    try:
        for part in text.split(","):
            low, dash, high = part.partition("-")
            first = int(low)
            last = int(high) if dash else first
            if last < first:
                return None
            count += last - first + 1
    except ValueError:
        return None
    return count or None


def load_per_core(root: Path) -> float | None:
    # /proc/loadavg is what os.getloadavg() reads on Linux; reading it ourselves lets tests point at a fake tree.
    loadavg, cpus = _text(root / "proc/loadavg"), _text(root / "sys/devices/system/cpu/online")
    if loadavg is None or cpus is None:
        return None
    count = online_cpus(cpus)
    try:
        load = float(loadavg.split()[0])
    except (ValueError, IndexError):
        return None
    return _finite(load / count) if count and load >= 0 else None


def free_disk_mb(path: Path) -> float | None:
    try:
        return shutil.disk_usage(path).free / MB
    except OSError:
        return None


def free_memory_mb(root: Path) -> float | None:
    # MemAvailable (not MemFree): what can be allocated without swapping, page cache included.
    text = _text(root / "proc/meminfo")
    for line in (text or "").splitlines():
        name, _, value = line.partition(":")
        if name == "MemAvailable":
            fields = value.split()
            try:
                kib = float(fields[0])
            except (ValueError, IndexError):
                return None
            return _finite(kib / 1024) if kib >= 0 else None
    return None


def _entries(folder: Path, pattern: str) -> list[Path]:
    try:
        return sorted(folder.glob(pattern))
    except OSError:
        return []


def temperature_c(root: Path) -> float | None:
    readings = []
    for zone in _entries(root / "sys/class/thermal", "thermal_zone*"):
        text = _text(zone / "temp")
        try:
            millidegrees = int(text or "")
        except ValueError:
            continue
        # Some drivers report -273200 or similar for a sensor that is off; nothing real is below -60 C here.
        if millidegrees > -60_000:
            readings.append(millidegrees / 1000)
    return max(readings) if readings else None


def on_ac_power(root: Path) -> bool | None:
    # A laptop's adapter is type Mains; batteries and USB peripherals' supplies say nothing about the wall.
    mains = []
    for supply in _entries(root / "sys/class/power_supply", "*"):
        if _text(supply / "type") == "Mains":
            online = _text(supply / "online")
            if online in ("0", "1"):
                mains.append(online == "1")
    return any(mains) if mains else None


def read_sensors(state_dir: str | Path, root: str | Path = "/") -> Sensors:
    """Read the host now. `state_dir`: the disk the agent writes to; `root`: where /proc and /sys are."""
    root = Path(root)
    return Sensors(
        load_per_core=load_per_core(root),
        free_disk_mb=free_disk_mb(Path(state_dir)),
        free_memory_mb=free_memory_mb(root),
        temperature_c=temperature_c(root),
        on_ac_power=on_ac_power(root),
    )


def host_timezone(root: str | Path = "/") -> tzinfo:
    """The host's time zone with its DST rules (/etc/localtime), so `datetime.now(host_timezone())` stays right
    across a DST change; without the file, today's fixed UTC offset (right until the next change)."""
    try:
        with open(Path(root) / "etc/localtime", "rb") as file:
            return ZoneInfo.from_file(file, key="localtime")
    except (OSError, ValueError):  # absent, or not a TZif file
        return datetime.now().astimezone().tzinfo  # type: ignore[return-value]  # always set by astimezone()
