"""`zk0 demo`: the whole loop on simulated hardware (cli/demo_fleet.py): a server and N `zk0 agent --sim` hosts
record, federate, validate, promote and roll out, with a summary at the end. `zk0 demo --arm`: one simulated
arm tele-operated through lerobot for one episode, saved as a labelled PNG (cli/demo_arm.py)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from zk0.cli import demo_arm


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hosts", type=int, help="simulated robot hosts (default 3)")
    parser.add_argument("--rounds", type=int, help="federated rounds (default 3)")
    parser.add_argument("--episodes", type=int, help="episodes each host records (default 4)")
    parser.add_argument("--validation-episodes", type=int, help="paired validation episodes per host (default 4)")
    parser.add_argument("--local-steps", type=int, help="training steps per host and round (default 20)")
    parser.add_argument("--model", help="sim-base (built into the cache on first use: ~8.5 min), tiny (runs every "
                                        "step but never succeeds) or a checkpoint directory (default sim-base)")
    parser.add_argument("--full", action="store_true",
                        help="the full-size path: sim base, 20 episodes, 10 rounds of 200 steps, 20 validation "
                             "episodes per host (an hour or more on 2 cores); other options still override")
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"),
                        help="summary.json, plots/, server/ (the server's run dir), hosts/ (default %(default)s)")
    arm = parser.add_argument_group("the single-arm demo (--arm)")
    arm.add_argument("--arm", action="store_true", help="one tele-operated episode on one simulated arm, as a PNG")
    demo_arm.add_arguments(arm)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Every process the demo starts inherits this: on a small machine N hosts and a server each running torch with
    # one thread per core oversubscribe it (a tiny-policy tick: ~30 ms with one thread, ~680 ms with two, loaded).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.arm:
        return demo_arm.run(args)
    from zk0.cli.demo_fleet import DemoRun
    from zk0.cli.demo_plan import settings_from

    try:
        settings = settings_from({"hosts": args.hosts, "rounds": args.rounds, "episodes": args.episodes,
                                  "validation_episodes": args.validation_episodes, "local_steps": args.local_steps,
                                  "model": args.model}, full=args.full)
    except ValueError as error:
        print(f"zk0 demo: {error}")
        return 2
    return DemoRun(settings, args.out).run()
