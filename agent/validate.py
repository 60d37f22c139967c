"""The validation gate's decisions and its record: seeds, statistics, the promotion rule, report.json/.png.

A candidate policy and the one it would replace run the same episodes (task, seed) in pairs; the report
is the record of why a version runs on a robot. Everything here is pure except `write_report`.

Seeds: validation episode i uses seed `VALIDATION_SEED_BASE + i`. Recorded datasets use `--seed + episode
index` from 0 (`zk0 record`, default --seed 0), so validation scenes are ones no training episode was
recorded on, as long as recording seeds stay below a million.

Promotion rule (`promotion_verdict`): promote iff the candidate's success rate is at least the active's
minus the configured margin, on the same paired episodes. The exact sign test (McNemar's test on the
discordant pairs) is computed and reported, not used to gate: with the 20 episodes a host can afford it
only reaches p < 0.05 when the discordant pairs split 6-0 or more lopsided, and a non-inferiority test at
that size would refuse nearly every candidate, so it states how much evidence the margin rule had.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from zk0.agent.lockstep import EpisodeOutcome

VALIDATION_SEED_BASE = 1_000_000
CONFIDENCE = 0.95
ROLES = ("candidate", "active")
REPORT_JSON = "report.json"
REPORT_PNG = "report.png"


def episode_plan(tasks: Sequence[str], episodes: int) -> list[tuple[str, int]]:
    """(task, seed) of each validation episode: tasks in turn, seeds from `VALIDATION_SEED_BASE`."""
    if not tasks:
        raise ValueError("validation needs at least one task")
    return [(tasks[i % len(tasks)], VALIDATION_SEED_BASE + i) for i in range(episodes)]


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a success rate: unlike the normal approximation it stays inside [0, 1] and
    is not zero-width at 0/n or n/n, which small validation runs hit often."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= n:
        raise ValueError(f"{successes} successes out of {n}")
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # at 0/n and n/n the bound is exactly 0 or 1 (centre and half agree); rounding must not leave 1e-17
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def sign_test_p(wins: int, losses: int) -> float:
    """Exact two-sided McNemar test on discordant pairs: P(a split at least this lopsided | no difference)."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class PairCounts:
    """Paired outcomes: both succeeded, only the candidate, only the active, neither."""

    both: int
    candidate_only: int
    active_only: int
    neither: int

    @classmethod
    def of(cls, candidate: Sequence[bool], active: Sequence[bool]) -> PairCounts:
        if len(candidate) != len(active):
            raise ValueError(f"paired outcomes differ in length: {len(candidate)} != {len(active)}")
        pairs = list(zip(candidate, active))
        return cls(pairs.count((True, True)), pairs.count((True, False)), pairs.count((False, True)),
                   pairs.count((False, False)))

    @property
    def episodes(self) -> int:
        return self.both + self.candidate_only + self.active_only + self.neither

    @property
    def sign_test_p(self) -> float:
        return sign_test_p(self.candidate_only, self.active_only)


@dataclass(frozen=True)
class Verdict:
    promote: bool
    reason: str


def promotion_verdict(candidate: Sequence[bool], active: Sequence[bool], margin: float) -> Verdict:
    """Promote iff the candidate's paired success rate is not below the active's by more than `margin`."""
    if margin < 0:
        raise ValueError(f"promotion margin must not be negative, got {margin}")
    counts = PairCounts.of(candidate, active)
    n = counts.episodes
    if n == 0:
        return Verdict(False, "no validation episodes ran")
    c_rate = (counts.both + counts.candidate_only) / n
    a_rate = (counts.both + counts.active_only) / n
    difference = c_rate - a_rate
    evidence = (f"candidate {c_rate:.1%} vs active {a_rate:.1%} over {n} paired episodes "
                f"(discordant {counts.candidate_only}-{counts.active_only}, sign test p={counts.sign_test_p:.3f})")
    if difference >= -margin - 1e-12:  # counts/n vs a decimal margin: equality must count as within
        return Verdict(True, f"not worse than active beyond margin {margin:.1%}: {evidence}")
    return Verdict(False, f"worse than active by {-difference:.1%} > margin {margin:.1%}: {evidence}")


def summarize(outcomes: Sequence[EpisodeOutcome]) -> dict[str, Any]:
    """Success rate with its Wilson interval, time to success, envelope interventions and table contacts
    (ticks the arm pressed into the table: a policy that flails into it, or leans on it) of some episodes."""
    n = len(outcomes)
    successes = sum(o.success for o in outcomes)
    low, high = wilson_interval(successes, n)
    times = [o.time_to_success_s for o in outcomes if o.time_to_success_s is not None]
    ticks = sum(o.ticks for o in outcomes)
    intervened = sum(o.intervened_ticks for o in outcomes)
    contacts = sum(o.table_contacts for o in outcomes)
    kinds = sorted({kind for o in outcomes for kind in o.interventions})
    return {
        "episodes": n,
        "successes": successes,
        "success_rate": successes / n if n else None,
        "interval_95": [low, high],
        "time_to_success_s": {"median": statistics.median(times) if times else None,
                              "mean": statistics.fmean(times) if times else None},
        "interventions": {"ticks": intervened, "fraction_of_ticks": intervened / ticks if ticks else None,
                          "by_kind": {kind: sum(o.interventions.get(kind, 0) for o in outcomes) for kind in kinds}},
        "table_contacts": {"ticks": contacts, "fraction_of_ticks": contacts / ticks if ticks else None,
                           "episodes": sum(o.table_contacts > 0 for o in outcomes)},
    }


def summaries(outcomes: Mapping[str, Sequence[EpisodeOutcome]], tasks: Sequence[str]) -> dict[str, Any]:
    """Per role: all episodes, then each task."""
    return {
        role: {"all": summarize(runs), "per_task": {t: summarize([o for o in runs if o.task == t]) for t in tasks}}
        for role, runs in outcomes.items()
    }


def build_report(*, policies: Mapping[str, Mapping[str, Any]], outcomes: Mapping[str, Sequence[EpisodeOutcome]],
                 tasks: Sequence[str], margin: float, settings: Mapping[str, Any], elapsed_s: float) -> dict[str, Any]:
    """The JSON record: policies (ref, path, SHA-256), the rule and its verdict, seeds, tasks, per-pair
    outcomes, summaries and the settings the episodes ran with."""
    candidate, active = outcomes["candidate"], outcomes["active"]
    verdict = promotion_verdict([o.success for o in candidate], [o.success for o in active], margin)
    counts = PairCounts.of([o.success for o in candidate], [o.success for o in active])
    n = len(candidate)
    return {
        "format": "zk0-validation/1",
        "verdict": {**asdict(verdict), "rule": "candidate success rate >= active - margin (paired episodes)",
                    "margin": margin, "promoted": False},
        "policies": {role: dict(policies[role]) for role in ROLES},
        "tasks": list(tasks),
        "seeds": {"rule": f"episode i uses seed {VALIDATION_SEED_BASE} + i", "first": VALIDATION_SEED_BASE,
                  "count": n},
        "settings": dict(settings),
        "paired": {**asdict(counts), "sign_test_p": counts.sign_test_p},
        "summary": summaries(outcomes, tasks),
        "pairs": [{"index": i, "task": c.task, "seed": c.seed, "candidate": _outcome(c), "active": _outcome(a)}
                  for i, (c, a) in enumerate(zip(candidate, active, strict=True))],
        "elapsed_s": round(elapsed_s, 3),
        "seconds_per_episode": round(elapsed_s / (2 * n), 3) if n else None,
    }


def _outcome(outcome: EpisodeOutcome) -> dict[str, Any]:
    return {"success": outcome.success, "time_to_success_s": outcome.time_to_success_s, "ticks": outcome.ticks,
            "intervened_ticks": outcome.intervened_ticks, "interventions": outcome.interventions,
            "table_contacts": outcome.table_contacts, "trajectory_sha256": outcome.trajectory_sha256}


def write_report(report_dir: Path, report: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write report.json and report.png (success per policy and task with 95% intervals) under `report_dir`."""
    import json

    from zk0.learn.plots import interval_chart

    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = report_dir / REPORT_JSON, report_dir / REPORT_PNG
    tmp = json_path.with_name(f".{json_path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(json_path)
    groups = [*report["tasks"], "all"]
    series, labels = {}, {}
    for role in ROLES:
        summary = report["summary"][role]
        per_group = [summary["per_task"][t] for t in report["tasks"]] + [summary["all"]]
        described = report["policies"][role]
        label = f"{role} {described.get('version') or described['ref']}"
        series[label] = [(s["success_rate"], *s["interval_95"]) for s in per_group]
        labels[label] = [f"{s['successes']}/{s['episodes']}" for s in per_group]
    verdict = report["verdict"]
    decision = "promote" if verdict["promote"] else "keep active"
    interval_chart(png_path, groups, series, labels=labels, ylabel="success rate (95% Wilson interval)",
                   title=f"validation on {report['seeds']['count']} paired episodes: {decision} "
                         f"(margin {verdict['margin']:.0%})")
    return json_path, png_path
