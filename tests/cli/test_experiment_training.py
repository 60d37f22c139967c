"""The experiment's base: progress of a sim-base build read from its log."""

from __future__ import annotations

from zk0.cli.experiment_training import last_progress


def test_a_sim_base_build_reports_its_latest_progress_from_its_log():
    log = ("zk0 model sim-base: recording 210 scripted demonstrations (7 tasks)\n"
           "zk0 model sim-base: recorded 100/210, 61 s\n"
           "\rpretraining 0/6000 steps, 0.0 step/s\rpretraining 100/6000 steps, 16.1 step/s")
    assert last_progress(log) == "pretraining 100/6000 steps"
    assert last_progress(log.split("\r")[0]) == "recorded 100/210"
    assert last_progress("Reducing the number of VLM layers to 16 ...") is None


def test_a_failing_zk0_child_is_an_error_naming_its_log(tmp_path):
    import pytest

    from zk0.cli.experiment_training import _zk0

    seen = []
    with pytest.raises(RuntimeError, match="exited 2; see .*model.log"):
        _zk0(["model", "no-such-kind", str(tmp_path / "out")], tmp_path / "model.log", seen.append, every_s=0.05)
    assert "invalid choice" in (tmp_path / "model.log").read_text() and seen == []
