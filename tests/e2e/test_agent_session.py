"""A whole robot-host session through `zk0ctl` only, against a real SuperLink and ServerApp on loopback.

`zk0 agent --sim` with a federation section (TLS, a registered node key, its warm learning worker): record 2
episodes; a 3-round run starts and round 1 trains under the agent's lease; a recording started meanwhile
preempts it (the server records a partial update) and a rollout is refused while it records; a round asking
during that recording is declined ("recording in progress"); a later round trains in full; every global lands
in the agent's policy store; `zk0ctl validate --promote` promotes the last one; a rollout of the active policy
is estopped and cleared.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.e2e.conftest import REPO

pytestmark = pytest.mark.slow
TASK = "pick the red cube and place it in the bin"


def zk0ctl(run: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import sys; from zk0.agent.ctl import main; sys.exit(main())",
                           "--runtime-dir", str(run), *args], capture_output=True, text=True, timeout=120, cwd=REPO)


def status(run: Path) -> dict:
    result = zk0ctl(run, "status", "--json")
    return json.loads(result.stdout) if result.returncode == 0 else {}


def wait_for(run: Path, predicate, timeout_s: float, agent: subprocess.Popen, what: str) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        current = status(run)
        if current and predicate(current):
            return current
        assert agent.poll() is None, f"the agent exited while waiting for {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout_s:.0f} s; last status {current}"
        time.sleep(0.5)


def test_a_whole_host_session_through_zk0ctl(tmp_path: Path) -> None:
    from zk0.cli.fleet import LocalFleet
    from zk0.server.certs import ensure_federation_keys
    from zk0.server.config import load_server_config

    state, run = tmp_path / "state", tmp_path / "run"
    with LocalFleet(tmp_path / "fleet") as fleet:
        fleet.start_superlink()
        ensure_federation_keys(fleet.certs, [], ["arm1"])
        node_id = fleet.cli.register_node(fleet.certs.node_public_key("arm1"), name="arm1")
        config = yaml.safe_load((REPO / "configs" / "agent.yaml").read_text())
        config.update(datasets_root=str(state / "datasets"), control_address=f"ipc://{run}/unused.sock", idle={
            "quiet_time_s": 0, "max_load_per_core": None, "min_free_memory_mb": None, "require_ac_power": False})
        config["federation"] = {"superlink": fleet.spec.address, "root_certificates": str(fleet.certs.ca_cert),
                                "auth_private_key": str(fleet.certs.node_private_key("arm1")), "datasets": ["demo"],
                                "policy_store": str(state / "policies"), "node_name": "arm1"}
        (tmp_path / "agent.yaml").write_text(yaml.safe_dump(config))
        agent = subprocess.Popen([sys.executable, "-m", "zk0.cli", "agent", "--sim", "--config", str(tmp_path / "agent.yaml"),
                                  "--state-dir", str(state), "--runtime-dir", str(run)],
                                 cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
        try:
            wait_for(run, lambda s: s["state"] == "idle", 120, agent, "the agent")
            assert zk0ctl(run, "record", "start", "--dataset", "demo", "--task", TASK, "--episodes", "2",
                          "--episode-time-s", "3").returncode == 0
            done = wait_for(run, lambda s: s["state"] == "idle", 600, agent, "the first recording")
            assert done["reason"] == "session complete", done
            wait_for(run, lambda s: (s.get("federation") or {}).get("supernode", {}).get("running"), 600, agent,
                     "the SuperNode (after the learning worker answers)")
            fleet.node_ids["arm1"] = node_id
            fleet.wait_until_online()

            server_config = tmp_path / "server.yaml"
            server_config.write_text("training: {local_steps: 3000, batch_size: 2, eval_fraction: 0.5}\n"
                                     "evaluation: {max_samples: 16}\nnodes: {round_timeout_s: 900}\n")
            server = load_server_config(server_config, overrides={
                "rounds": 3, "model": "tiny", "run_dir": str(tmp_path / "server"), "min_nodes": 1,
                "eval_datasets": [str(state / "datasets" / "demo")]})
            result: dict = {}
            runner = threading.Thread(target=lambda: result.update(status=fleet.run(
                server.run_config(server_config), timeout_s=1800)))
            runner.start()

            # the worker's progress reaches the agent (heartbeat, then lease renewal: <= ~10 s behind): some steps
            # in, and with 3000 to do (~30 s here) round 1 cannot end before the recording starts
            training = wait_for(run, lambda s: ((s.get("lease") or {}).get("progress") or {}).get("step"), 900,
                                agent, "training progress under the lease")
            assert training["state"] == "training" and training["lease"]["holder"] == f"flower node {node_id}"
            assert 0 < training["lease"]["progress"]["step"] < training["lease"]["progress"]["steps"] == 3000
            preempt = zk0ctl(run, "record", "start", "--dataset", "demo", "--task", TASK, "--episodes", "1",
                             "--episode-time-s", "3")
            assert preempt.returncode == 0, preempt.stderr
            assert json.loads(preempt.stdout)["state"] == "recording"
            refused = zk0ctl(run, "rollout", "start", "--task", TASK)
            assert refused.returncode == 2 and "recording in progress" in refused.stderr
            wait_for(run, lambda s: s["state"] != "recording", 600, agent, "the preempting recording to end")
            runner.join(timeout=1800)
            assert result.get("status") == "finished:completed", result

            metrics = json.loads((tmp_path / "server" / "federated_metrics.json").read_text())
            clients = [c for r in metrics["rounds"] for c in r.get("clients", {}).values()]
            reasons = [c.get("reason", "") for c in clients]
            assert reasons[0].startswith("partial update") and "revoked: record started" in reasons[0], reasons
            assert clients[-1]["outcome"] == "accepted" and clients[-1]["metrics"]["steps"] == 3000, clients[-1]

            listing = zk0ctl(run, "policy", "list")
            assert listing.returncode == 0 and "round3" in listing.stdout, listing.stdout + listing.stderr
            version = next(line.split()[0] for line in listing.stdout.splitlines() if line.split()[0].endswith("round3"))
            assert zk0ctl(run, "validate", "--policy", version, "--episodes", "2", "--task", "pick_place_red",
                          "--promote").returncode == 0
            validated = wait_for(run, lambda s: s["state"] == "idle", 900, agent, "the validation")
            assert validated["reason"] == "validated: may be promoted", validated
            store = json.loads((state / "policies" / "store.json").read_text())
            assert store["active"] == version

            assert zk0ctl(run, "rollout", "start", "--task", TASK, "--episode-time-s", "60").returncode == 0
            wait_for(run, lambda s: s["job"] and "zk0 rollout: policy" in s["job"]["last_line"], 600, agent,
                     "the rollout to drive the arm")
            estop = zk0ctl(run, "estop")
            assert estop.returncode == 0 and json.loads(estop.stdout)["state"] == "estopped"
            stopped = wait_for(run, lambda s: s["job"] is None, 120, agent, "the estopped rollout to end")
            assert stopped["state"] == "estopped"
            assert zk0ctl(run, "record", "start", "--dataset", "demo", "--task", TASK).returncode == 2
            assert zk0ctl(run, "clear").returncode == 0 and status(run)["state"] == "idle"
        finally:
            agent.send_signal(signal.SIGTERM)
            output, _ = agent.communicate(timeout=180)
        assert agent.returncode == 0, output[-3000:]
