"""`zk0 fleet local` end to end: two datasets recorded with `zk0 record --sim` (different tasks), a real
SuperLink and real SuperNodes with TLS and node auth, the tiny model, three rounds.

Checks the issue's acceptance list: loadable round-3 checkpoint, per-client and server losses every round,
server eval loss below round 0, normalization = union of both datasets, a third node's NaN updates refused
with a logged reason while rounds complete, and a killed-and-restarted server resuming at round 3.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

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


@pytest.mark.slow
def test_fleet_local_three_rounds_with_a_corrupt_node(tmp_path, datasets, fast_config):
    run = tmp_path / "run"
    result = run_zk0("fleet", "local", "--dataset", str(datasets[0]), "--dataset", str(datasets[1]), "--rounds", "3",
                     "--out", str(run), "--model", "tiny", "--config", str(fast_config), "--drill-corrupt-node", "nan",
                     "--timeout", "1500", timeout=1800)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    for n in (1, 2, 3):
        assert f"round {n}/3: 2/3 updates accepted" in result.stdout

    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    policy = SmolVLAPolicy.from_pretrained(run / "checkpoints" / "round_3")
    assert sum(p.numel() for p in policy.parameters()) > 0

    metrics = json.loads((run / "federated_metrics.json").read_text())
    rounds = {entry["round"]: entry for entry in metrics["rounds"]}
    assert sorted(rounds) == [0, 1, 2, 3]
    for n in (1, 2, 3):
        clients = rounds[n]["clients"]
        accepted = [c for c in clients.values() if c["accepted"]]
        rejected = [c for c in clients.values() if c["outcome"] == "rejected"]
        assert len(accepted) == 2 and all(np.isfinite(c["metrics"]["policy-loss"]) for c in accepted)
        for c in accepted:  # the nodes trained with exactly what the server scheduled
            assert c["metrics"]["lr"] == pytest.approx(rounds[n]["lr"]) and c["metrics"]["mu"] == pytest.approx(c["mu"])
        assert len(rejected) == 1 and "NaN" in rejected[0]["reason"]
        assert rounds[n]["lr"] > 0 and rounds[n]["mu"] > 0 and rounds[n]["bytes_in"] > 0
        assert (run / f"round_{n}_server_eval.json").exists()
    assert rounds[3]["server_eval"]["loss"] < rounds[0]["server_eval"]["loss"]
    assert "rejected update from node" in (run / "server.log").read_text()
    assert {p.name for p in (run / "plots").iterdir()} >= {"server_eval_loss.png", "lr_mu.png"}

    from zk0.learn.stats import SufficientStats

    saved = SufficientStats.from_record(dict(np.load(run / "checkpoints" / "round_3" / "zk0_stats.npz")))
    for feature, (mean, var, count) in _union_stats(datasets).items():
        fs = saved.features[feature]
        assert fs.count == count
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
