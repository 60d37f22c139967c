"""`zk0 demo` on real processes: the smallest whole loop (2 hosts, 2 rounds, 2 episodes each, the tiny model) leaves
its summary, the server's metrics and a round-2 checkpoint that lerobot loads; a SIGINT mid-run leaves no process
of the demo behind.

"No process behind" is checked by an environment marker: every process the demo starts, however detached (agents,
SuperLink, SuperExec, SuperNodes, learning workers, job zygotes, jobs, simulated rigs), inherits the demo's
environment, so after it exits no process may still carry the marker.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.e2e.conftest import REPO

pytestmark = pytest.mark.slow
SMALL = ["--hosts", "2", "--episodes", "2", "--validation-episodes", "1", "--local-steps", "5", "--model", "tiny"]


def marked_processes(marker: str) -> list[int]:
    """Pids of live processes whose environment holds `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours
            continue
    return found


def start_demo(out: Path, marker: str, *args: str) -> subprocess.Popen:
    # Ctrl-C as a terminal delivers it: a test runner started in the background (`make test-slow &`) ignores
    # SIGINT, and a child inherits that, so the demo would never see the test's SIGINT.
    return subprocess.Popen([sys.executable, "-m", "zk0.cli", "demo", *SMALL, *args, "--out", str(out)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ZK0_DEMO_TEST": marker})


def assert_nothing_left(marker: str) -> None:
    deadline = time.monotonic() + 10  # processes being reaped by their parents
    while (left := marked_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    commands = [Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:200] for pid in left
                if Path(f"/proc/{pid}").exists()]
    assert not commands, f"processes of the demo still running: {commands}"


def test_demo_runs_the_whole_loop(tmp_path: Path) -> None:
    marker = f"zk0-demo-{uuid.uuid4().hex}"
    started = time.monotonic()
    demo = start_demo(tmp_path / "demo", marker, "--rounds", "2")
    output, _ = demo.communicate(timeout=1500)
    print(output[-4000:])
    print(f"zk0 demo (2 hosts, 2 rounds, 2 episodes): {time.monotonic() - started:.0f} s")
    assert demo.returncode == 0, output[-6000:]
    assert_nothing_left(marker)

    out = tmp_path / "demo"
    summary = json.loads((out / "summary.json").read_text())
    assert [row["host"] for row in summary["hosts"]] == ["host1", "host2"]
    for row in summary["hosts"]:
        assert row["episodes"] == 2 and row["bytes_sent"] > 0 and row["bytes_received"] > 0
        assert row["before"]["episodes"] == 1 and row["base"] == "base-round0"
        assert row["candidate_version"].endswith("-round2")
        # the tiny model never succeeds, so its round-2 global is never worse: the gate promotes it
        assert row["promoted"] == row["candidate_version"] and row["rollout"], row
        assert (out / "hosts" / row["host"] / "state" / "policies" / "store.json").is_file()
    metrics = json.loads((out / "server" / "federated_metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2]
    assert all(c["outcome"] == "accepted" for r in metrics["rounds"][1:] for c in r["clients"].values())
    assert (out / "plots" / "success_before_after.png").is_file() and (out / "plots" / "server_eval_loss.png").is_file()
    assert "fleet mean success rate" in output

    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    policy = SmolVLAPolicy.from_pretrained(out / "server" / "checkpoints" / "round_2")
    assert sum(p.numel() for p in policy.parameters()) > 0


def test_sigint_mid_run_leaves_nothing_running(tmp_path: Path) -> None:
    """Interrupted while both hosts record (agents, rigs, zygotes, jobs, learning workers, SuperNodes and the
    SuperLink all up): the demo exits 130 and every process it started is gone."""
    marker = f"zk0-demo-{uuid.uuid4().hex}"
    started = time.monotonic()
    demo = start_demo(tmp_path / "demo", marker, "--rounds", "1")
    recording, lines = set(), []
    deadline = time.monotonic() + 600
    while len(recording) < 2:
        line = demo.stdout.readline()
        assert line and time.monotonic() < deadline, "".join(lines[-40:])
        lines.append(line)
        if "-> recording" in line:
            recording.add(line.split("]", 1)[1].split(":", 1)[0].strip())
    time.sleep(3)  # the jobs' children (writer, encoders) up as well
    assert len(marked_processes(marker)) > 5
    interrupted = time.monotonic()
    demo.send_signal(signal.SIGINT)
    output, _ = demo.communicate(timeout=300)
    print(f"SIGINT after {interrupted - started:.0f} s; the demo exited {time.monotonic() - interrupted:.0f} s later")
    assert demo.returncode == 130, "".join(lines) + output
    assert_nothing_left(marker)
