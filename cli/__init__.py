"""zk0: privacy-preserving federated robot learning for SO-100/SO-101 arms.

`zk0 <command>` dispatches to one module per command. A command module defines
`add_arguments(parser)` and `run(args) -> int`; it is imported only when its command runs,
so `zk0 sim ...` never pays for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "sim": ("zk0.hw.sim.cli", "run simulated SO-100/SO-101 hardware (arms, cameras, operator)"),
    "record": ("zk0.agent.record_cli", "record tele-operated episodes into a local LeRobot dataset"),
    "model": ("zk0.learn.model_cli", "make policy model directories (the tiny offline SmolVLM stand-in, the sim base)"),
    "train": ("zk0.learn.train_cli", "centralized SmolVLA training on local datasets (the federated baseline)"),
    "server": ("zk0.server.launch", "run the federation server: Flower SuperLink + zk0 ServerApp"),
    "node": ("zk0.agent.node", "run this host's Flower SuperNode"),
    "learn-worker": ("zk0.agent.learning_worker", "serve a node's learning work warm (model built once per run)"),
    "agent": ("zk0.agent.daemon", "run the zk0 agent: the robot host's daemon (record, train in idle windows, validate, roll out)"),
    "certs": ("zk0.server.certs", "generate the CA, SuperLink certificate and SuperNode keys"),
    "fleet": ("zk0.cli.fleet", "run a whole federation on this machine (SuperLink + one SuperNode per dataset)"),
    "policy": ("zk0.agent.policy_cli", "this host's policy store: list, show, promote, rollback, prune, export, export-onnx, parity"),
    "rollout": ("zk0.agent.rollout_cli", "run a policy on the robot inside the safety envelope"),
    "validate": ("zk0.agent.validate_cli", "compare a candidate policy with the active one on paired seeded episodes"),
    "demo": ("zk0.cli.demo", "the zk0 demo on simulated hardware"),
    "experiment": ("zk0.cli.experiment", "experiments on a simulated fleet: fl-vs-central (success of federated vs "
                                         "centralized fine-tuning)"),
}


def _available() -> dict[str, tuple[str, str]]:
    return {name: spec for name, spec in COMMANDS.items() if importlib.util.find_spec(spec[0]) is not None}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _available()
    parser = argparse.ArgumentParser(prog="zk0", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in commands.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(command_parser)
            command_parser.set_defaults(run=module.run)
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        return 130
