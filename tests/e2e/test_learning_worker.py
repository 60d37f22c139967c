"""`zk0 fleet local --learn-workers` end to end: two SuperNodes, each relaying to a warm learning worker, two
rounds. The rounds complete, each worker builds the policy and data once for the run, and the second round's
messages cost much less than the first's (whose training message built everything)."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest

from tests.e2e.conftest import REPO, run_zk0


def _bench():
    spec = importlib.util.spec_from_file_location("round_overhead", REPO / "bench" / "round_overhead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _train_job_seconds(log: str) -> list[float]:
    return [float(s) for s in re.findall(r"train job \w+: ([0-9.]+) s", log)]


@pytest.mark.slow
def test_fleet_local_with_learning_workers_builds_once_and_gets_faster(tmp_path, datasets, fast_config):
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
        assert log.count("policy and data built") == 1, log  # once per run, by round 1's training message
        assert re.search(r"query job \w+", log) and len(re.findall(r"evaluate job \w+", log)) == 2
        first, second = _train_job_seconds(log)
        assert second < 0.5 * first, log

    figures = _bench().summarize(json.loads((run / "federated_metrics.json").read_text())["rounds"])["rounds"]
    print(json.dumps(figures, indent=1))
    first, second = figures
    assert second["train_phase_s"] < 0.7 * first["train_phase_s"]
    assert all(f["node_train_s"] > 0 and f["node_eval_s"] > 0 for f in figures)
