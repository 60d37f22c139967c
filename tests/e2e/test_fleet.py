"""`zk0 fleet local` end to end: two datasets recorded with `zk0 record --sim` (different tasks), a real
SuperLink and real SuperNodes with TLS and node auth, the tiny model, three rounds.

Checks the issue's acceptance list: loadable round-3 checkpoint, per-client and server losses every round,
server eval loss below round 0, normalization = union of both datasets, every drill node's bad replies refused
(or, for inflated example counts, contained) with a recorded reason while rounds complete, and a
killed-and-restarted server resuming at round 3.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from tests.e2e.conftest import FLEET_DRILLS as DRILLS
from tests.e2e.conftest import run_zk0


def _union_stats(roots: list[Path]) -> dict[str, np.ndarray]:
    """Mean and variance of the union of both datasets' frames, straight from their parquet files."""
    import pyarrow.parquet as pq

    out = {}
    for feature in ("observation.state", "action"):
        frames = np.concatenate([
            np.stack(pq.read_table(p, columns=[feature]).column(feature).to_pylist())
            for root in roots for p in sorted((root / "data").glob("**/*.parquet"))
        ]).astype(np.float64)
        out[feature] = (frames.mean(0), frames.var(0), len(frames))
    return out


def test_fleet_node_names_are_told_apart() -> None:
    from zk0.cli.fleet import unique_names

    assert unique_names(["red", "blue", "red", "red-2", "drill-nan", "drill-nan"]) == [
        "red", "blue", "red-2", "red-2-2", "drill-nan", "drill-nan-2"]


@pytest.mark.slow
def test_fleet_local_three_rounds_with_drill_nodes(drill_fleet, datasets):
    """Seven SuperNodes: `red`, `blue` and one drill node per kind (on red's data), all in one run, so the
    drills cost one federation's start-up. Per round: red, blue, drill-stats-nan (bad statistics, honest
    training) and drill-inflate-examples (weight capped) are accepted; nan, huge-norm and stale-base rejected."""
    run, result = drill_fleet
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    for n in (1, 2, 3):
        assert f"round {n}/3: 4/7 updates accepted, 3 rejected" in result.stdout

    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    policy = SmolVLAPolicy.from_pretrained(run / "checkpoints" / "round_3")
    assert sum(p.numel() for p in policy.parameters()) > 0

    metrics = json.loads((run / "federated_metrics.json").read_text())
    normalization = {entry["name"]: entry for entry in metrics["normalization"]["nodes"].values()}
    assert sorted(normalization) == sorted(["red", "blue", *(f"drill-{kind}" for kind in DRILLS)])
    assert normalization["drill-stats-nan"]["outcome"] == "rejected"
    assert "NaN" in normalization["drill-stats-nan"]["reason"] or "finite" in normalization["drill-stats-nan"]["reason"]
    assert all(e["outcome"] == "accepted" for name, e in normalization.items() if name != "drill-stats-nan")
    assert normalization["drill-stats-nan"]["dataset_id"] == normalization["red"]["dataset_id"]  # same data
    assert normalization["red"]["dataset_id"] != normalization["blue"]["dataset_id"]

    rounds = {entry["round"]: entry for entry in metrics["rounds"]}
    assert sorted(rounds) == [0, 1, 2, 3]
    for n in (1, 2, 3):
        clients = rounds[n]["clients"]
        by_name = {c["name"]: c for c in clients.values()}
        assert len(by_name) == len(clients) == 7
        accepted = [c for c in clients.values() if c["accepted"]]
        rejected = [c for c in clients.values() if c["outcome"] == "rejected"]
        assert len(accepted) == 4 and all(np.isfinite(c["metrics"]["policy-loss"]) for c in accepted)
        for c in accepted:  # the nodes trained with exactly what the server scheduled
            assert c["metrics"]["lr"] == pytest.approx(rounds[n]["lr"]) and c["metrics"]["mu"] == pytest.approx(c["mu"])
        assert {c["name"] for c in accepted} == {"red", "blue", "drill-stats-nan", "drill-inflate-examples"}
        assert {c["name"] for c in rejected} == {"drill-nan", "drill-huge-norm", "drill-stale-base"}
        assert "NaN" in by_name["drill-nan"]["reason"]
        assert "weighted as" in by_name["drill-inflate-examples"]["reason"]  # its claimed examples, capped
        assert "from the global (L2), above" in by_name["drill-huge-norm"]["reason"]  # the norm bound
        assert "different global" in by_name["drill-stale-base"]["reason"]
        assert by_name["red"]["reason"] == by_name["blue"]["reason"] == ""
        assert rounds[n]["lr"] > 0 and rounds[n]["mu"] > 0 and rounds[n]["bytes_in"] > 0
        assert (run / f"round_{n}_server_eval.json").exists()
    assert rounds[3]["server_eval"]["loss"] < rounds[0]["server_eval"]["loss"]
    assert "rejected update from node" in (run / "server.log").read_text()
    assert {p.name for p in (run / "plots").iterdir()} >= {"server_eval_loss.png", "lr_mu.png"}

    from zk0.learn.sufficient_stats import SufficientStats

    saved = SufficientStats.from_record(dict(np.load(run / "checkpoints" / "round_3" / "zk0_stats.npz")))
    for feature, (mean, var, count) in _union_stats(datasets).items():
        fs = saved.features[feature]
        assert fs.count == count
        assert np.isfinite(fs.mean).all() and np.isfinite(fs.m2).all()
        np.testing.assert_allclose(fs.mean, mean, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(fs.m2 / fs.count, var, rtol=1e-7, atol=1e-9)


@pytest.mark.slow
def test_killed_server_resumes_at_round_3(tmp_path, datasets, fast_config):
    from zk0.server.config import load_server_config
    from zk0.cli.fleet import LocalFleet
    from zk0.server.launch import wait_for_run

    run = tmp_path / "run"
    config = load_server_config(fast_config, overrides={
        "rounds": 3, "model": "tiny", "run_dir": str(run), "eval_datasets": [str(d) for d in datasets]})
    with LocalFleet(tmp_path / "fleet") as fleet:
        fleet.start_superlink()
        for i, root in enumerate(datasets):
            fleet.add_node(f"n{i}", [root], tmp_path / f"policies{i}")
        app = tmp_path / "fleet" / "app"
        from zk0.server.launch import write_app_dir

        fleet.cli.start_run(write_app_dir(app, config.run_config(fast_config)))
        deadline = time.monotonic() + 1200
        while not (run / "round_2_server_eval.json").exists():
            assert time.monotonic() < deadline, "round 2 never finished"
            time.sleep(1)
        fleet.stop_superlink()  # the server dies: SuperLink, SuperExec and the ServerApp process
        assert not (run / "checkpoints" / "round_3").exists()

        fleet.start_superlink()  # same port and state database; the SuperNodes reconnect by themselves
        status = wait_for_run(fleet.cli, fleet.cli.start_run(app), timeout_s=1200)
    assert status == "finished:completed"
    metrics = json.loads((run / "federated_metrics.json").read_text())
    assert [entry["round"] for entry in metrics["rounds"]] == [0, 1, 2, 3]
    assert "resuming after round 2" in (run / "server.log").read_text()
    parent = json.loads((run / "checkpoints" / "round_3" / "zk0.json").read_text())["parent"]
    assert parent == json.loads((run / "checkpoints" / "round_2" / "zk0.json").read_text())["sha256"]
