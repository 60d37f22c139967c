"""Issue #12's "done when" chain in one go, on simulated hardware, through the `zk0` command only:

1. `zk0 fleet local` (a real SuperLink and SuperNodes, three rounds of the tiny model: the drill fleet run the
   federation tests share) leaves every round's global in each node's policy store; the first version the store received is active (`zk0 policy list`), and the
   versions are the server's checkpoints (same trainable-tensor SHA-256).
2. `zk0 validate --sim --promote` runs the newest version against the active one on 20 paired, seeded
   lock-step episodes and writes report.json + report.png; the verdict is `promotion_verdict` of the report's
   own outcomes, and the store's active pointer follows it.
3. `zk0 rollout --sim --policy active` runs what is now active at 30 Hz through lerobot's SO follower on the
   pty bus and reports its ticks on time.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.e2e.conftest import REPO, run_zk0

TASKS = ("pick_place_red", "push_blue_left")  # the tasks of the `datasets` fixture's two recordings
EPISODES = 20
MAX_EPISODE_S = 3.0  # a lock-step episode without success ends after 90 ticks: 40 episodes in ~2 minutes
ROLLOUT_S = 3.0
FPS = 30


def _agent_config(tmp_path: Path) -> Path:
    """The simulated host's config with short validation episodes."""
    config = yaml.safe_load((REPO / "configs" / "agent.yaml").read_text())
    config["validation"] = {"max_episode_s": MAX_EPISODE_S}
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _trainable_sha256(checkpoint: Path) -> str:
    """SHA-256 of a checkpoint's trainable tensors: what the server sends as global-sha256 and a store keeps."""
    from zk0.learn.checkpoint import load_checkpoint
    from zk0.learn.codec import tensors_sha256
    from zk0.learn.policy import trainable_state

    bundle, _ = load_checkpoint(checkpoint)
    return tensors_sha256(trainable_state(bundle.policy))


@pytest.mark.slow
def test_fleet_policy_is_validated_promoted_and_rolled_out(tmp_path, drill_fleet):
    from zk0.agent.policy_store import PolicyStore
    from zk0.agent.validate import VALIDATION_SEED_BASE, promotion_verdict
    from zk0.hw.sim.tasks import get_task

    timings: dict[str, float] = {}
    single_thread = {"OMP_NUM_THREADS": "1"}  # one torch thread: ~30 ms a tiny-policy tick on 2 busy cores, not ~700

    # 1. Three federated rounds; every node stores each round's global.
    run, fleet = drill_fleet
    assert fleet.returncode == 0, fleet.stdout + fleet.stderr[-3000:]
    assert "round 3/3: 4/7 updates accepted" in fleet.stdout, fleet.stdout

    rounds = (1, 2, 3)
    server_sha = {n: _trainable_sha256(run / "checkpoints" / f"round_{n}") for n in rounds}
    stores = {name: run / "fleet" / "nodes" / name / "policies" for name in ("red", "blue")}
    for name, store_root in stores.items():
        listing = run_zk0("policy", "list", "--store", str(store_root), timeout=300)
        assert listing.returncode == 0, listing.stdout + listing.stderr
        store = PolicyStore(store_root)
        versions = store.versions()
        assert [v.round for v in versions] == list(rounds), (name, listing.stdout)
        assert all(re.fullmatch(rf"run\d+-round{v.round}", v.name) and not v.corrupt for v in versions)
        assert [v.sha256 for v in versions] == [server_sha[n] for n in rounds]  # the server's globals, unchanged
        first, candidate = versions[0].name, versions[-1].name
        # The very first version a store receives becomes active; later ones wait to be promoted.
        state = store.state()
        assert state.active == first and state.previous is None
        assert [(e["action"], e["version"], e["replaced"]) for e in state.history] == [("promote", first, None)]
        assert state.history[0]["reason"] == "first version this store received"
        rows = {line.split()[1] if line.startswith("active") else line.split()[0]: line
                for line in listing.stdout.splitlines()[1:]}
        assert rows[first].startswith("active") and rows[first].rstrip().endswith("ok"), listing.stdout
        assert not rows[candidate].startswith(("active", "previous")), listing.stdout

    # 2. The validation gate on red's robot: round 3 against the active round 1, then --promote.
    store_root = stores["red"]
    store = PolicyStore(store_root)
    first, candidate = store.versions()[0].name, store.versions()[-1].name
    config = _agent_config(tmp_path)
    report_dir = tmp_path / "report"
    started = time.monotonic()
    validate = run_zk0("validate", "--sim", "--config", str(config), "--store", str(store_root), "--policy", candidate,
                       "--against", "active", "--task", TASKS[0], "--task", TASKS[1], "--episodes", str(EPISODES),
                       "--report", str(report_dir), "--promote", timeout=1200, env=single_thread)
    timings["validate"] = time.monotonic() - started
    assert validate.returncode in (0, 1), validate.stdout + validate.stderr[-3000:]
    report = json.loads((report_dir / "report.json").read_text())
    assert (report_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert report["policies"]["candidate"]["version"] == candidate
    assert report["policies"]["active"]["version"] == first
    assert report["settings"]["max_episode_s"] == MAX_EPISODE_S and report["settings"]["simulation"] == "lock-step"
    pairs = report["pairs"]
    assert len(pairs) == EPISODES >= 20
    assert [p["seed"] for p in pairs] == [VALIDATION_SEED_BASE + i for i in range(EPISODES)]
    assert [p["task"] for p in pairs] == [TASKS[i % 2] for i in range(EPISODES)]
    for p in pairs:
        for role in ("candidate", "active"):
            ticks = p[role]["ticks"]
            assert 0 < ticks <= MAX_EPISODE_S * FPS and (p[role]["success"] or ticks == MAX_EPISODE_S * FPS), p
    # The two policies differ, so their paired trajectories do (same seed, same scene, other actions).
    assert any(p["candidate"]["trajectory_sha256"] != p["active"]["trajectory_sha256"] for p in pairs)

    # The verdict is the rule applied to the report's own numbers; the exit status and the store follow it.
    margin = report["verdict"]["margin"]
    assert margin == pytest.approx(0.05)  # validation.promotion_margin's default: the config does not set it
    candidate_ok = [p["candidate"]["success"] for p in pairs]
    active_ok = [p["active"]["success"] for p in pairs]
    rule = promotion_verdict(candidate_ok, active_ok, margin)
    rates = {role: report["summary"][role]["all"]["success_rate"] for role in ("candidate", "active")}
    assert rates == {"candidate": sum(candidate_ok) / EPISODES, "active": sum(active_ok) / EPISODES}
    assert rule.promote == (rates["candidate"] >= rates["active"] - margin)
    assert report["verdict"]["promote"] == rule.promote and report["verdict"]["reason"] == rule.reason
    assert report["verdict"]["promoted"] == rule.promote
    assert validate.returncode == (0 if rule.promote else 1), validate.stdout
    state = PolicyStore(store_root).state()
    if rule.promote:
        assert state.active == candidate and state.previous == first
        last = state.history[-1]
        assert (last["action"], last["version"], last["replaced"]) == ("promote", candidate, first)
        assert Path(last["reason"]) == (report_dir / "report.json").resolve()
        assert f"verdict: {candidate} promoted" in validate.stdout
    else:
        assert state.active == first and state.previous is None
    active_now = state.active
    listing = run_zk0("policy", "list", "--store", str(store_root), timeout=300)
    assert any(line.split()[:2] == ["active", active_now] for line in listing.stdout.splitlines()), listing.stdout

    # 3. The active policy on the simulated rig at 30 Hz, lerobot's follower on the pty bus.
    rollout_report, trace = tmp_path / "rollout.json", tmp_path / "bus.jsonl"
    started = time.monotonic()
    rollout = run_zk0("rollout", "--sim", "--config", str(config), "--store", str(store_root), "--policy", "active",
                      "--task", get_task(TASKS[0]).instruction, "--episodes", "1", "--episode-time-s", str(ROLLOUT_S),
                      "--control", f"ipc://{tmp_path}/ctl.sock", "--report", str(rollout_report),
                      "--bus-trace", str(trace), timeout=600, env=single_thread)
    timings["rollout"] = time.monotonic() - started
    assert rollout.returncode == 0, rollout.stdout + rollout.stderr[-3000:]
    result = json.loads(rollout_report.read_text())
    assert result["policy"].split("@")[0] == active_now and result["fps"] == FPS and result["stopped"] is None
    (episode,) = result["episodes"]
    timing = episode["timing"]
    assert episode["ended"] == "time" and episode["success"] is not None and timing["failed"] == 0, episode
    # On a quiet machine the loop keeps every one of the 90 ticks on time (NOTES, bench/rollout.py). Here it shares
    # 2 cores with whatever else runs (other tests' rigs at SCHED_FIFO 30 among them), and a late tick moves the
    # schedule rather than bursting, so the bar is the rate, not perfection: at least 80 % of the scheduled ticks
    # ran (achieved rate >= 24 Hz) and at least 90 % of those finished within a period of their deadline.
    expected_ticks = ROLLOUT_S * FPS
    assert 0.8 * expected_ticks <= timing["ticks"] <= expected_ticks + 1, timing
    assert timing["on_time_fraction"] >= 0.9 and timing["achieved_fps"] >= 0.8 * FPS, timing
    assert episode["inference_ms"][0] < 1000 / FPS, episode  # the median inference fits in one tick
    # What reached the simulated servos over the pty: one sync write of the six follower goals per tick that had
    # a fresh action, at the loop's 30 Hz.
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    goals = [r for r in records if r["arm"] == "follower" and r["register"] == "Goal_Position"]
    assert {r["via"] for r in goals} == {"sync_write"} and len(goals) % 6 == 0
    writes = len(goals) // 6
    assert timing["ticks"] / 2 <= writes <= timing["ticks"], (writes, timing)
    times = np.array([g["t"] for g in goals[::6]])
    assert abs(float(np.median(np.diff(times))) - 1 / FPS) < 0.005, np.diff(times)
    print("wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
