"""zk0 demo's progress lines and summary rows (pure), and its plots."""

from __future__ import annotations

from pathlib import Path

import pytest

from zk0.cli.demo_summary import event_line, fleet_means, host_row, node_traffic, rollout_outcome, success, table, \
    write_plots

ROUNDS = [
    {"round": 0, "server_eval": {"loss": 2.6}, "clients": {}},
    {"round": 1, "server_eval": {"loss": 2.5}, "bytes_out": 800, "clients": {
        "11": {"name": "host1", "bytes_in": 300, "metrics": {"policy-loss": 2.4}},
        "22": {"name": "host2", "bytes_in": 310, "metrics": {"policy-loss": 2.2}}}},
    {"round": 2, "server_eval": {"loss": 2.4}, "bytes_out": 400, "clients": {
        "22": {"name": "host2", "bytes_in": 200, "metrics": {"policy-loss": 2.0}}}},
]


def report(before: tuple[int, int], after: tuple[int, int], promoted: bool) -> dict:
    return {"summary": {"active": {"all": {"successes": before[0], "episodes": before[1]}},
                        "candidate": {"all": {"successes": after[0], "episodes": after[1]}}},
            "verdict": {"promoted": promoted, "reason": "because"},
            "policies": {"active": {"version": "base-round0"}, "candidate": {"version": "run1-round2"}}}


@pytest.mark.parametrize("event, line", [
    ({"type": "state", "previous": "idle", "state": "training", "reason": "lease"}, "h: idle -> training (lease)"),
    ({"type": "state", "previous": None, "state": "idle", "reason": "agent started"}, None),
    ({"type": "round", "run": "run7", "round": 2, "version": "run7-round2", "node_metrics": {"loss": 1.5}},
     "h: round 2 global arrived as run7-round2, held-out loss 1.5000"),
    ({"type": "round", "run": "base", "round": 0, "version": "base-round0"}, None),
    ({"type": "progress", "step": 3, "steps": 20, "loss": 0.5}, "h: training step 3/20, loss 0.5000"),
    ({"type": "supernode", "status": "exited"}, "h: SuperNode exited"),
    ({"type": "job", "line": "episode 0"}, None),
])
def test_event_lines(event: dict, line: str | None) -> None:
    assert event_line("h", event) == line


def test_traffic_and_loss_per_node() -> None:
    assert node_traffic(ROUNDS, "host1") == {"bytes_sent": 300, "bytes_received": 400, "local_loss": 2.4}
    assert node_traffic(ROUNDS, "host2") == {"bytes_sent": 510, "bytes_received": 800, "local_loss": 2.0}
    assert node_traffic(ROUNDS, "host3") == {"bytes_sent": 0, "bytes_received": 0, "local_loss": None}


def test_success_has_a_wilson_interval() -> None:
    value = success({"successes": 0, "episodes": 2})
    assert value["rate"] == 0 and value["interval_95"] == [0.0, pytest.approx(0.6576, abs=1e-4)]
    assert success({"successes": 0, "episodes": 0}) is None and success(None) is None


def test_after_is_the_candidate_only_when_promoted() -> None:
    promoted = host_row("host1", ["pick_place_red"], 2, report((1, 4), (3, 4), True), ROUNDS, "success")
    kept = host_row("host2", ["push_blue_left"], 2, report((3, 4), (1, 4), False), ROUNDS, None)
    assert promoted["after"]["successes"] == 3 and promoted["promoted"] == "run1-round2"
    assert kept["after"] == kept["before"] and kept["promoted"] is None and kept["candidate"]["successes"] == 1
    assert fleet_means([promoted, kept]) == {"before": 0.5, "after": 0.75}
    assert host_row("host3", ["x"], 1, None, [], None)["before"] is None  # no report: nothing to show, no crash


def test_table_has_a_line_per_host_and_the_fleet() -> None:
    rows = [host_row("host1", ["pick_place_red", "push_blue_left"], 4, report((1, 4), (3, 4), True), ROUNDS, None),
            host_row("host3", ["x"], 1, None, [], None)]
    text = table(rows).splitlines()
    assert len(text) == 4 and text[1].startswith("host1  pick_place_red+push_blue_left  4")
    assert "1/4 [" in text[1] and "3/4 [" in text[1] and "run1-round2" in text[1] and "n/a" in text[2]
    assert text[3] == "fleet mean success rate: before 0.25, after 0.75"


@pytest.mark.parametrize("line, outcome", [
    ("  episode 0: 133 ticks, ended: time success=False", "no success (ended: time)"),
    ("  episode 0: 90 ticks, ended: success success=True", "success"),
    ("something else", "something else"), (None, None),
])
def test_rollout_outcome(line: str | None, outcome: str | None) -> None:
    assert rollout_outcome(line) == outcome


def test_plots_are_written(tmp_path: Path) -> None:
    rows = [host_row("host1", ["pick_place_red"], 2, report((1, 4), (3, 4), True), ROUNDS, None),
            host_row("host2", ["x"], 1, None, ROUNDS, None)]
    written = write_plots(tmp_path / "plots", rows, ROUNDS)
    assert [p.name for p in written] == ["success_before_after.png", "server_eval_loss.png"]
    assert all(p.stat().st_size > 1000 for p in written)
