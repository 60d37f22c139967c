"""The learning worker: request validation (table and hypothesis fuzz, on the pure parser and on a live worker),
its results against the in-process path bit for bit (a real `zk0 learn-worker` process, warm across rounds),
lease revocation through it, and a ClientApp facing a worker that is down, hangs or lost its job."""

from __future__ import annotations

import argparse
import fcntl
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common.serde import recorddict_to_proto
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.agent.test_lease import NODE_ID, Agent, _context, _train_message, federation  # noqa: F401
from tests.server.flower_app import ListingGrid, pushed, serverapp_identity
from zk0.agent import client_app, learning_worker, node_work, worker_client
from zk0.learn import codec
from zk0.agent.learning_worker import KINDS, LearningWorker, WorkerRequest, check_allowed, parse_request
from zk0.learn.records import DECLINED, INFO_RECORD, METRICS_RECORD, PREEMPTED, UPDATE_RECORD


def _content(**records) -> bytes:
    return recorddict_to_proto(RecordDict(records)).SerializeToString()


def _header(**fields) -> bytes:
    return json.dumps(fields).encode()


GOOD = {"kind": "train", "job": "j1", "run_id": 3, "node_id": 9, "node_config": {"dataset-roots": "/d", "x": 1.5}}


# --- validation ---------------------------------------------------------------------------------------------

def test_well_formed_requests_parse() -> None:
    content = _content(config=ConfigRecord({"server-round": 2}), arrays=ArrayRecord({"w": Array(np.ones(3))}))
    request = parse_request([_header(**GOOD), content])
    assert (request.kind, request.job, request.run_id, request.node_id) == ("train", "j1", 3, 9)
    assert request.node_config == {"dataset-roots": "/d", "x": 1.5}
    assert request.content.config_records["config"]["server-round"] == 2
    assert request.context().run_id == 3 and request.context().node_config["x"] == 1.5
    assert parse_request([b'{"kind": "ping"}']) == WorkerRequest("ping")
    assert parse_request([b'{"kind": "stop", "job": "j1"}']) == WorkerRequest("stop", "j1")


@pytest.mark.parametrize("frames, error", [
    ([], "1 or 2 frames"),
    ([b"{}", b"", b""], "1 or 2 frames"),
    ([b"\xff\xfe"], "not JSON"),
    ([b"[1]"], '"kind" one of'),
    ([b'{"kind": "fire"}'], '"kind" one of'),
    ([b'{"kind": "ping"}', b"x"], "ping: takes no content"),
    ([b'{"kind": "stop"}'], '"job" must be'),
    ([_header(**GOOD)], "needs a content frame"),
    ([_header(**GOOD), b"\x0a\x05garbage"], "not a Flower RecordDict"),
    ([_header(**{**GOOD, "run_id": True}), _content()], '"run_id" must be'),
    ([_header(**{**GOOD, "node_id": -1}), _content()], '"node_id" must be'),
    ([_header(**{**GOOD, "job": "x" * 65}), _content()], '"job" must be'),
    ([_header(**{**GOOD, "node_config": [1]}), _content()], '"node_config" must be'),
    ([_header(**{**GOOD, "node_config": {"a": None}}), _content()], 'node_config "a"'),
    ([_header(**{**GOOD, "node_config": {"a": "x" * 5000}}), _content()], 'node_config "a"'),
    ([b" " * (learning_worker.MAX_HEADER_BYTES + 1)], "header over"),
])
def test_malformed_requests_are_refused_with_a_reason(frames, error) -> None:
    with pytest.raises(ValueError, match=error):
        parse_request(frames)


def test_oversized_content_is_refused() -> None:
    content = _content(arrays=ArrayRecord({"w": Array(np.ones(1000))}))
    with pytest.raises(ValueError, match="over this worker's 100"):
        parse_request([_header(**GOOD), content], max_request_bytes=100)


def test_a_worker_serves_only_its_datasets_and_store(tmp_path: Path) -> None:
    ds, other, store = tmp_path / "ds", tmp_path / "other", tmp_path / "policies"
    check_allowed({"dataset-roots": str(ds), "policy-store": str(store)}, [ds], store)
    check_allowed({"dataset-roots": str(other)}, [], None)  # a worker started without limits
    with pytest.raises(ValueError, match="dataset .*other is not served"):
        check_allowed({"dataset-roots": f"{ds},{other}", "policy-store": str(store)}, [ds], store)
    with pytest.raises(ValueError, match="another policy store"):
        check_allowed({"dataset-roots": str(ds), "policy-store": str(tmp_path / "elsewhere")}, [ds], store)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                           max_leaves=8)
headers = st.fixed_dictionaries({"kind": st.sampled_from(KINDS) | st.text(max_size=6)},
                                optional={"job": json_values | st.text(max_size=70), "run_id": json_values,
                                          "node_id": json_values, "node_config": json_values | st.dictionaries(
                                              st.text(max_size=8), json_values, max_size=4)})
contents = st.binary(max_size=64) | st.builds(
    lambda config: _content(config=ConfigRecord(config)),
    st.dictionaries(st.sampled_from(["model", "seed", "server-round", "lr", "frozen-sha256"]),
                    st.integers(-3, 3) | st.text(max_size=4), max_size=5))
requests = st.one_of(
    st.lists(st.binary(max_size=32), max_size=3),
    st.tuples(headers.map(lambda h: json.dumps(h).encode())).map(list),
    st.tuples(headers.map(lambda h: json.dumps(h).encode()), contents).map(list),
)


@given(requests)
@settings(max_examples=400, deadline=None)
def test_fuzzed_requests_parse_or_are_refused(frames) -> None:
    try:
        request = parse_request(frames, max_request_bytes=1 << 12)
    except ValueError:
        return
    assert request.kind in KINDS


@pytest.fixture
def live_worker(tmp_path: Path) -> Iterator[tuple[str, LearningWorker]]:
    """A worker serving from a thread of this process, allowed only a dataset that does not exist."""
    address = f"ipc://{tmp_path}/worker.sock"
    worker = LearningWorker(address, datasets=[tmp_path / "ds"], max_request_bytes=1 << 12)
    stop = threading.Event()
    thread = threading.Thread(target=worker.serve, args=(stop,), daemon=True)
    thread.start()
    assert learning_worker.wait_until_ready(address, 30)
    yield address, worker
    stop.set()
    thread.join()
    worker.close()


def _ask(context: zmq.Context, address: str, frames: list[bytes]) -> dict:
    reply = worker_client.exchange(context, address, frames, 10.0)
    assert reply is not None, f"no reply to {frames!r}"
    return json.loads(reply[0])


@given(frames=requests)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_a_live_worker_answers_every_fuzzed_request_and_keeps_serving(live_worker, frames) -> None:
    address, _ = live_worker
    context = zmq.Context()
    try:
        answer = _ask(context, address, frames or [b""])  # ZeroMQ cannot send an empty multipart message
        assert isinstance(answer["ok"], bool) and (answer["ok"] or isinstance(answer["error"], str))
        deadline = time.monotonic() + 10
        while (ping := _ask(context, address, [b'{"kind": "ping"}']))["job"] is not None:  # a job's error is on its way
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert ping["ok"]
    finally:
        context.term()


def test_jobs_that_fail_or_overflow_get_error_replies(live_worker, tmp_path: Path) -> None:
    address, _ = live_worker
    context = zmq.Context()
    try:
        header = {**GOOD, "node_config": {"dataset-roots": str(tmp_path / "ds")}}
        failed = _ask(context, address, [_header(**header), _content()])
        assert failed == {"ok": False, "error": "train failed: KeyError: 'config'"}  # the message had no config
        big = _ask(context, address, [_header(**header), b"\0" * 5000])
        assert not big["ok"] and "over this worker's 4096" in big["error"]
        refused = _ask(context, address, [_header(**GOOD), _content()])
        assert refused == {"ok": False, "error": "dataset /d is not served by this learning worker"}
    finally:
        context.term()


# --- a real worker process against the in-process path ------------------------------------------------------

@pytest.fixture(scope="module")
def worker_process(federation, tmp_path_factory) -> Iterator[str]:  # noqa: F811
    root = federation[0]
    address = f"ipc://{tmp_path_factory.mktemp('worker')}/learn.sock"
    command = learning_worker.worker_command(address, [root])
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert learning_worker.wait_until_ready(address, 180, alive=lambda: process.poll() is None), process.stderr.read()
        yield address
    finally:
        process.terminate()
        process.wait(timeout=60)


def _comparable(reply) -> tuple:
    """A train reply's update bytes and metrics, less the wall time, which no two runs share."""
    metrics = {k: v for k, v in reply.content.metric_records[METRICS_RECORD].items() if k != "train-seconds"}
    return codec.from_array_record(reply.content.array_records[UPDATE_RECORD]), metrics, dict(reply.content[INFO_RECORD])


def test_worker_results_equal_the_in_process_results_bit_for_bit(federation, worker_process, tmp_path: Path) -> None:  # noqa: F811
    root, strategy, arrays = federation
    local = {"dataset-roots": str(root), "policy-store": str(tmp_path / "local" / "policies"), "node-name": "kitchen"}
    remote = {**local, "policy-store": str(tmp_path / "remote" / "policies"), client_app.LEARN_WORKER: worker_process}
    built = worker_client.ping(worker_process)["built"]
    for server_round in (1, 2):  # round 2 reuses the worker's session; in process it is built afresh, as in Flower
        msg = _train_message(strategy, arrays, server_round, local_steps=3)
        node_work._session = None
        expected = client_app.train(msg, _context(local))
        got = client_app.train(msg, _context(remote))
        assert _comparable(got) == _comparable(expected)
        assert got.content.metric_records[METRICS_RECORD]["steps"] == 3
    assert worker_client.ping(worker_process)["built"] == built + 1  # built once, for round 1

    with serverapp_identity():
        [msg] = pushed(strategy.configure_evaluate(2, arrays, ConfigRecord(), ListingGrid([NODE_ID])))
    node_work._session = None
    expected, got = client_app.evaluate(msg, _context(local)), client_app.evaluate(msg, _context(remote))
    without_time = [{k: v for k, v in r.content.metric_records[METRICS_RECORD].items() if k != "eval-seconds"}
                    for r in (expected, got)]
    assert without_time[0] == without_time[1] and without_time[0]["num-examples"] > 0
    assert (tmp_path / "remote" / "policies" / "versions" / "run1-round2").is_dir()
    assert worker_client.ping(worker_process)["built"] == built + 1

    stats = [client_app.query(msg, _context(c)).content for c in (local, remote)]  # the query reads no content
    assert stats[0]["norm-stats"]["observation.state/mean"].numpy().tobytes() == \
        stats[1]["norm-stats"]["observation.state/mean"].numpy().tobytes()


def test_a_revoked_lease_stops_the_worker_with_a_partial_update(federation, worker_process, tmp_path: Path) -> None:  # noqa: F811
    """The agent's real core grants the lease; once the worker's progress has reached the agent (worker ->
    ClientApp heartbeat -> lease renewal -> the agent's status), an operator pauses training, long before the
    100000-step budget is spent: the ClientApp stops the worker's job."""
    root, strategy, arrays = federation
    agent_address = f"ipc://{tmp_path}/agent.sock"
    agent = Agent(agent_address)
    seen: list[dict] = []

    def pause_once_progress_shows() -> None:
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline:
            progress = (agent.operator("status").get("lease") or {}).get("progress")
            if progress and progress["step"] > 0:
                seen.append(progress)
                break
            time.sleep(0.1)
        agent.operator("train", "pause")

    operator = threading.Thread(target=pause_once_progress_shows)
    try:
        msg = _train_message(strategy, arrays, 3, local_steps=100_000)
        operator.start()
        reply = client_app.train(msg, _context({"dataset-roots": str(root), "policy-store": str(tmp_path / "p"),
                                                "agent-address": agent_address,
                                                client_app.LEARN_WORKER: worker_process}))
    finally:
        operator.join()
        agent.close()
    steps = reply.content.metric_records[METRICS_RECORD]["steps"]
    assert seen and seen[0]["steps"] == 100_000 and seen[0]["loss"] > 0
    assert seen[0]["step"] <= steps < 100_000
    assert reply.content.config_records[INFO_RECORD][PREEMPTED] == \
        "lease revoked by the agent: revoked: training paused by the operator"
    assert worker_client.ping(worker_process)["job"] is None


# --- a worker that is down, hangs or forgets ----------------------------------------------------------------

class FakeWorker:
    """A ROUTER socket that answers pings (saying it runs `job`, or the job it was last sent) and never a job."""

    def __init__(self, address: str, forget: bool = False) -> None:
        self.forget, self.seen = forget, []
        self._stop = threading.Event()
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.bind(address)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        job = None
        while not self._stop.is_set():
            if not self._socket.poll(50):
                continue
            peer, _, header, *rest = self._socket.recv_multipart()
            request = json.loads(header)
            self.seen.append(request["kind"])
            if request["kind"] in ("ping", "stop"):
                self._socket.send_multipart([peer, b"", json.dumps({"ok": True, "job": None if self.forget else job}).encode()])
            else:
                job = request["job"]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._socket.close()
        self._context.term()


def _message(strategy, arrays):
    return _train_message(strategy, arrays, 1, local_steps=3)


def test_a_worker_that_is_down_declines_the_round_and_fails_other_messages(federation, tmp_path: Path) -> None:  # noqa: F811
    _, strategy, arrays = federation
    nobody = f"ipc://{tmp_path}/nobody.sock"
    config = {"dataset-roots": str(tmp_path / "none"), "node-name": "arm1", client_app.LEARN_WORKER: nobody}
    started = time.monotonic()
    reply = client_app.train(_message(strategy, arrays), _context(config))
    assert dict(reply.content[INFO_RECORD]) == {"node-name": "arm1", DECLINED: f"no learning worker answering at {nobody}"}
    assert time.monotonic() - started < worker_client.PING_TIMEOUT_S + 2
    with serverapp_identity():
        [msg] = pushed(strategy.configure_evaluate(1, arrays, ConfigRecord(), ListingGrid([NODE_ID])))
    with pytest.raises(RuntimeError, match="no learning worker answering"):
        client_app.evaluate(msg, _context(config))


def test_a_hanging_worker_is_given_up_at_the_deadline_and_told_to_stop(federation, tmp_path: Path) -> None:  # noqa: F811
    _, strategy, arrays = federation
    address = f"ipc://{tmp_path}/hang.sock"
    fake = FakeWorker(address)
    try:
        started = time.monotonic()
        reply = client_app.train(_message(strategy, arrays), _context({
            client_app.LEARN_WORKER: address, "learn-worker-timeout": 1.0, "node-name": "arm1"}))
        waited = time.monotonic() - started
    finally:
        fake.close()
    assert reply.content[INFO_RECORD][DECLINED] == f"the learning worker at {address} did not finish the train job in time"
    assert 1.0 <= waited < 3.0 and fake.seen == ["ping", "train", "stop"]


@pytest.mark.slow
def test_a_job_that_ignores_its_stop_makes_the_worker_exit_for_a_fresh_one(federation, tmp_path: Path) -> None:  # noqa: F811
    """A real worker's evaluate job blocks on the policy store's lock, held by another process (a `zk0 policy
    prune` stalled on a disk, say), where no stop flag is read. Told to stop at the message's deadline, it
    cannot; within its grace period the worker exits with EXIT_JOB_STUCK, for its supervisor to start a fresh
    one, rather than refusing every later message as busy."""
    root, strategy, arrays = federation
    store = tmp_path / "policies"
    store.mkdir()
    address = f"ipc://{tmp_path}/stuck.sock"
    process = subprocess.Popen(learning_worker.worker_command(address, [root], store, stop_grace_s=1.0),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        with open(store / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            assert learning_worker.wait_until_ready(address, 180, alive=lambda: process.poll() is None)
            with serverapp_identity():
                [msg] = pushed(strategy.configure_evaluate(1, arrays, ConfigRecord(), ListingGrid([NODE_ID])))
            config = {"dataset-roots": str(root), "policy-store": str(store), "learn-worker-timeout": 30.0,
                      client_app.LEARN_WORKER: address}
            with pytest.raises(RuntimeError, match="did not finish the evaluate job in time"):
                client_app.evaluate(msg, _context(config))
            assert process.wait(timeout=30) == learning_worker.EXIT_JOB_STUCK
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "ignored its stop for 1 s: exiting so that a fresh worker takes over" in process.stderr.read()


@pytest.mark.parametrize("grace", [0.0, -5.0])
def test_a_grace_that_is_not_positive_is_refused(grace, tmp_path: Path, capsys) -> None:
    parser = argparse.ArgumentParser()
    learning_worker.add_arguments(parser)
    args = parser.parse_args(["--socket", f"ipc://{tmp_path}/w.sock", "--stop-grace-s", str(grace)])
    assert learning_worker.run(args) == 2
    assert f"--stop-grace-s must be positive, not {grace}" in capsys.readouterr().err
    assert not (tmp_path / "w.sock").exists()  # refused before serving


@pytest.mark.parametrize("asked, now, stuck", [(None, 1e9, False), (100.0, 219.9, False), (100.0, 220.1, True)])
def test_a_job_is_stuck_only_once_it_ignored_a_stop_past_the_grace(asked, now, stuck) -> None:
    assert learning_worker.stuck(asked, now, grace_s=120.0) is stuck


def test_a_worker_that_lost_the_job_is_noticed_at_the_next_heartbeat(federation, tmp_path: Path, monkeypatch) -> None:  # noqa: F811
    _, strategy, arrays = federation
    monkeypatch.setattr(worker_client, "HEARTBEAT_S", 0.2)
    address = f"ipc://{tmp_path}/forgets.sock"
    fake = FakeWorker(address, forget=True)
    try:
        reply = client_app.train(_message(strategy, arrays), _context({client_app.LEARN_WORKER: address}))
    finally:
        fake.close()
    assert reply.content[INFO_RECORD][DECLINED] == f"the learning worker at {address} lost the train job (restarted?)"


def test_the_relaying_client_app_never_imports_torch() -> None:
    code = ("import sys, zk0.agent.client_app, zk0.agent.learning_worker, zk0.agent.worker_client; "
            "assert not {'torch', 'lerobot'} & set(sys.modules), sorted(m for m in sys.modules if m.startswith('torch'))")
    subprocess.run([sys.executable, "-c", code], check=True)
