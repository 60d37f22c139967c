"""The zk0 ClientApp: what a host's SuperNode runs for each federation message.

The work itself (statistics, a round of training, evaluation and delivery to the policy store) is
zk0.agent.node_work's. Where it runs:
- with a learning worker (node config `learn-worker`: its address, see zk0.agent.learning_worker), the
  ClientApp relays the message to that long-lived process and returns its reply; the worker keeps the policy
  and data built between messages, and this process never imports torch or lerobot. A worker that is not
  answering, answers with an error or does not finish before the deadline makes the node decline the round
  (training) or fail the message with the reason (statistics, evaluation);
- without one, in this process, exactly as the worker would (Flower starts a fresh process per message, so
  everything is built again each time).

Training is gated either way: with an agent address configured, first take a training lease from the host's
agent (zk0.agent.lease); refused or unanswered, the node declines the round with the reason instead of
training. A lease revoked mid-training (an operator started recording) stops training between steps (a worker
is sent `stop`); the steps done so far go out as a partial update (FedProx tolerates partial work, the server
weighs it by its examples), or the round is declined if not one step was done.

Every reply's INFO_RECORD names the node (`node-name`) and, except a declined round's, its data (`dataset-id`,
a digest of the datasets' stable ids).

Node settings come from `context.node_config` (see zk0.agent.node): `dataset-roots` (comma-separated),
`policy-store` (its sibling `frame-cache/` keeps decoded frames across rounds, within `frame-cache-bytes`,
by default what the datasets' frames need), `device`, `agent-address` (the agent's control API; empty: train
without asking), `learn-worker` (empty: work in this process), `learn-worker-timeout` (seconds a message may
wait for the worker, default `WORKER_TIMEOUT_S`, the server's default round timeout), `node-name`, and `drill`,
a fault-injection drill (zk0.agent.node.DRILLS, described in zk0.agent.node_work) that makes this node send one
kind of bad reply so an operator can watch the server refuse or contain it.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from zk0.agent import lease
from zk0.agent.node import DRILLS
from zk0.learn.records import DATASET_ID, DECLINED, INFO_RECORD, METRICS_RECORD, NODE_NAME, PREEMPTED

app = ClientApp()

LEARN_WORKER = "learn-worker"
WORKER_TIMEOUT_S = 3600.0


def dataset_roots(context: Context) -> list[Path]:
    roots = [Path(p) for p in str(context.node_config.get("dataset-roots", "")).split(",") if p]
    if not roots:
        raise ValueError("node config has no dataset-roots")
    for root in roots:
        if not (root / "meta" / "info.json").is_file():
            raise ValueError(f"node dataset {root.name} is not a LeRobot dataset")
    return roots


def dataset_id(roots: list[Path]) -> str:
    """A digest naming this host's data for the server; reveals neither paths nor contents, and stays the
    same while the datasets are copied, touched or re-opened."""
    from zk0.learn.data import dataset_stable_id  # zk0.learn.data imports torch: only the working side pays it

    return hashlib.sha256(",".join(sorted(dataset_stable_id(r) for r in roots)).encode()).hexdigest()[:16]


def node_name(context: Context) -> str:
    return str(context.node_config.get("node-name", ""))


def node_info(context: Context) -> ConfigRecord:
    """The INFO_RECORD of every reply that carries data: who sent it, about which datasets."""
    return ConfigRecord({NODE_NAME: node_name(context), DATASET_ID: dataset_id(dataset_roots(context))})


def drill(context: Context) -> str:
    """The node's fault-injection drill, or "" for an honest node."""
    kind = str(context.node_config.get("drill", ""))
    if kind and kind not in DRILLS:
        raise ValueError(f"node config drill must be one of {', '.join(DRILLS)}, got {kind!r}")
    return kind


def worker_deadline(msg: Message, context: Context, now: float) -> float:
    """The monotonic time past which a message stops waiting for the worker: `learn-worker-timeout` from now,
    never after the message's own time to live."""
    timeout = float(context.node_config.get("learn-worker-timeout", WORKER_TIMEOUT_S))
    ttl_left = msg.metadata.created_at + msg.metadata.ttl - time.time()
    return now + max(0.0, min(timeout, ttl_left))


def work(kind: str, msg: Message, context: Context, should_stop: Callable[[], bool] = lambda: False,
         on_step: Callable[[int, float], None] | None = None) -> RecordDict | str:
    """The reply content for `msg`, from the node's learning worker if it has one, else computed here; a str
    is why the worker gave none. `on_step(steps_done, loss)` follows training (every step here, every
    heartbeat from a worker)."""
    address = str(context.node_config.get(LEARN_WORKER, ""))
    if not address:
        from zk0.agent import node_work

        return node_work.work(kind, msg.content, context, should_stop, on_step)
    from zk0.agent import worker_client

    reply = worker_client.call(address, kind, msg.content, context, worker_deadline(msg, context, time.monotonic()),
                               should_stop, on_step)
    return reply.reason if isinstance(reply, worker_client.WorkerFailure) else reply


def answer(kind: str, msg: Message, context: Context) -> Message:
    """The reply to a statistics query or an evaluation; a worker's failure fails the message with its reason."""
    content = work(kind, msg, context)
    if isinstance(content, str):
        raise RuntimeError(content)
    return Message(content, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    return answer("query", msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return answer("evaluate", msg, context)


def declined(msg: Message, context: Context, reason: str) -> Message:
    """The reply of a node that does not train this round: no update, only who and why (its datasets are
    not even opened)."""
    return Message(RecordDict({INFO_RECORD: ConfigRecord({NODE_NAME: node_name(context), DECLINED: reason})}),
                   reply_to=msg)


def train_round(msg: Message, context: Context, should_stop: Callable[[], bool],
                on_step: Callable[[int, float], None] | None = None) -> Message:
    """Train on the round's global until the step budget is spent or `should_stop()`: the reply with the update,
    or a declined reply saying why the learning worker gave none."""
    content = work("train", msg, context, should_stop, on_step)
    return declined(msg, context, content) if isinstance(content, str) else Message(content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    address = str(context.node_config.get("agent-address", ""))
    if not address:
        return train_round(msg, context, should_stop=lambda: False)
    budget = int(msg.content.config_records["config"]["local-steps"])
    held = lease.acquire(address, holder=f"flower node {context.node_id}")
    if isinstance(held, lease.LeaseRefusal):
        return declined(msg, context, f"training lease refused: {held.reason}")
    with held:
        reply = train_round(msg, context, held.should_stop,
                            on_step=lambda done, loss: held.report(lease.TrainingProgress(done, budget, loss)))
    if DECLINED in reply.content.config_records[INFO_RECORD]:
        return reply
    steps = int(reply.content.metric_records[METRICS_RECORD]["steps"])
    if held.lost_reason is None or steps == budget:
        return reply  # lost after the last step, if at all: a complete update
    if steps == 0:
        return declined(msg, context, held.lost_reason)
    reply.content.config_records[INFO_RECORD][PREEMPTED] = held.lost_reason
    return reply
