"""Round results: the agent announces each global policy that arrives in its store (a `round` event), from
the store's folder alone, and nothing that was there before it started."""

from __future__ import annotations

import json
from pathlib import Path

from zk0.agent.arrivals import ArrivalWatch


def _version(versions: Path, name: str, info: object) -> None:
    (versions / name).mkdir(parents=True)
    (versions / name / "version.json").write_text(json.dumps(info))


def test_new_versions_are_announced_once_with_their_round_and_held_out_loss(tmp_path: Path) -> None:
    versions = tmp_path / "policies" / "versions"
    watch = ArrivalWatch(versions)  # no store yet: nothing to announce, no error
    assert watch.new_results() == []
    _version(versions, "run1-round1", {"run": "run1", "round": 1, "node_metrics": {"loss": 0.8}})
    (versions / ".incoming-run1-round2").mkdir()  # still being written: not news yet
    assert watch.new_results() == [{"version": "run1-round1", "run": "run1", "round": 1, "node_metrics": {"loss": 0.8}}]
    assert watch.new_results() == []
    _version(versions, "run1-round2", ["not", "an", "object"])
    (versions / "run1-round3").mkdir()
    results = watch.new_results()
    assert [r["version"] for r in results] == ["run1-round2", "run1-round3"]
    assert results[0]["error"] == "unreadable version.json: not an object"
    assert results[1]["error"].startswith("unreadable version.json: [Errno 2]")


def test_versions_present_at_start_are_not_news_and_pruned_ones_are_forgotten(tmp_path: Path) -> None:
    versions = tmp_path / "versions"
    _version(versions, "run1-round1", {"run": "run1", "round": 1})
    watch = ArrivalWatch(versions)
    assert watch.new_results() == []
    (versions / "run1-round1" / "version.json").unlink()
    (versions / "run1-round1").rmdir()
    assert watch.new_results() == []
    _version(versions, "run1-round1", {"run": "run1", "round": 1})  # delivered again after a prune
    assert [r["version"] for r in watch.new_results()] == ["run1-round1"]


def test_the_agent_loop_publishes_round_events(tmp_path: Path) -> None:
    from zk0.agent.config import parse_config
    from zk0.agent.daemon import sim_defaults
    from zk0.agent.daemon_core import AgentCore, AgentPaths

    published: list[tuple[str, dict]] = []
    core = AgentCore(parse_config(sim_defaults(tmp_path / "state")), AgentPaths(tmp_path / "state", tmp_path / "run"),
                     True, tmp_path / "policies", lambda kind, **fields: published.append((kind, fields)))
    _version(tmp_path / "policies" / "versions", "run3-round1", {"run": "run3", "round": 1, "node_metrics": {"loss": 1.5}})
    core.tick()
    assert published == [("round", {"version": "run3-round1", "run": "run3", "round": 1, "node_metrics": {"loss": 1.5}})]
