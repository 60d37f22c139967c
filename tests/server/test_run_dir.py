"""Run directory bookkeeping (metrics, per-round eval files, plots, resume point) and early stopping."""

import json

import pytest

from zk0.server.evaluation import EarlyStopping
from zk0.server.run_dir import RunDir


def _entry(n, loss):
    return {"round": n, "lr": 1e-4, "mu": 0.01, "server_eval": {"loss": loss},
            "clients": {"7": {"accepted": True, "metrics": {"policy-loss": loss + 0.1}}}}


def test_rounds_are_recorded_once_and_resume_needs_a_checkpoint(tmp_path):
    run = RunDir(tmp_path)
    assert run.last_round() is None
    for n, loss in enumerate([2.0, 1.5, 1.2]):
        run.record_round(_entry(n, loss), {"eval_losses": [1.5]}, {"model": "tiny"})
    run.record_round(_entry(2, 1.1), {"eval_losses": [1.5, 1.1]}, {"model": "tiny"})  # round 2 re-run after a restart
    metrics = json.loads((tmp_path / "federated_metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2]
    assert metrics["rounds"][2]["server_eval"]["loss"] == 1.1 and metrics["model"] == "tiny"
    assert json.loads((tmp_path / "round_2_server_eval.json").read_text()) == {"round": 2, "loss": 1.1}
    assert run.last_round() is None  # metrics alone are not a resume point
    for n in (0, 1):
        run.checkpoint_dir(n).mkdir()
        (run.checkpoint_dir(n) / "zk0.json").write_text("{}")
    assert run.last_round() == 1
    pngs = {p.name for p in (tmp_path / "plots").iterdir()}
    assert pngs == {"server_eval_loss.png", "client_train_loss.png", "lr_mu.png"}
    assert (tmp_path / "plots" / "server_eval_loss.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("patience", "losses", "stop"),
    [
        (0, [1.0, 2.0, 3.0, 4.0], False),
        (2, [1.0, 0.9, 0.95, 0.92], True),
        (2, [1.0, 0.9, 0.95, 0.85], False),
        (2, [1.0, 0.9], False),
        (3, [1.0, 0.9, 0.91, 0.92], False),
    ],
)
def test_early_stopping_patience(patience, losses, stop):
    assert EarlyStopping(patience).should_stop(losses) is stop


def test_early_stopping_min_delta():
    assert EarlyStopping(2, min_delta=0.1).should_stop([1.0, 0.95, 0.92])
