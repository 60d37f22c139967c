"""Run directory bookkeeping (metrics, per-round eval files, plots, resume point) and early stopping."""

import inspect
import json
import math

import pytest
from PIL import Image

from zk0.server import run_dir as run_dir_module
from zk0.server.evaluation import EarlyStopping
from zk0.server.run_dir import RunDir, node_labels, round_series


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
    for png in (tmp_path / "plots").iterdir():
        with Image.open(png) as image:
            assert image.format == "PNG" and image.width >= 600 and image.height >= 300


def test_normalization_answers_persist_across_a_resume(tmp_path):
    nodes = {"nodes": {"5": {"name": "arm1", "dataset_id": "dsA", "outcome": "accepted", "reason": ""}}}
    RunDir(tmp_path).record_round(_entry(0, 2.0), {}, {"model": "tiny", "normalization": nodes})
    resumed = RunDir(tmp_path)
    kept = resumed.load_metrics()["normalization"]  # what run_federation passes on when it resumes
    resumed.record_round(_entry(1, 1.5), {}, {"model": "tiny", "normalization": kept})
    assert json.loads((tmp_path / "federated_metrics.json").read_text())["normalization"] == nodes


def test_plots_name_nodes_by_name_and_show_real_lr_and_mu():
    rounds = [
        {"round": 0, "server_eval": {"loss": 2.0}, "clients": {}},
        {"round": 1, "lr": 1e-4, "mu": 0.01, "server_eval": {"loss": 1.5},
         "clients": {"123456789012345678": {"name": "arm1", "metrics": {"policy-loss": 1.7}},
                     "42": {"name": "", "metrics": {"policy-loss": 1.9}}}},
        {"round": 2, "lr": 9.9e-5, "mu": 0.0098, "server_eval": {"loss": 1.4},
         "clients": {"123456789012345678": {"name": "arm1", "outcome": "lost", "metrics": {}}}},
    ]
    series = round_series(rounds)
    assert series.rounds == [0, 1, 2] and series.server_eval_loss == [2.0, 1.5, 1.4]
    assert list(series.client_train_loss) == ["arm1", "node 42"]
    assert series.client_train_loss["arm1"][1:] == [1.7, pytest.approx(math.nan, nan_ok=True)]
    assert math.isnan(series.client_train_loss["node 42"][0]) and math.isnan(series.client_train_loss["node 42"][2])
    assert series.lr[1:] == [1e-4, 9.9e-5] and series.mu[1:] == [0.01, 0.0098]  # real units, no scaling
    assert node_labels({"1": "arm", "2": "arm", "3": ""}) == {"1": "arm (1)", "2": "arm (2)", "3": "node 3"}


def test_run_dir_draws_with_the_shared_plot_module_not_opencv():
    source = inspect.getsource(run_dir_module)
    assert "cv2" not in source and "zk0.learn.plots" in source


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
