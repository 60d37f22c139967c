"""`zk0ctl`: control the zk0 agent (or a standalone `zk0 record|rollout|validate`) over its control API.

  zk0ctl status                                   what the agent is doing (prints the state, e.g. idle)
  zk0ctl record start --dataset D --task T [--episodes N] [--episode-time-s S] [--seed N]
  zk0ctl record stop|save|discard|rerecord        end the session, or the episode being recorded that way
  zk0ctl save|discard|rerecord|stop               the same, short (also what `zk0 record` understands)
  zk0ctl train now|pause|resume                   train now (once, outside the hours), stop lending, lend again
  zk0ctl policy list | promote VERSION [--reason R] | rollback [--reason R]
  zk0ctl validate --policy V [--against A] [--episodes N] [--task T ...] [--promote]
  zk0ctl verdict success|fail                     the verdict of the validation episode on the robot (ends it)
  zk0ctl rollout start --task T [--policy P] [--episodes N] [--dagger] [--record D] | rollout stop
  zk0ctl pause|resume|correct|release             take over a rollout with the leader arm (DAgger)
  zk0ctl estop                                    emergency stop: hold the arm now, torque off after the hold
  zk0ctl clear                                    back to idle after a fault or an estop, once the robot is checked
  zk0ctl events                                   follow the agent's event stream (one JSON object per line)

The agent listens at `<runtime-dir>/agent.sock` (`--runtime-dir`, default /run/zk0); `--address` names any other
control address (e.g. a standalone recorder's `control_address`). Exit status: 0 done, 1 nothing answered,
2 the agent refused (the reason is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from zk0.agent.control import DEFAULT_CONTROL_ADDRESS, request

SIMPLE = ("status", "save", "discard", "rerecord", "stop", "estop", "clear", "pause", "resume", "correct", "release")


def _parser() -> argparse.ArgumentParser:
    # The connection options go before or after the command (`zk0ctl --address A estop`, `zk0ctl estop --address A`):
    # both parsers know them, neither sets a default that would overwrite the other's value.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--runtime-dir", type=Path, default=argparse.SUPPRESS, help="the agent's runtime dir (its sockets)")
    common.add_argument("--address", default=argparse.SUPPRESS,
                        help="control address (default: $ZK0_CONTROL_ADDRESS, else the runtime dir's agent.sock, "
                             f"else {DEFAULT_CONTROL_ADDRESS})")
    common.add_argument("--timeout", type=float, default=argparse.SUPPRESS, help="seconds to wait (default 5)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="status: the whole reply as JSON")
    parser = argparse.ArgumentParser(prog="zk0ctl", description=__doc__.splitlines()[0], parents=[common],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:15]))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common])

    for name in SIMPLE:
        command(name)
    record = command("record")
    record.add_argument("action", choices=("start", "stop", "save", "discard", "rerecord"))
    record.add_argument("--dataset")
    record.add_argument("--task")
    record.add_argument("--episodes", type=int)
    record.add_argument("--episode-time-s", type=float)
    record.add_argument("--seed", type=int)
    train = command("train")
    train.add_argument("action", choices=("now", "pause", "resume"))
    policy = command("policy")
    policy.add_argument("action", choices=("list", "promote", "rollback"))
    policy.add_argument("version", nargs="?")
    policy.add_argument("--reason")
    validate = command("validate")
    validate.add_argument("--policy", required=True)
    validate.add_argument("--against")
    validate.add_argument("--episodes", type=int)
    validate.add_argument("--task", action="append", dest="tasks")
    validate.add_argument("--promote", action="store_true")
    verdict = command("verdict")
    verdict.add_argument("outcome", help="success or fail")
    rollout = command("rollout")
    rollout.add_argument("action", choices=("start", "stop"))
    rollout.add_argument("--task")
    rollout.add_argument("--policy")
    rollout.add_argument("--episodes", type=int)
    rollout.add_argument("--episode-time-s", type=float)
    rollout.add_argument("--dagger", action="store_true")
    rollout.add_argument("--record")
    command("events")
    return parser


def request_of(args: argparse.Namespace) -> tuple[str, dict[str, Any] | None]:
    """The control request a parsed command line stands for: (command, args or None)."""
    if args.command in SIMPLE:
        return args.command, None
    if args.command == "verdict":
        return "verdict", {"outcome": args.outcome}
    if args.command == "record" and args.action != "start":
        return args.action, None  # the session commands a standalone `zk0 record` understands too
    # `is not`: 0 == False, and `--seed 0` is a value
    fields = {key: value for key, value in vars(args).items() if value is not None and value is not False
              and key not in ("command", "runtime_dir", "address", "timeout", "json")}
    return args.command, fields


def _address(args: argparse.Namespace) -> str:
    if getattr(args, "address", None):
        return args.address
    if getattr(args, "runtime_dir", None):
        return f"ipc://{args.runtime_dir / 'agent.sock'}"
    return os.environ.get("ZK0_CONTROL_ADDRESS", DEFAULT_CONTROL_ADDRESS)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    address = _address(args)
    if args.command == "events":
        return _follow(address)
    command, arguments = request_of(args)
    try:
        reply = request(address, command, getattr(args, "timeout", 5.0), arguments)
    except TimeoutError as exc:
        print(f"zk0ctl: {exc}", file=sys.stderr)
        return 1
    if not reply.get("ok"):
        print(f"zk0ctl: {reply.get('error', 'the agent refused the command')}", file=sys.stderr)
        return 2
    reply.pop("ok")
    if command == "status" and "state" in reply and not getattr(args, "json", False):
        print(reply["state"])  # what scripts and people check first; --json for the rest
    elif "output" in reply:
        print(reply["output"], end="")
    else:
        print(json.dumps(reply, indent=2))
    return 0


def _follow(address: str) -> int:
    """Print the agent's events as they come; the agent's status names its event stream."""
    from zk0.agent.events import follow

    try:
        events = request(address, "status", 5.0).get("events")
    except TimeoutError as exc:
        print(f"zk0ctl: {exc}", file=sys.stderr)
        return 1
    if not events:
        print(f"zk0ctl: {address} has no event stream (a standalone command, not the zk0 agent)", file=sys.stderr)
        return 2
    try:
        for event in follow(events):
            print(json.dumps(event), flush=True)
    except KeyboardInterrupt:
        pass
    return 0
