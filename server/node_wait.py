"""Waiting for a federation's nodes, and sampling them for a round.

A run needs a minimum of connected SuperNodes; it waits for them at most the round timeout, then ends with
`FederationAborted` (the ServerApp logs its reason as one line).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from enum import StrEnum

from flwr.serverapp import Grid

log = logging.getLogger("zk0.server")


class FederationAborted(RuntimeError):
    """The run cannot go on (too few nodes, too few valid statistics); `reason` is the one line logged."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class WaitVerdict(StrEnum):
    READY = "ready"
    WAIT = "wait"
    TIMED_OUT = "timed out"


def node_wait_verdict(connected: int, minimum: int, waited_s: float, timeout_s: float) -> WaitVerdict:
    """Go on with the nodes present once `minimum` are connected; give up after `timeout_s`."""
    if connected >= minimum:
        return WaitVerdict.READY
    return WaitVerdict.TIMED_OUT if waited_s >= timeout_s else WaitVerdict.WAIT


def wait_for_nodes(grid: Grid, minimum: int, timeout_s: float, *, clock: Callable[[], float] = time.monotonic,
                   sleep: Callable[[float], None] = time.sleep, poll_s: float = 1.0,
                   log_every_s: float = 30.0) -> list[int]:
    """The connected nodes, once at least `minimum` are; `FederationAborted` after `timeout_s` without them.

    Waiting is logged at most once per `log_every_s`, with the counts.
    """
    started, logged_at = clock(), None
    while True:
        node_ids = list(grid.get_node_ids())
        now = clock()
        verdict = node_wait_verdict(len(node_ids), minimum, now - started, timeout_s)
        if verdict == WaitVerdict.READY:
            return node_ids
        if verdict == WaitVerdict.TIMED_OUT:
            raise FederationAborted(f"{len(node_ids)} nodes connected, {minimum} needed: gave up after waiting "
                                    f"{now - started:.0f} s (nodes.round_timeout_s)")
        if logged_at is None or now - logged_at >= log_every_s:
            log.info("waiting for nodes: %d connected, %d needed (%.0f s of %.0f s)", len(node_ids), minimum,
                     now - started, timeout_s)
            logged_at = now
        sleep(poll_s)


def sample_nodes(grid: Grid, min_available: int, fraction: float, min_sampled: int, timeout_s: float) -> list[int]:
    """`fraction` of the connected nodes (at least `min_sampled`, at most all), once `min_available` are connected.

    One listing serves both the count and the sample: Flower's own helper lists twice and, when a node
    drops out in between, waits for a node count that no longer exists.
    """
    node_ids = wait_for_nodes(grid, min_available, timeout_s)
    return random.sample(node_ids, min(len(node_ids), max(int(len(node_ids) * fraction), min_sampled)))
