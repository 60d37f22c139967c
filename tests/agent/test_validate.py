"""zk0.agent.validate: Wilson intervals, the sign test, the promotion rule, seeds, report.json and report.png."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from zk0.agent.lockstep import EpisodeOutcome
from zk0.agent.validate import (
    VALIDATION_SEED_BASE,
    PairCounts,
    build_report,
    episode_plan,
    promotion_verdict,
    sign_test_p,
    summarize,
    wilson_interval,
    write_report,
)


@pytest.mark.parametrize(("successes", "n", "low", "high"), [
    (0, 20, 0.0, 0.1611),  # never zero-width at 0/n
    (20, 20, 0.8389, 1.0),
    (10, 20, 0.2993, 0.7007),
    (18, 20, 0.6990, 0.9721),
    (1, 10, 0.0179, 0.4042),
    (45, 50, 0.7864, 0.9565),
    (0, 1, 0.0, 0.7935),
    (0, 0, 0.0, 1.0),  # no episodes: no information
])
def test_wilson_interval(successes, n, low, high):
    assert wilson_interval(successes, n) == pytest.approx((low, high), abs=1e-4)


def test_wilson_interval_ends_are_exact_and_impossible_counts_refused():
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == 1.0
    with pytest.raises(ValueError):
        wilson_interval(21, 20)


@pytest.mark.parametrize(("wins", "losses", "p"), [
    (6, 0, 0.03125),  # the most lopsided 6 discordant pairs can be: the smallest count that reaches p < 0.05
    (5, 1, 0.21875),
    (7, 1, 0.0703125),
    (0, 10, 0.001953125),
    (3, 4, 1.0),
    (0, 0, 1.0),
])
def test_exact_sign_test_on_discordant_pairs(wins, losses, p):
    assert sign_test_p(wins, losses) == pytest.approx(p)


def _outcomes(successes: int, n: int) -> list[bool]:
    return [True] * successes + [False] * (n - successes)


@pytest.mark.parametrize(("candidate", "active", "n", "margin", "promote"), [
    (10, 10, 20, 0.05, True),  # equal
    (9, 10, 20, 0.05, True),  # exactly one margin worse: not worse *beyond* the margin
    (8, 10, 20, 0.05, False),  # two episodes of 20 worse: 10% > 5%
    (12, 10, 20, 0.05, True),  # better
    (9, 10, 20, 0.0, False),  # no margin: any loss refuses
    (0, 0, 20, 0.05, True),  # both never succeed: no worse
    (0, 1, 20, 0.05, True),
    (0, 2, 20, 0.05, False),
    (95, 100, 100, 0.05, True),
    (94, 100, 100, 0.05, False),
    (17, 20, 20, 0.20, True),  # a loose margin tolerates 15% worse
    (0, 0, 0, 0.05, False),  # nothing ran: never promote
])
def test_promotion_rule(candidate, active, n, margin, promote):
    verdict = promotion_verdict(_outcomes(candidate, n), _outcomes(active, n), margin)
    assert verdict.promote is promote
    assert ("not worse" in verdict.reason) is promote or n == 0


def test_promotion_rule_is_paired_and_reports_the_discordant_split():
    candidate = [True, True, False, False, True]
    active = [True, False, True, False, False]
    assert PairCounts.of(candidate, active) == PairCounts(both=1, candidate_only=2, active_only=1, neither=1)
    verdict = promotion_verdict(candidate, active, 0.05)
    assert verdict.promote and "discordant 2-1" in verdict.reason and "60.0% vs active 40.0%" in verdict.reason
    with pytest.raises(ValueError, match="differ in length"):
        promotion_verdict([True], [True, False], 0.05)
    with pytest.raises(ValueError, match="negative"):
        promotion_verdict([True], [True], -0.1)


def test_validation_seeds_are_disjoint_from_recording_seeds_and_tasks_alternate():
    plan = episode_plan(["pick_place_red", "push_blue_left"], 5)
    assert plan == [("pick_place_red", 1_000_000), ("push_blue_left", 1_000_001), ("pick_place_red", 1_000_002),
                    ("push_blue_left", 1_000_003), ("pick_place_red", 1_000_004)]
    assert VALIDATION_SEED_BASE == 1_000_000
    with pytest.raises(ValueError):
        episode_plan([], 3)


def _episode(task: str, seed: int, success: bool, clamped: int = 0, contacts: int = 0) -> EpisodeOutcome:
    return EpisodeOutcome(task, seed, success, 6.5 if success else None, 195 if success else 600, clamped,
                          {"step": clamped} if clamped else {}, f"{seed:064x}", table_contacts=contacts)


def test_summary_and_report_record_everything_and_draw_the_chart(tmp_path):
    plan = episode_plan(["pick_place_red", "push_blue_left"], 6)
    outcomes = {"candidate": [_episode(t, s, i != 3, clamped=i) for i, (t, s) in enumerate(plan)],
                "active": [_episode(t, s, i % 2 == 0, contacts=10 * (i == 1)) for i, (t, s) in enumerate(plan)]}
    summary = summarize(outcomes["candidate"])
    assert summary["successes"] == 5 and summary["success_rate"] == pytest.approx(5 / 6)
    assert summary["interval_95"] == pytest.approx(wilson_interval(5, 6))
    assert summary["time_to_success_s"]["median"] == 6.5
    assert summary["interventions"]["ticks"] == 15 and summary["interventions"]["by_kind"] == {"step": 15}
    assert summary["table_contacts"] == {"ticks": 0, "fraction_of_ticks": 0.0, "episodes": 0}
    pressed = summarize(outcomes["active"])["table_contacts"]
    assert pressed["ticks"] == 10 and pressed["episodes"] == 1
    assert pressed["fraction_of_ticks"] == pytest.approx(10 / (3 * 195 + 3 * 600))
    policies = {"candidate": {"ref": "v7", "sha256": "c" * 64}, "active": {"ref": "active", "sha256": "a" * 64}}
    report = build_report(policies=policies, outcomes=outcomes, tasks=["pick_place_red", "push_blue_left"],
                          margin=0.05, settings={"fps": 30}, elapsed_s=12.0)
    assert report["verdict"]["promote"] and not report["verdict"]["promoted"]
    assert report["paired"] == {"both": 3, "candidate_only": 2, "active_only": 0, "neither": 1, "sign_test_p": 0.5}
    assert [p["seed"] for p in report["pairs"]] == [s for _, s in plan]
    assert report["summary"]["active"]["per_task"]["push_blue_left"]["successes"] == 0
    assert report["summary"]["active"]["per_task"]["push_blue_left"]["table_contacts"]["ticks"] == 10
    assert report["pairs"][1]["active"]["table_contacts"] == 10
    assert report["seconds_per_episode"] == 1.0

    json_path, png_path = write_report(tmp_path / "report", report)
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(report))
    with Image.open(png_path) as image:
        assert image.format == "PNG" and image.width >= 600
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["report.json", "report.png"]
