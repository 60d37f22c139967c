"""Outside input to the agent never crashes or stalls it: hypothesis-generated control messages (random JSON,
wrong types, binary, huge and multipart payloads) against the agent's real command table and core on a real
socket, and random config files against the config loader (each is a clear ConfigError or a valid config)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import pytest
import yaml
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zk0.agent.control import MAX_REQUEST_BYTES, ControlServer, request
from zk0.agent.daemon import sim_defaults
from zk0.agent.daemon_core import COMMANDS, AgentCore, AgentPaths
from zk0.agent.daemon_state import State
from zk0.agent.events import EventPublisher

SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                                         max_size=4), max_leaves=12)
OVERSIZED = st.integers(MAX_REQUEST_BYTES + 1, 4 * MAX_REQUEST_BYTES)


def messages(commands: Iterable[str]) -> st.SearchStrategy[list[bytes]]:
    """Control messages (each a list of ZeroMQ frames): binary, random JSON, requests naming one of `commands` or
    none with random arguments, requests over the size limit, and multipart messages (a request split in two,
    or frames that were each a message, some of them over the limit)."""
    frame = st.one_of(
        st.binary(max_size=200),
        JSON.map(lambda value: json.dumps(value).encode()),
        st.fixed_dictionaries({"command": st.sampled_from(sorted(commands)) | st.text(max_size=10)},
                              optional={"args": JSON}).map(lambda value: json.dumps(value).encode()),
    )
    oversized = OVERSIZED.map(lambda n: json.dumps({"command": "status", "args": {"padding": "x" * n}}).encode()) \
        | OVERSIZED.map(lambda n: b"\xff" * n)
    split = frame.flatmap(lambda raw: st.integers(0, len(raw)).map(lambda at: [raw[:at], raw[at:]]))
    return st.one_of(frame.map(lambda raw: [raw]), oversized.map(lambda raw: [raw]), split,
                     st.lists(frame, min_size=2, max_size=4), st.lists(frame | oversized, min_size=2, max_size=4))


def exchange(address: str, frames: list[bytes], timeout_s: float = 5.0) -> dict:
    """Send one message (its `frames`) on a fresh REQ socket; the reply, checked to be a well-formed answer that
    refuses what the server cannot take. AssertionError when none comes within `timeout_s`."""
    socket = zmq.Context.instance().socket(zmq.REQ)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(address)
    try:
        socket.send_multipart(frames)
        assert socket.poll(int(timeout_s * 1000)), f"no reply within {timeout_s} s"
        reply = json.loads(socket.recv())
    finally:
        socket.close()
    assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool), reply
    assert reply["ok"] or isinstance(reply.get("error"), str), reply
    assert not str(reply.get("error", "")).startswith("internal error"), reply  # refused, never a failing handler
    if sum(map(len, frames)) > MAX_REQUEST_BYTES:
        assert reply["ok"] is False and "byte limit" in reply["error"], reply
    return reply


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    """The agent's real core and command table on a real socket. Each example starts from ESTOPPED, where every
    job start is refused, so a generated well-formed `record start` never starts a recording on this machine
    (one message per example: a generated `clear` cannot be followed by a start)."""
    from zk0.agent.config import parse_config

    root = tmp_path_factory.mktemp("agent")
    paths = AgentPaths(root / "state", root / "run")
    paths.runtime_dir.mkdir(parents=True)
    events = EventPublisher(paths.events)
    core = AgentCore(parse_config(sim_defaults(paths.state_dir)), paths, True, root / "policies", events.publish)
    server = ControlServer(paths.control, COMMANDS, core.handle)
    yield paths.control, core
    server.close()
    events.close()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frames=messages(COMMANDS))
def test_any_message_gets_a_reply_and_the_agent_keeps_answering(agent, frames: list[bytes]) -> None:
    address, core = agent
    core.state = State.ESTOPPED
    exchange(address, frames)
    assert core.job is None


def test_huge_and_multipart_requests_are_answered(agent) -> None:
    address, core = agent
    core.state = State.ESTOPPED
    reply = request(address, "status", args={"padding": "x" * 200_000})
    assert reply["ok"] is False and "byte limit" in reply["error"]
    socket = zmq.Context.instance().socket(zmq.REQ)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(address)
    try:
        socket.send_multipart([b'{"command": ', b'"status"}'])
        assert socket.poll(5000) and json.loads(socket.recv())["state"] == "estopped"
    finally:
        socket.close()
    assert request(address, "status")["ok"] is True


CONFIG_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                             | st.dictionaries(st.sampled_from(["port", "id", "idle", "training_hours", "fps", "daily",
                                                                "cameras", "record", "x"]), inner, max_size=3),
                             max_leaves=10)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["host_id", "robot_type", "follower", "leader", "cameras", "record", "safety",
                                        "idle", "rollout", "validation", "federation", "datasets_root", "bogus"]),
                       CONFIG_VALUES, max_size=8) | st.text(max_size=200))
def test_random_config_files_are_valid_or_one_clear_error(tmp_path_factory, content) -> None:
    from zk0.agent.config import ConfigError, load_config

    path = tmp_path_factory.mktemp("config") / "agent.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    try:
        load_config(path, check_devices=False)
    except ConfigError as error:
        assert str(error) and "\n" not in str(error).strip()
