"""`zk0ctl`: control a running zk0 agent process over its ZeroMQ control API.

  zk0ctl status                 what the agent is doing
  zk0ctl save|discard|rerecord  end the episode being recorded that way
  zk0ctl stop                   save the current episode and end the session
  zk0ctl estop                  emergency stop of a rollout: hold the arm now, torque off after the hold
  zk0ctl pause|resume           take the arm from a rollout's policy (it holds) and give it back
  zk0ctl correct|release        while paused: drive the arm with the leader (DAgger correction), and stop
  zk0ctl verdict success|fail   the verdict of the validation episode on the robot (ends it)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from zk0.agent.control import DEFAULT_CONTROL_ADDRESS, request

COMMANDS = ("status", "save", "discard", "rerecord", "stop", "estop", "pause", "resume", "correct", "release", "verdict")
# The commands that take a value, and the argument it becomes.
VALUE_ARGUMENT = {"verdict": "outcome"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zk0ctl", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("value", nargs="?", help="verdict: success or fail")
    parser.add_argument("--address", default=os.environ.get("ZK0_CONTROL_ADDRESS", DEFAULT_CONTROL_ADDRESS),
                        help="agent control address (default: $ZK0_CONTROL_ADDRESS or %(default)s)")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the agent")
    args = parser.parse_args(argv)
    if (args.value is None) == (args.command in VALUE_ARGUMENT):
        parser.error(f"{args.command} takes a value" if args.value is None else f"{args.command} takes no value")
    arguments = {VALUE_ARGUMENT[args.command]: args.value} if args.value is not None else None
    try:
        reply = request(args.address, args.command, args.timeout, arguments)
    except TimeoutError as exc:
        print(f"zk0ctl: {exc}", file=sys.stderr)
        return 1
    if not reply.get("ok"):
        print(f"zk0ctl: {reply.get('error', 'the agent refused the command')}", file=sys.stderr)
        return 2
    reply.pop("ok")
    print(json.dumps(reply, indent=2))
    return 0
