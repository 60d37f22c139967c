"""Flower's deployment engine as zk0 drives it: a real SuperLink and two real SuperNodes on loopback,
TLS with a fresh CA, SuperNode authentication, `flwr run` of an app, two rounds, everything stopped.

The app here is a one-array FedAvg so the test proves the process plumbing alone; the zk0 app on the
learning core runs over the same plumbing in test_fleet.py.
"""

import json
import textwrap

import pytest

from zk0.agent.node import NodeSettings, supernode_command
from zk0.server.certs import create_node_key
from zk0.cli.fleet import LocalFleet
from zk0.common.flower_process import ManagedProcess, free_port

PROBE_APP = textwrap.dedent('''
    import json
    import numpy as np
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.serverapp.strategy import FedAvg

    client = ClientApp()

    @client.train()
    def train(msg, context):
        arrays = [a + 1.0 for a in msg.content["arrays"].to_numpy_ndarrays()]
        root = sum(ord(c) for c in context.node_config["dataset-roots"]) % 1000
        metrics = MetricRecord({"num-examples": 1, "root-tag": float(root)})
        return Message(RecordDict({"arrays": ArrayRecord(arrays), "metrics": metrics}), reply_to=msg)

    @client.evaluate()
    def evaluate(msg, context):
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1, "loss": 0.0})}), reply_to=msg)

    server = ServerApp()

    @server.main()
    def main(grid, context):
        result = FedAvg().start(grid=grid, initial_arrays=ArrayRecord([np.zeros(3)]),
                                num_rounds=int(context.run_config["num-server-rounds"]), timeout=120)
        final = result.arrays.to_numpy_ndarrays()[0].tolist()
        with open(context.run_config["result-path"], "w") as f:
            json.dump({"final": final, "nodes": sorted(grid.get_node_ids())}, f)
''')


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for a reaper)."""
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_superlink_and_two_supernodes_with_tls_and_node_auth(tmp_path):
    result_path = tmp_path / "result.json"
    with LocalFleet(tmp_path / "fleet") as fleet:
        fleet.start_superlink()
        for name in ("a", "b"):
            fleet.add_node(name, [tmp_path / f"data_{name}"], tmp_path / f"policies_{name}")
        # A node with a valid TLS root but a key the SuperLink never registered must not join.
        create_node_key(fleet.certs, "intruder")
        intruder = ManagedProcess("intruder", supernode_command(NodeSettings(
            superlink=fleet.spec.address, datasets=[tmp_path / "x"], policy_store=tmp_path / "p",
            root_certificates=fleet.certs.ca_cert, auth_private_key=fleet.certs.node_private_key("intruder"),
        ), runtime_port=free_port()), tmp_path / "intruder.log")
        status = fleet.run(
            {"num-server-rounds": 2, "result-path": str(result_path)}, timeout_s=240,
            components={"serverapp": "probe_app:server", "clientapp": "probe_app:client"},
            app_files={"probe_app.py": PROBE_APP},
        )
        processes = [fleet.superlink, *fleet.supernodes, intruder]
        started = [pid for p in processes for pid in (p.process.pid, *p.descendants())]
        superlink_log = (tmp_path / "fleet" / "logs" / "superlink.log").read_text()
        intruder.stop()
    assert status == "finished:completed"
    result = json.loads(result_path.read_text())
    assert result["final"] == [2.0, 2.0, 2.0]  # two rounds of +1, averaged over both nodes
    assert len(result["nodes"]) == 2  # the unregistered intruder never became a node
    assert "https://127.0.0.1" in superlink_log  # served over TLS
    assert len(started) > len(processes)  # SuperExec and app processes ran below the Flower servers
    assert not [pid for pid in started if _alive(pid)]  # and every one of them is gone

