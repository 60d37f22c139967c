"""A SuperNode that dies in the middle of a round: a real SuperLink and three real SuperNodes (TLS, node auth,
the tiny model); one is killed outright (SIGKILL to it and its ClientApp processes, as a crash or a power cut
would) right after the server sent it round 1's training message.

The SuperLink notices the silence by its missing heartbeats and answers for the node with an error reply;
the round completes with the two others, the next round runs with them alone, and the run finishes.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from zk0.server.config import load_server_config
from zk0.cli.fleet import LocalFleet
from zk0.common.flower_process import ManagedProcess
from zk0.server.launch import wait_for_run, write_app_dir
from zk0.server.strategy import node_label


def _crash(process: ManagedProcess) -> None:
    for pid in [process.process.pid, *process.descendants()]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.process.wait()


@pytest.mark.slow
def test_a_node_killed_mid_round_is_left_out_and_the_run_finishes(tmp_path, datasets, fast_config):
    run = tmp_path / "run"
    config = load_server_config(fast_config, overrides={
        "rounds": 2, "model": "tiny", "run_dir": str(run), "eval_datasets": [str(d) for d in datasets],
        "min_nodes": 2})
    with LocalFleet(tmp_path / "fleet") as fleet:
        fleet.start_superlink()
        survivors = {fleet.add_node(f"n{i}", [root], tmp_path / f"policies{i}") for i, root in enumerate(datasets)}
        victim = fleet.add_node("victim", [datasets[0]], tmp_path / "policies-victim")
        fleet.wait_until_online()
        run_id = fleet.cli.start_run(write_app_dir(tmp_path / "fleet" / "app", config.run_config(fast_config)))
        deadline = time.monotonic() + 900
        sent = f"round 1: {node_label(victim, 'victim')} trains with"
        while not ((run / "server.log").exists() and sent in (run / "server.log").read_text()):
            assert time.monotonic() < deadline, "round 1 never started"
            time.sleep(0.5)
        _crash(fleet.supernodes[2])
        status = wait_for_run(fleet.cli, run_id, timeout_s=1200)
    assert status == "finished:completed"

    rounds = {e["round"]: e for e in json.loads((run / "federated_metrics.json").read_text())["rounds"]}
    assert sorted(rounds) == [0, 1, 2]
    first, second = rounds[1]["clients"], rounds[2]["clients"]
    # round 1: the two survivors' updates make the round; the victim is recorded as lost, with Flower's reason
    assert {int(n) for n, c in first.items() if c["accepted"]} == survivors
    assert set(first) == {str(n) for n in survivors | {victim}}
    assert first[str(victim)]["outcome"] == "lost" and "Node Unavailable" in first[str(victim)]["reason"]
    assert first[str(victim)]["name"] == "victim"  # the name fleet gave it, known from its statistics answer
    assert rounds[1]["train"]["accepted-updates"] == 2
    # round 2 runs with the survivors alone
    assert {int(n) for n in second} == survivors and all(c["accepted"] for c in second.values())
    assert (run / "checkpoints" / "round_2").is_dir()
    log = (run / "server.log").read_text()
    assert f"round 1: {node_label(victim, 'victim')} lost, the round goes on without it" in log
    assert "round 1: server eval loss" in log and "2/3 updates accepted, 1 lost" in log
