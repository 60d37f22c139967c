"""Idle windows: whether the agent grants (or renews) a training lease now, and for how long.

`lease_decision` is pure: the same settings, activity, clock reading and sensor reading always give the same
verdict. The daemon calls it for every lease request and every renewal (agent/lease.py); refusing a renewal
is how a lease is revoked. A lease is granted only when

- the agent is idle, or already training (a renewal): never while it records, rolls out, validates, is in
  fault or emergency-stopped;
- the operator has been quiet for `quiet_time_s`;
- the host's local time is inside the training hours of its weekday (windows may cross midnight);
- every resource guard holds that the host reports (a reading that is None never refuses; NaN is not a
  reading either); load only before a grant, since training itself loads every core.

A grant lasts at most `lease_ttl_s` and never past the end of the training hours, so a lease left unrenewed
ends with the window. Training hours are local wall-clock times; all arithmetic is done in UTC so a daylight
saving change never lengthens or shortens a lease.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import Any

from zk0.agent.lease import MAX_TTL_S
from zk0.agent.sensors import Sensors

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # date.weekday() order
DAILY = "daily"  # the windows of every weekday the mapping does not name
DAY_MIN = 24 * 60

GRANTABLE_STATES = frozenset({"idle", "training"})
# Why each other state refuses; the reason travels to the node and into the server's round report.
BUSY_REASONS = {
    "recording": "recording in progress",
    "rollout": "rollout in progress",
    "validating": "validation in progress",
    "fault": "the agent is in fault",
    "estopped": "emergency stop engaged",
}

# A window as minutes after the midnight that starts its day; an end past DAY_MIN crosses into the next day.
Window = tuple[int, int]


def _default_hours() -> dict[str, list[str]]:
    # All day, every day: recording or rollout revokes a lease within a second (issue #14's preemption
    # target) and the quiet time keeps training away from an operator at work, so narrower hours would
    # only leave the machine idle. Hosts with loud fans or shared desks set nights, e.g. daily: [22:00-07:00].
    return {DAILY: ["00:00-24:00"]}


def _minutes(text: str, allow_24: bool) -> int:
    hours, sep, minutes = text.partition(":")
    if not (sep and len(hours) == 2 and len(minutes) == 2 and hours.isdigit() and minutes.isdigit()):
        raise ValueError
    value = int(hours) * 60 + int(minutes)
    if int(minutes) > 59 or value > DAY_MIN or (value == DAY_MIN and not allow_24):
        raise ValueError
    return value


def parse_window(text: object, key: str) -> Window:
    """'HH:MM-HH:MM' as minutes; an end at or before the start crosses midnight ('22:00-06:00'),
    '24:00' ends at the next midnight. Raises ValueError naming `key`."""
    wanted = f'{key}: expected "HH:MM-HH:MM" (24:00 may end a window), got {text!r}'
    if not isinstance(text, str):
        raise ValueError(wanted)
    start_text, _, end_text = text.partition("-")
    try:
        start, end = _minutes(start_text.strip(), allow_24=False), _minutes(end_text.strip(), allow_24=True)
    except ValueError:
        raise ValueError(wanted) from None
    if start == end:
        raise ValueError(f"{key}: an empty window {text!r} (a whole day is 00:00-24:00)")
    return (start, end if end > start else end + DAY_MIN)


def weekly_windows(hours: Mapping[str, Any]) -> tuple[tuple[Window, ...], ...]:
    """Each weekday's windows (Monday first) from a `training_hours` mapping; raises ValueError naming the key."""
    if not isinstance(hours, Mapping):
        raise ValueError("training_hours: expected a mapping of weekday (mon..sun, daily) to windows")
    parsed: dict[str, tuple[Window, ...]] = {}
    for day, windows in hours.items():
        key = f"training_hours.{day}"
        if day not in WEEKDAYS and day != DAILY:
            raise ValueError(f"{key}: unknown weekday (expected one of: {', '.join(WEEKDAYS)}, {DAILY})")
        if isinstance(windows, str):
            windows = [windows]
        if not isinstance(windows, list):
            raise ValueError(f'{key}: expected a list of "HH:MM-HH:MM" windows, got {type(windows).__name__}')
        parsed[day] = tuple(parse_window(window, f"{key}[{i}]") for i, window in enumerate(windows))
    return tuple(parsed.get(day, parsed.get(DAILY, ())) for day in WEEKDAYS)


def _check_number(name: str, value: object, low: float, high: float = math.inf, *, optional: bool = True,
                  low_open: bool = False) -> None:
    if value is None and optional:
        return
    # bool is an int to Python, never a limit
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not (number and (low < value if low_open else low <= value) and value <= high):
        bounds = f"in {'(' if low_open else '['}{low:g}, {high:g}]" if math.isfinite(high) else f">= {low:g}"
        raise ValueError(f"{name}: must be a number {bounds}{' or null' if optional else ''}, got {value!r}")


@dataclass(frozen=True)
class IdleSettings:
    """When this host lends itself to federated training (the `idle:` section of the agent config)."""

    # Weekday (mon..sun; `daily` for every day not named) -> local "HH:MM-HH:MM" windows. A window belongs
    # to the day it starts on, so `fri: [22:00-06:00]` runs into Saturday morning. A day without windows
    # (not named, no `daily`, or an empty list) has no training hours.
    training_hours: dict[str, list[str]] = field(default_factory=_default_hours)
    quiet_time_s: float = 300.0  # since the operator's last action: a pause this long means they stepped away
    # Resource guards; null switches one off. Load is checked before a lease is granted, not on renewal:
    # training itself keeps about one runnable thread per core, which must not revoke its own lease.
    max_load_per_core: float | None = 1.5  # 1-minute load average / CPUs
    min_free_disk_mb: int | None = 2048  # where the agent writes (datasets, received policies)
    min_free_memory_mb: int | None = 1024  # MemAvailable
    max_temperature_c: float | None = 85.0  # hottest thermal zone (where SBCs such as the Pi 5 throttle)
    require_ac_power: bool = True  # refuse on battery (only hosts that report a mains supply)
    lease_ttl_s: float = 60.0  # longest grant: how long a lease outlives an agent that stopped answering

    def __post_init__(self) -> None:
        weekly_windows(self.training_hours)
        _check_number("quiet_time_s", self.quiet_time_s, 0, optional=False)
        _check_number("max_load_per_core", self.max_load_per_core, 0)
        _check_number("min_free_disk_mb", self.min_free_disk_mb, 0)
        _check_number("min_free_memory_mb", self.min_free_memory_mb, 0)
        _check_number("max_temperature_c", self.max_temperature_c, -273.15)
        if not isinstance(self.require_ac_power, bool):
            raise ValueError(f"require_ac_power: must be true or false, got {self.require_ac_power!r}")
        _check_number("lease_ttl_s", self.lease_ttl_s, 0, MAX_TTL_S, optional=False, low_open=True)


@dataclass(frozen=True)
class Activity:
    """What the agent is doing: its state machine's state, and when the operator last acted (None: never)."""

    state: str
    last_operator_activity: datetime | None = None

    def __post_init__(self) -> None:
        last = self.last_operator_activity
        if last is not None and (last.tzinfo is None or last.utcoffset() is None):
            raise ValueError("last_operator_activity: must be a timezone-aware datetime")


@dataclass(frozen=True)
class LeaseVerdict:
    granted: bool
    reason: str  # a refusal's causes, "; "-joined; a grant says until when
    ttl_s: float  # 0 for a refusal


def _utc(day: date, minute: int, now: datetime) -> datetime:
    # Wall-clock arithmetic on a naive datetime, then the host's zone: "06:00" is 06:00 local on either
    # side of a DST change (an imaginary or repeated time takes the offset of fold=0, i.e. the earlier one).
    wall = datetime(day.year, day.month, day.day) + timedelta(minutes=minute)
    return wall.replace(tzinfo=now.tzinfo).astimezone(timezone.utc)


def _spans(weekly: tuple[tuple[Window, ...], ...], now: datetime) -> list[tuple[datetime, datetime]]:
    """The training hours from yesterday (its windows may run past midnight) to a week ahead, in UTC, with
    overlapping and touching windows merged, so `mon: [20:00-24:00], tue: [00:00-02:00]` is one span."""
    today = now.date()
    spans = []
    for offset in range(-1, 8):
        day = today + timedelta(days=offset)
        for start, end in weekly[day.weekday()]:
            first, last = _utc(day, start, now), _utc(day, end, now)
            if last > first:  # a window inside a spring-forward gap has no duration
                spans.append((first, last))
    merged: list[tuple[datetime, datetime]] = []
    for first, last in sorted(spans):
        if merged and first <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return merged


def _local(moment: datetime, now: datetime) -> str:
    local = moment.astimezone(now.tzinfo)
    return f"{WEEKDAYS[local.weekday()]} {local:%H:%M}"


def _hours(settings: IdleSettings, now: datetime) -> tuple[datetime | None, str]:
    """(end of the training hours now is in, "") or (None, why not)."""
    instant = now.astimezone(timezone.utc)
    spans = _spans(weekly_windows(settings.training_hours), now)
    for first, last in spans:
        if first <= instant < last:
            return last, ""
    upcoming = [first for first, _ in spans if first > instant]
    when = f"next window opens {_local(upcoming[0], now)}" if upcoming else "none in the next 7 days"
    return None, f"outside training hours ({when})"


def _past(reading: float | None, limit: float | None, above: bool) -> bool:
    # A comparison with NaN is False, so a NaN reading never refuses, like a missing one.
    if reading is None or limit is None:
        return False
    return reading > limit if above else reading < limit


def _guards(settings: IdleSettings, sensors: Sensors, renewal: bool) -> list[str]:
    # Readings print with :g so a reading just past its limit never looks equal to it (1.505, not 1.50).
    refusals = []
    if not renewal and _past(sensors.load_per_core, settings.max_load_per_core, above=True):
        refusals.append(f"load {sensors.load_per_core:g} per core above max_load_per_core "
                        f"{settings.max_load_per_core:g}")
    if _past(sensors.free_disk_mb, settings.min_free_disk_mb, above=False):
        refusals.append(f"free disk {sensors.free_disk_mb:g} MB below min_free_disk_mb {settings.min_free_disk_mb}")
    if _past(sensors.free_memory_mb, settings.min_free_memory_mb, above=False):
        refusals.append(f"free memory {sensors.free_memory_mb:g} MB below min_free_memory_mb "
                        f"{settings.min_free_memory_mb}")
    if _past(sensors.temperature_c, settings.max_temperature_c, above=True):
        refusals.append(f"temperature {sensors.temperature_c:g} C above max_temperature_c "
                        f"{settings.max_temperature_c:g}")
    if settings.require_ac_power and sensors.on_ac_power is False:
        refusals.append("on battery power (require_ac_power)")
    return refusals


def lease_decision(settings: IdleSettings, activity: Activity, now: datetime, sensors: Sensors) -> LeaseVerdict:
    """Grant or refuse a training lease (or its renewal: `activity.state == "training"`) at `now`, an aware
    datetime in the host's zone (`datetime.now(zk0.agent.sensors.host_timezone())`). A refusal gives every
    reason at once, so an operator asking why the host does not train learns all of it. The daemon grants
    min(the request's ttl_s, verdict.ttl_s)."""
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now: must be a timezone-aware datetime (the host's local time)")
    refusals = []
    if activity.state not in GRANTABLE_STATES:
        refusals.append(BUSY_REASONS.get(activity.state, f"agent state {activity.state!r} grants no lease"))
    last = activity.last_operator_activity
    if last is not None and settings.quiet_time_s > 0:
        quiet_s = (now.astimezone(timezone.utc) - last.astimezone(timezone.utc)).total_seconds()
        if quiet_s < settings.quiet_time_s:
            # whole seconds rounded down, so "299 s ago" never reads as the 300 s quiet time
            refusals.append(f"operator active {int(max(quiet_s, 0))} s ago (quiet_time_s {settings.quiet_time_s:g})")
    end, outside = _hours(settings, now)
    if outside:
        refusals.append(outside)
    refusals += _guards(settings, sensors, renewal=activity.state == "training")
    if refusals or end is None:
        return LeaseVerdict(False, "; ".join(refusals), 0.0)
    remaining_s = (end - now.astimezone(timezone.utc)).total_seconds()
    return LeaseVerdict(True, f"training hours until {_local(end, now)}", min(settings.lease_ttl_s, remaining_s))
