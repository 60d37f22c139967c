"""Idle windows: the lease decision as a table with the design's numbers, and properties over random inputs."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import assume, event, given, settings as hyp_settings, strategies as st

from zk0.agent.idle import (
    BUSY_REASONS,
    DAILY,
    WEEKDAYS,
    Activity,
    IdleSettings,
    LeaseVerdict,
    lease_decision,
    parse_window,
    weekly_windows,
)
from zk0.agent.lease import MAX_TTL_S
from zk0.agent.sensors import Sensors

BERLIN = ZoneInfo("Europe/Berlin")
DEFAULTS = IdleSettings()  # all day; quiet 300 s; load 1.5/core; disk 2048 MB; memory 1024 MB; 85 C; AC; ttl 60 s
NIGHTS = IdleSettings(training_hours={DAILY: ["22:00-06:00"]})
FRIDAY_EVENING = IdleSettings(training_hours={"fri": ["18:00-02:00"]})
ACROSS_MIDNIGHT = IdleSettings(training_hours={"mon": ["20:00-24:00"], "tue": ["00:00-00:30"]}, lease_ttl_s=3600)
NO_SUNDAY = IdleSettings(training_hours={DAILY: ["00:00-24:00"], "sun": []})
GOOD = Sensors(load_per_core=0.5, free_disk_mb=10_000, free_memory_mb=4_000, temperature_c=50.0, on_ac_power=True)
IDLE = Activity("idle")


def at(day: str, clock: str, tz=BERLIN, fold: int = 0) -> datetime:
    """A local time in the week of Monday 2026-11-30 (no DST change that week)."""
    hours, minutes, *seconds = (int(part) for part in clock.split(":"))
    day_start = datetime(2026, 11, 30) + timedelta(days=WEEKDAYS.index(day))
    return day_start.replace(hour=hours, minute=minutes, second=seconds[0] if seconds else 0, tzinfo=tz, fold=fold)


def operator(seconds_ago: float, now: datetime, state: str = "idle") -> Activity:
    return Activity(state, now - timedelta(seconds=seconds_ago))


MON_NOON = at("mon", "12:00")

# (settings, activity, now, sensors, granted, reason contains, ttl_s)
CASES = {
    "idle, all guards hold": (DEFAULTS, IDLE, MON_NOON, GOOD, True, "training hours until", 60.0),
    "renewal while training": (DEFAULTS, Activity("training"), MON_NOON, GOOD, True, "", 60.0),
    "recording": (DEFAULTS, Activity("recording"), MON_NOON, GOOD, False, "recording in progress", 0.0),
    "rollout": (DEFAULTS, Activity("rollout"), MON_NOON, GOOD, False, "rollout in progress", 0.0),
    "validating": (DEFAULTS, Activity("validating"), MON_NOON, GOOD, False, "validation in progress", 0.0),
    "fault": (DEFAULTS, Activity("fault"), MON_NOON, GOOD, False, "the agent is in fault", 0.0),
    "estopped": (DEFAULTS, Activity("estopped"), MON_NOON, GOOD, False, "emergency stop engaged", 0.0),
    "unknown state": (DEFAULTS, Activity("dancing"), MON_NOON, GOOD, False, "agent state 'dancing' grants no", 0.0),
    "operator 299 s ago": (DEFAULTS, operator(299, MON_NOON), MON_NOON, GOOD, False,
                           "operator active 299 s ago (quiet_time_s 300)", 0.0),
    "operator 299.9 s ago": (DEFAULTS, operator(299.9, MON_NOON), MON_NOON, GOOD, False, "operator active 299 s ago",
                             0.0),
    "operator 300 s ago": (DEFAULTS, operator(300, MON_NOON), MON_NOON, GOOD, True, "", 60.0),
    "operator active in the future": (DEFAULTS, operator(-30, MON_NOON), MON_NOON, GOOD, False,
                                      "operator active 0 s ago", 0.0),
    "operator timestamp in UTC": (DEFAULTS, Activity("idle", datetime(2026, 11, 30, 10, 56, tzinfo=timezone.utc)),
                                  MON_NOON, GOOD, False, "operator active 240 s ago", 0.0),
    "no quiet time": (dataclasses.replace(DEFAULTS, quiet_time_s=0), operator(1, MON_NOON), MON_NOON, GOOD, True, "",
                      60.0),
    "load 1.51 per core": (DEFAULTS, IDLE, MON_NOON, dataclasses.replace(GOOD, load_per_core=1.51), False,
                           "load 1.51 per core above max_load_per_core 1.5", 0.0),
    "load 1.505 per core": (DEFAULTS, IDLE, MON_NOON, dataclasses.replace(GOOD, load_per_core=1.505), False,
                            "load 1.505 per core above max_load_per_core 1.5", 0.0),
    "load 1.5 per core": (DEFAULTS, IDLE, MON_NOON, dataclasses.replace(GOOD, load_per_core=1.5), True, "", 60.0),
    "load ignored on renewal": (DEFAULTS, Activity("training"), MON_NOON,
                                dataclasses.replace(GOOD, load_per_core=3.0), True, "", 60.0),
    "load guard off": (dataclasses.replace(DEFAULTS, max_load_per_core=None), IDLE, MON_NOON,
                       dataclasses.replace(GOOD, load_per_core=100.0), True, "", 60.0),
    "disk 2047 MB": (DEFAULTS, IDLE, MON_NOON, dataclasses.replace(GOOD, free_disk_mb=2047), False,
                     "free disk 2047 MB below min_free_disk_mb 2048", 0.0),
    "disk 2047.5 MB": (DEFAULTS, IDLE, MON_NOON, dataclasses.replace(GOOD, free_disk_mb=2047.5), False,
                       "free disk 2047.5 MB below min_free_disk_mb 2048", 0.0),
    "disk 2048 MB": (DEFAULTS, IDLE, MON_NOON, dataclasses.replace(GOOD, free_disk_mb=2048), True, "", 60.0),
    "disk low on renewal": (DEFAULTS, Activity("training"), MON_NOON, dataclasses.replace(GOOD, free_disk_mb=100),
                            False, "free disk 100 MB below min_free_disk_mb 2048", 0.0),
    "memory 1023 MB": (DEFAULTS, IDLE, MON_NOON, dataclasses.replace(GOOD, free_memory_mb=1023), False,
                       "free memory 1023 MB below min_free_memory_mb 1024", 0.0),
    "temperature 85.1 C": (DEFAULTS, Activity("training"), MON_NOON, dataclasses.replace(GOOD, temperature_c=85.1),
                           False, "temperature 85.1 C above max_temperature_c 85", 0.0),
    "temperature 85.0 C": (DEFAULTS, IDLE, MON_NOON, dataclasses.replace(GOOD, temperature_c=85.0), True, "", 60.0),
    "on battery": (DEFAULTS, IDLE, MON_NOON, dataclasses.replace(GOOD, on_ac_power=False), False,
                   "on battery power (require_ac_power)", 0.0),
    "on battery allowed": (dataclasses.replace(DEFAULTS, require_ac_power=False), IDLE, MON_NOON,
                           dataclasses.replace(GOOD, on_ac_power=False), True, "", 60.0),
    "no sensors at all": (DEFAULTS, IDLE, MON_NOON, Sensors(), True, "", 60.0),
    "NaN readings are no readings": (DEFAULTS, IDLE, MON_NOON, Sensors(*[float("nan")] * 4), True, "", 60.0),
    "every reason at once": (DEFAULTS, operator(10, MON_NOON, "recording"), MON_NOON,
                             Sensors(2.0, 1.0, 1.0, 90.0, False), False,
                             "recording in progress; operator active 10 s ago (quiet_time_s 300); load 2 per core above "
                             "max_load_per_core 1.5; free disk 1 MB below min_free_disk_mb 2048; free memory 1 MB below "
                             "min_free_memory_mb 1024; temperature 90 C above max_temperature_c 85; on battery power "
                             "(require_ac_power)", 0.0),
    # Nights, every day 22:00-06:00: start inclusive, end exclusive, ttl clipped at the end.
    "nights: 21:59:59": (NIGHTS, IDLE, at("mon", "21:59:59"), GOOD, False,
                         "outside training hours (next window opens mon 22:00)", 0.0),
    "nights: 22:00 opens": (NIGHTS, IDLE, at("mon", "22:00"), GOOD, True, "training hours until tue 06:00", 60.0),
    "nights: past midnight": (NIGHTS, IDLE, at("tue", "03:00"), GOOD, True, "until tue 06:00", 60.0),
    "nights: ttl clipped at 06:00": (NIGHTS, IDLE, at("tue", "05:59:30"), GOOD, True, "until tue 06:00", 30.0),
    "nights: 06:00 closes": (NIGHTS, IDLE, at("tue", "06:00"), GOOD, False, "next window opens tue 22:00", 0.0),
    "nights: outside hours and busy": (NIGHTS, Activity("rollout"), at("tue", "12:00"), GOOD, False,
                                       "rollout in progress; outside training hours", 0.0),
    # A window belongs to the weekday it starts on.
    "friday's window on saturday": (FRIDAY_EVENING, IDLE, at("sat", "01:00"), GOOD, True, "until sat 02:00", 60.0),
    "friday's window ends saturday": (FRIDAY_EVENING, IDLE, at("sat", "01:59:45"), GOOD, True, "", 15.0),
    "saturday evening is not friday": (FRIDAY_EVENING, IDLE, at("sat", "18:00"), GOOD, False,
                                       "next window opens fri 18:00", 0.0),
    "thursday night waits for friday": (FRIDAY_EVENING, IDLE, at("thu", "23:00"), GOOD, False,
                                        "next window opens fri 18:00", 0.0),
    "monday 01:00 is outside": (FRIDAY_EVENING, IDLE, at("mon", "01:00"), GOOD, False, "opens fri 18:00", 0.0),
    # Touching windows of two weekdays are one span: the ttl runs to 00:30, not to midnight.
    "windows merge across midnight": (ACROSS_MIDNIGHT, IDLE, at("mon", "23:50"), GOOD, True, "until tue 00:30",
                                      2400.0),
    "merged window, cap applies": (ACROSS_MIDNIGHT, IDLE, at("mon", "21:00"), GOOD, True, "until tue 00:30", 3600.0),
    "an empty day": (NO_SUNDAY, IDLE, at("sun", "12:00"), GOOD, False, "next window opens mon 00:00", 0.0),
    "saturday runs to sunday 00:00": (NO_SUNDAY, IDLE, at("sat", "23:59:50"), GOOD, True, "until sun 00:00", 10.0),
    "no training hours": (IdleSettings(training_hours={}), IDLE, MON_NOON, GOOD, False,
                          "outside training hours (none in the next 7 days)", 0.0),
    "a fixed UTC offset": (NIGHTS, IDLE, at("tue", "05:59", tz=timezone(timedelta(hours=-5))), GOOD, True,
                           "until tue 06:00", 60.0),
    # DST (Europe/Berlin): 2026-03-29 02:00 CET -> 03:00 CEST; 2026-10-25 03:00 CEST -> 02:00 CET.
    "spring forward: an hour shorter": (IdleSettings(training_hours={"sun": ["00:00-03:30"]}, lease_ttl_s=3600), IDLE,
                                        datetime(2026, 3, 29, 1, 45, tzinfo=BERLIN), GOOD, True, "until sun 03:30",
                                        2700.0),
    "fall back: the repeated 02:15 is past 02:30": (IdleSettings(training_hours={"sun": ["00:00-02:30"]}), IDLE,
                                                    datetime(2026, 10, 25, 2, 15, fold=1, tzinfo=BERLIN), GOOD, False,
                                                    "outside training hours", 0.0),
    "fall back: the first 02:15": (IdleSettings(training_hours={"sun": ["00:00-02:30"]}, lease_ttl_s=3600), IDLE,
                                   datetime(2026, 10, 25, 2, 15, fold=0, tzinfo=BERLIN), GOOD, True, "", 900.0),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_lease_decision_table(case) -> None:
    settings, activity, now, sensors, granted, reason, ttl_s = case
    verdict = lease_decision(settings, activity, now, sensors)
    assert verdict.granted is granted and verdict.ttl_s == pytest.approx(ttl_s, abs=1e-6)
    assert reason in verdict.reason and verdict.reason
    if not granted:
        assert verdict.ttl_s == 0.0


def test_every_busy_state_refuses_with_its_reason() -> None:
    for state, reason in BUSY_REASONS.items():
        assert lease_decision(DEFAULTS, Activity(state), MON_NOON, GOOD) == LeaseVerdict(False, reason, 0.0)


def test_naive_times_are_refused() -> None:
    with pytest.raises(ValueError, match="now: must be a timezone-aware"):
        lease_decision(DEFAULTS, IDLE, datetime(2026, 11, 30, 12), GOOD)
    with pytest.raises(ValueError, match="last_operator_activity: must be a timezone-aware"):
        Activity("idle", datetime(2026, 11, 30, 12))


@pytest.mark.parametrize(("text", "window"), [
    ("22:00-06:00", (1320, 1800)), ("00:00-24:00", (0, 1440)), (" 08:30 - 17:00 ", (510, 1020)),
    ("23:59-00:00", (1439, 1440)), ("12:00-11:59", (720, 2159)),
])
def test_parse_window(text: str, window: tuple[int, int]) -> None:
    assert parse_window(text, "w") == window


def test_daily_fills_the_days_not_named() -> None:
    weekly = weekly_windows({DAILY: ["22:00-06:00"], "sat": ["00:00-24:00"], "sun": []})
    assert weekly[:5] == ((((1320, 1800),),) * 5) and weekly[5] == ((0, 1440),) and weekly[6] == ()
    assert weekly_windows({"mon": "09:00-17:00"})[0] == ((540, 1020),) and weekly_windows({})[0] == ()


@pytest.mark.parametrize(("changes", "message"), [
    ({"training_hours": {"funday": ["10:00-12:00"]}}, "training_hours.funday: unknown weekday (expected one of: mon"),
    ({"training_hours": {"mon": ["25:00-26:00"]}}, 'training_hours.mon[0]: expected "HH:MM-HH:MM"'),
    ({"training_hours": {"mon": ["09:00-17:00", "10:60-11:00"]}}, "training_hours.mon[1]: expected"),
    ({"training_hours": {"tue": ["10:00"]}}, "training_hours.tue[0]: expected"),
    ({"training_hours": {"tue": ["9:00-17:00"]}}, "training_hours.tue[0]: expected"),
    ({"training_hours": {"wed": ["24:00-02:00"]}}, "training_hours.wed[0]: expected"),
    ({"training_hours": {"wed": ["00:00-24:30"]}}, "training_hours.wed[0]: expected"),
    ({"training_hours": {"thu": [930]}}, "training_hours.thu[0]: expected"),
    ({"training_hours": {"fri": ["10:00-10:00"]}}, "training_hours.fri[0]: an empty window '10:00-10:00'"),
    ({"training_hours": {"sat": {"a": 1}}}, "training_hours.sat: expected a list"),
    ({"training_hours": ["22:00-06:00"]}, "training_hours: expected a mapping"),
    ({"quiet_time_s": -1}, "quiet_time_s: must be a number >= 0, got -1"),
    ({"quiet_time_s": None}, "quiet_time_s: must be a number >= 0, got None"),
    ({"max_load_per_core": float("nan")}, "max_load_per_core: must be a number >= 0 or null"),
    ({"min_free_disk_mb": -5}, "min_free_disk_mb: must be a number >= 0 or null, got -5"),
    ({"min_free_memory_mb": "1G"}, "min_free_memory_mb: must be a number"),
    ({"max_temperature_c": float("inf")}, "max_temperature_c: must be a number"),
    ({"require_ac_power": 1}, "require_ac_power: must be true or false, got 1"),
    ({"lease_ttl_s": 0}, "lease_ttl_s: must be a number in (0, 3600], got 0"),
    ({"lease_ttl_s": 7200}, "lease_ttl_s: must be a number in (0, 3600], got 7200"),
    ({"lease_ttl_s": True}, "lease_ttl_s: must be a number in (0, 3600], got True"),
])
def test_bad_settings_name_the_key(changes: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        IdleSettings(**changes)
    assert str(info.value).startswith(message)


# ---- properties over random settings, activities, clocks and readings ----

ZONES = [timezone.utc, timezone(timedelta(hours=5, minutes=30)), BERLIN, ZoneInfo("America/New_York"),
         ZoneInfo("Australia/Lord_Howe")]  # Lord Howe moves its clocks by 30 minutes
STATES = [*BUSY_REASONS, "idle", "training", "unknown"]


@st.composite
def windows(draw) -> str:
    start = draw(st.integers(0, 24 * 60 - 1))
    end = draw(st.integers(0, 24 * 60 - 1))
    end += end >= start  # any minute of 00:00..24:00 but the start
    return f"{start // 60:02d}:{start % 60:02d}-{end // 60:02d}:{end % 60:02d}"


def optional(strategy):
    return st.none() | strategy


# Hours with gaps and empty days, or hours every day (where random clocks fall inside them more often).
hours = st.dictionaries(st.sampled_from(WEEKDAYS), st.lists(windows(), max_size=3), max_size=7)
every_day_hours = st.builds(lambda named, daily: {**named, DAILY: daily}, hours,
                            st.lists(windows(), min_size=1, max_size=3))
idle_settings = st.builds(
    IdleSettings,
    training_hours=hours | every_day_hours,
    quiet_time_s=st.floats(0, 7200),
    max_load_per_core=optional(st.floats(0, 8)),
    min_free_disk_mb=optional(st.integers(0, 100_000)),
    min_free_memory_mb=optional(st.integers(0, 100_000)),
    max_temperature_c=optional(st.floats(-40, 120)),
    require_ac_power=st.booleans(),
    lease_ttl_s=st.floats(0.001, MAX_TTL_S),
)
readings = st.builds(Sensors, optional(st.floats()), optional(st.floats()), optional(st.floats()),
                     optional(st.floats()), optional(st.booleans()))
clocks = st.datetimes(datetime(1971, 1, 1), datetime(2200, 1, 1), timezones=st.sampled_from(ZONES))


def later(now: datetime, seconds: float) -> datetime:
    # Elapsed time, not wall-clock time: aware + timedelta keeps the wall clock in a zone with DST.
    return (now.astimezone(timezone.utc) + timedelta(seconds=seconds)).astimezone(now.tzinfo)


@hyp_settings(max_examples=300, deadline=None)
@given(idle_settings, st.sampled_from(STATES) | st.sampled_from(["idle", "training"]),
       optional(st.floats(-3600, 86_400)), clocks, readings | st.just(Sensors()))
def test_any_input_gives_a_well_formed_verdict(settings: IdleSettings, state: str, operator_s_ago: float | None,
                                               now: datetime, sensors: Sensors) -> None:
    activity = Activity(state, None if operator_s_ago is None else later(now, -operator_s_ago))
    verdict = lease_decision(settings, activity, now, sensors)
    event("granted" if verdict.granted else "refused")
    if not verdict.granted:
        assert verdict.reason and verdict.ttl_s == 0.0
        return
    assert verdict.reason and 0 < verdict.ttl_s <= settings.lease_ttl_s
    # A missing reading never refuses: without any, the same lease is granted.
    assert lease_decision(settings, activity, now, Sensors()) == verdict


@hyp_settings(max_examples=300, deadline=None)
@given(st.builds(IdleSettings, training_hours=every_day_hours, lease_ttl_s=st.floats(60, MAX_TTL_S)),
       st.sampled_from(ZONES), st.dates(datetime(1971, 1, 2).date(), datetime(2199, 1, 1).date()),
       st.integers(0, 100), st.floats(-600, 7200), st.lists(st.floats(0, 1, exclude_max=True), max_size=4))
def test_a_grant_never_outlives_the_training_hours(settings: IdleSettings, zone, day, pick: int, before_end_s: float,
                                                   fractions: list[float]) -> None:
    # Random clocks rarely land near a window's end, so start from one: `before_end_s` before the end of one
    # of the day's windows (negative: after it).
    todays = weekly_windows(settings.training_hours)[day.weekday()]
    assume(todays)
    end_minute = todays[pick % len(todays)][1]
    end = (datetime(day.year, day.month, day.day) + timedelta(minutes=end_minute)).replace(tzinfo=zone)
    now = later(end, -before_end_s)
    verdict = lease_decision(settings, IDLE, now, Sensors())
    event("refused" if not verdict.granted else "granted, clipped" if verdict.ttl_s < settings.lease_ttl_s
          else "granted, capped")
    if not verdict.granted:
        assert "outside training hours" in verdict.reason
        return
    assert 0 < verdict.ttl_s <= settings.lease_ttl_s
    # The whole grant lies inside the training hours ...
    for fraction in fractions:
        # whole microseconds rounded down, as datetimes count (rounding up could land on the end itself)
        inside = later(now, int(verdict.ttl_s * fraction * 1e6) / 1e6)
        assert lease_decision(settings, IDLE, inside, Sensors()).granted
    # ... and a grant shorter than the cap ends exactly where the training hours do.
    if verdict.ttl_s < settings.lease_ttl_s:
        after = lease_decision(settings, IDLE, later(now, verdict.ttl_s), Sensors())
        assert not after.granted and "outside training hours" in after.reason
