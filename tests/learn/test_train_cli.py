"""`zk0 train --seed` fixes the whole run: initial weights, sample order, and so the trained weights."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zk0.learn import train_cli


def _train(dataset: Path, out: Path, seed: int) -> tuple[dict, dict[str, torch.Tensor]]:
    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    args = parser.parse_args(["--dataset", str(dataset), "--steps", "3", "--out", str(out), "--model", "tiny",
                              "--batch-size", "4", "--seed", str(seed), "--device", "cpu", "--lr", "1e-3"])
    assert train_cli.run(args) == 0
    return json.loads((out / "metrics.json").read_text()), load_file(out / "checkpoint" / "model.safetensors")


def test_the_same_seed_gives_the_same_start_and_the_same_trained_weights(dataset_root, tmp_path):
    torch.manual_seed(123)  # whatever state the process is in, the seed decides
    first, first_weights = _train(dataset_root, tmp_path / "a", seed=0)
    torch.rand(7)
    second, second_weights = _train(dataset_root, tmp_path / "b", seed=0)
    assert first["eval_before"] == second["eval_before"]
    assert first["losses"] == second["losses"] and first["eval_after"] == second["eval_after"]
    assert first_weights.keys() == second_weights.keys()
    assert all(torch.equal(first_weights[k], second_weights[k]) for k in first_weights)
    assert first["checkpoint_sha256"] == second["checkpoint_sha256"]

    other, _ = _train(dataset_root, tmp_path / "c", seed=1)
    assert other["eval_before"] != first["eval_before"]


def test_the_loss_curve_is_a_matplotlib_chart_of_every_step_and_its_centred_moving_average(tmp_path):
    losses = [2.0 / (1 + i) + 0.1 * (i % 3) for i in range(100)]
    fig = train_cli.plot_losses(losses, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (ax,) = fig.axes
    assert ax.get_xlabel() == "step" and "loss" in ax.get_ylabel()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["per step", "moving average (10 steps)"]
    per_step, average = ax.get_lines()
    assert list(per_step.get_xdata()) == list(range(1, 101)) and list(per_step.get_ydata()) == losses
    assert average.get_ydata()[50] == pytest.approx(sum(losses[46:56]) / 10)
