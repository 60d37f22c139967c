"""The simulation runtime's wrappers: each partition gets its host's zk0 node config, then zk0's own handlers run."""

from __future__ import annotations

from flwr.app import Context, MessageType, RecordDict

from zk0.agent import client_app as zk0_client
from zk0.cli.experiment_federation import simulation_apps
from zk0.server import server_app as zk0_server

NODES = [{"node-name": "picker", "dataset-roots": "/d/p"}, {"node-name": "pusher", "dataset-roots": "/d/q"}]


def context(partition: int) -> Context:
    return Context(run_id=1, node_id=100 + partition, node_config={"partition-id": partition, "num-partitions": 2},
                   state=RecordDict(), run_config={})


def test_each_partition_runs_zk0s_handlers_as_its_host(monkeypatch):
    seen = []
    for kind in ("query", "train", "evaluate"):
        monkeypatch.setattr(zk0_client, kind, lambda msg, ctx, kind=kind: seen.append((kind, dict(ctx.node_config))))
    _, client = simulation_apps({}, NODES)
    for partition, kind in ((1, MessageType.QUERY), (0, MessageType.TRAIN), (1, MessageType.EVALUATE)):
        client._registered_funcs[f"{kind}.default"](None, context(partition))  # as ClientApp.__call__ dispatches
    assert [(k, c["node-name"], c["dataset-roots"], c["partition-id"]) for k, c in seen] == [
        ("query", "pusher", "/d/q", 1), ("train", "picker", "/d/p", 0), ("evaluate", "pusher", "/d/q", 1)]


def test_the_server_runs_zk0s_main_with_the_arms_run_config(monkeypatch):
    seen = {}
    monkeypatch.setattr(zk0_server, "main", lambda grid, ctx: seen.update(ctx.run_config))
    server, _ = simulation_apps({"num-server-rounds": 10, "server-config": "/a/server.yaml"}, NODES)
    server._main(None, context(0))
    assert seen == {"num-server-rounds": 10, "server-config": "/a/server.yaml"}
