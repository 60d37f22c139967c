"""zk0 demo's run: what it clears of a previous run in its output directory (and nothing else)."""

from __future__ import annotations

from pathlib import Path

from zk0.cli.demo_fleet import RUN_ENTRIES, DemoRun
from zk0.cli.demo_plan import DemoSettings


def test_a_run_starts_fresh_but_keeps_what_is_not_its_own(tmp_path: Path) -> None:
    for name in RUN_ENTRIES:
        if Path(name).suffix:
            (tmp_path / name).write_text("{}")
        else:
            (tmp_path / name).mkdir()
    (tmp_path / "server" / "checkpoints").mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    DemoRun(DemoSettings(hosts=2), tmp_path).clear_previous_run()
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
