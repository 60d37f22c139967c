"""`zk0 fleet local --learn-workers` end to end: two SuperNodes, each relaying to a warm learning worker, two
rounds. The rounds complete, each worker builds the policy and data once for the run (round 1's training
message builds them; round 2's reuses them), and the round figures `bench/round_overhead.py` reports
(zk0.server.run_dir.summarize_overhead) are there.
How much faster the warm round is, is a speed figure: the bench measures it, not this test."""

from __future__ import annotations

import json
import re

import pytest

from tests.e2e.conftest import run_zk0
from zk0.server.run_dir import summarize_overhead


@pytest.mark.slow
def test_fleet_local_with_learning_workers_builds_policy_and_data_once(tmp_path, datasets, fast_config):
    run = tmp_path / "run"
    result = run_zk0("fleet", "local", "--dataset", str(datasets[0]), "--dataset", str(datasets[1]), "--rounds", "2",
                     "--out", str(run), "--model", "tiny", "--config", str(fast_config), "--learn-workers",
                     "--timeout", "1200", timeout=1500)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "2 SuperNodes, each with a learning worker" in result.stdout
    for n in (1, 2):
        assert f"round {n}/2: 2/2 updates accepted" in result.stdout

    for name in ("red", "blue"):
        log = (run / "fleet" / "logs" / f"learn-worker-{name}.log").read_text()
        train_jobs = re.findall(r"train job \w+: [0-9.]+ s(, policy and data built)?", log)
        assert train_jobs == [", policy and data built", ""], log  # round 1 builds, round 2 reuses
        assert re.search(r"query job \w+", log) and len(re.findall(r"evaluate job \w+", log)) == 2

    figures = summarize_overhead(json.loads((run / "federated_metrics.json").read_text())["rounds"])["rounds"]
    print(json.dumps(figures, indent=1))
    assert len(figures) == 2
    assert all(f["node_train_s"] > 0 and f["node_eval_s"] > 0 for f in figures)
