"""`zk0 policy`: this host's policy store (zk0.agent.policy_store) from the command line.

  zk0 policy list                       versions, oldest first: round, arrival, sha, metrics, active/previous
  zk0 policy show REF                   one version (a name, active or previous) and its promotion history
  zk0 policy promote REF [--reason R]   make REF active (the active one becomes previous)
  zk0 policy rollback [--reason R]      swap active and previous
  zk0 policy prune [--keep N] [--max-bytes B]   remove old versions; never active or previous
  zk0 policy export REF DIR             write REF as a standalone lerobot checkpoint
  zk0 policy import CHECKPOINT [--run R] [--activate]   store a checkpoint as R-round0 (a base to start from)
  zk0 policy export-onnx REF DIR [--quantize none|int8] [--steps K]
                                        write REF's action-chunk inference as onnxruntime graphs (zk0.learn.onnx_export)
  zk0 policy parity REF DIR             max abs difference of actions, torch vs the onnxruntime export in DIR

The store is `--store DIR`, else the agent config's `federation.policy_store` (`--config`). A refused request
(unknown or corrupt version, nothing to roll back to) prints one line, changes nothing and exits 1.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from zk0.agent.policy_rules import parse_size

DEFAULT_CONFIG = Path("configs/agent.yaml")


def size_argument(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    def store_options(p: argparse.ArgumentParser, default) -> None:
        p.add_argument("--store", type=Path, default=default, help="policy store folder (default: from --config)")
        p.add_argument("--config", type=Path, default=default,
                       help=f"agent config whose federation.policy_store names the store (default {DEFAULT_CONFIG})")

    store_options(parser, None)
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    common = argparse.ArgumentParser(add_help=False)
    store_options(common, argparse.SUPPRESS)  # also accepted after the action; overrides only when given
    sub.add_parser("list", parents=[common], help="list the versions")
    show = sub.add_parser("show", parents=[common], help="one version in detail, with its promotion history")
    show.add_argument("ref", help="version name, active or previous")
    promote = sub.add_parser("promote", parents=[common], help="make a version active")
    promote.add_argument("ref", help="version name or previous")
    promote.add_argument("--reason", default="", help="why (e.g. the validation report's path), kept in history")
    rollback = sub.add_parser("rollback", parents=[common], help="swap active and previous")
    rollback.add_argument("--reason", default="", help="why, kept in the store's history")
    prune = sub.add_parser("prune", parents=[common], help="remove old versions (never active or previous)")
    prune.add_argument("--keep", type=int, help="keep at most this many versions, the newest")
    prune.add_argument("--max-bytes", type=size_argument, help="then remove the oldest until the store fits (500M, 2G)")
    export = sub.add_parser("export", parents=[common], help="write a version as a standalone lerobot checkpoint")
    export.add_argument("ref", help="version name, active or previous")
    export.add_argument("dir", type=Path, help="new directory to write")
    imported = sub.add_parser("import", parents=[common],
                              help="store a lerobot checkpoint as version RUN-round0 (e.g. the base to start from)")
    imported.add_argument("checkpoint", type=Path, help="a checkpoint directory (config.json + model.safetensors)")
    imported.add_argument("--run", dest="run_name", default="base", help="the version's run name (default %(default)s)")
    imported.add_argument("--activate", action="store_true", help="then make it active")
    imported.add_argument("--reason", default="imported", help="why, kept in history when activated")
    onnx = sub.add_parser("export-onnx", parents=[common],
                          help="export a version or checkpoint's inference to ONNX graphs for onnxruntime")
    onnx.add_argument("ref", help="version name, active, previous or a checkpoint directory")
    onnx.add_argument("dir", type=Path, help="new directory to write")
    onnx.add_argument("--quantize", choices=("none", "int8"), default="none",
                      help="int8: onnxruntime dynamic quantization of the weights (default none: fp32)")
    onnx.add_argument("--steps", type=int, help="flow-matching Euler steps (default: the policy's num_steps)")
    onnx.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's, 20)")
    parity = sub.add_parser("parity", parents=[common],
                            help="compare a version or checkpoint with its ONNX export on the same inputs and noise")
    parity.add_argument("ref", help="version name, active, previous or a checkpoint directory")
    parity.add_argument("dir", type=Path, help="the export (zk0 policy export-onnx)")
    parity.add_argument("--trials", type=int, default=3, help="observations compared (default 3)")


def store_root(args: argparse.Namespace) -> Path:
    """`--store`, else the agent config's federation.policy_store."""
    from zk0.agent.config import load_config
    from zk0.agent.policy_store import PolicyStoreError

    if args.store is not None:
        return args.store
    config = load_config(args.config or DEFAULT_CONFIG, check_devices=False)
    if config.federation is None:
        raise PolicyStoreError(f"{args.config or DEFAULT_CONFIG} has no federation section: give --store DIR")
    return config.federation.policy_store


def run(args: argparse.Namespace) -> int:
    from zk0.agent.policy_store import PolicyStore, PolicyStoreError
    from zk0.common.typed_yaml import ConfigError

    try:
        if args.action in CHECKPOINT_ACTIONS:  # a checkpoint directory needs no store
            return CHECKPOINT_ACTIONS[args.action](None if Path(args.ref).is_dir() else store_root(args), args)
        root = store_root(args)
        if args.action == "import":  # the first version a host receives may be the one it imports
            root.mkdir(parents=True, exist_ok=True)
        if not root.is_dir():
            raise PolicyStoreError(f"no policy store at {root}")
        return ACTIONS[args.action](PolicyStore(root), args)
    except (PolicyStoreError, ConfigError, OSError, ValueError) as exc:
        print(f"zk0 policy: {exc}", file=sys.stderr)
        return 1


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


# What `list` shows of a version's server metrics (zk0.server.evaluation.server_metrics), to compare versions at a
# glance: the server's held-out loss and whether the round changed the global at all; `show` prints every one.
LISTED_SERVER_METRICS = ("eval/loss", "train/accepted-updates")
SHOW_INDENT = 16


def _metrics(metrics: dict, sep: str = " ") -> str:
    return sep.join(f"{k}={v:.4g}" if isinstance(v, (int, float)) else f"{k}={v}" for k, v in metrics.items()) or "-"


def table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def _list(store, args: argparse.Namespace) -> int:
    state, versions = store.state(), store.versions()
    if not versions:
        print(f"no versions in {store.root}")
        return 0
    rows = [["", "version", "round", "arrived", "sha", "size", "server metrics", "node metrics", "status"]]
    for v in versions:
        marker = "active" if v.name == state.active else "previous" if v.name == state.previous else ""
        rows.append([marker, v.name, str(v.round), _when(v.arrived) if v.arrived else "?", v.sha256[:12] or "?",
                     f"{v.bytes / 1e6:.1f}MB",
                     _metrics({k: v.server_metrics[k] for k in LISTED_SERVER_METRICS if k in v.server_metrics}),
                     _metrics(v.node_metrics),
                     f"CORRUPT: {v.corrupt}" if v.corrupt else "ok"])
    print(table(rows))
    return 0


def _show(store, args: argparse.Namespace) -> int:
    v, state = store.get(args.ref), store.state()
    marker = "active" if v.name == state.active else "previous" if v.name == state.previous else "stored"
    for key, value in [("version", v.name), ("status", f"CORRUPT: {v.corrupt}" if v.corrupt else marker),
                       ("run", v.run), ("round", v.round), ("arrived", _when(v.arrived) if v.arrived else "?"),
                       ("sha256", v.sha256), ("base", v.base), ("bytes", v.bytes),
                       ("server metrics", _metrics(v.server_metrics, "\n" + " " * SHOW_INDENT)),
                       ("node metrics", _metrics(v.node_metrics))]:
        print(f"{key + ':':{SHOW_INDENT}}{value}")
    for entry in state.history:
        if v.name in (entry.get("version"), entry.get("replaced")):
            print(f"history:        {_when(entry['at'])} {entry['action']} {entry['version']} (replacing "
                  f"{entry.get('replaced') or 'none'}) by {entry.get('by', '?')}: {entry.get('reason') or '-'}")
    return 0


def _promote(store, args: argparse.Namespace) -> int:
    before = store.state().active
    store.promote(args.ref, reason=args.reason)
    after = store.state()
    print(f"{after.active} is already active" if after.active == before else
          f"active: {after.active} (previous: {after.previous})")
    return 0


def _import(store, args: argparse.Namespace) -> int:
    from zk0.agent.policy_store import PolicyStoreError

    if not (args.checkpoint / "config.json").is_file():
        raise PolicyStoreError(f"{args.checkpoint} is not a checkpoint directory (no config.json)")
    version = store.add_checkpoint(args.checkpoint, run=args.run_name)
    print(f"stored {version.name}")
    if args.activate and store.state().active != version.name:
        store.promote(version.name, reason=args.reason)
        state = store.state()
        print(f"active: {state.active} (previous: {state.previous})")
    return 0


def _rollback(store, args: argparse.Namespace) -> int:
    store.rollback(reason=args.reason)
    state = store.state()
    print(f"rolled back: active {state.active} (previous: {state.previous})")
    return 0


def _prune(store, args: argparse.Namespace) -> int:
    from zk0.agent.policy_store import PolicyStoreError

    if args.keep is None and args.max_bytes is None:
        raise PolicyStoreError("prune needs --keep N and/or --max-bytes SIZE")
    removed = store.prune(keep=args.keep, max_bytes=args.max_bytes)
    print(f"removed {len(removed)}: {', '.join(removed)}" if removed else "nothing to remove")
    return 0


def _export(store, args: argparse.Namespace) -> int:
    from zk0.agent.policy_store import PolicyStoreError
    from zk0.learn.checkpoint import write_dir_atomic

    dest: Path = args.dir
    if dest.exists():
        raise PolicyStoreError(f"{dest} exists: export writes a new directory")
    source = store.checkpoint(args.ref).resolve()
    write_dir_atomic(dest, lambda folder: shutil.copytree(source, folder, dirs_exist_ok=True))
    print(f"exported {store.get(args.ref).name} to {dest}")
    return 0


def _export_onnx(root: Path | None, args: argparse.Namespace) -> int:
    from zk0.agent.policy_store import resolve_policy
    from zk0.learn.checkpoint import load_checkpoint
    from zk0.learn.onnx_export import DEFAULT_OPSET, ExportOptions, export_policy

    if args.dir.exists():
        raise FileExistsError(f"{args.dir} exists: export-onnx writes a new directory")
    options = ExportOptions(steps=args.steps, quantize=args.quantize,
                            opset=DEFAULT_OPSET if args.opset is None else args.opset)
    checkpoint = resolve_policy(args.ref, root)
    bundle, meta = load_checkpoint(checkpoint)
    manifest = export_policy(bundle, checkpoint, meta.sha256, args.dir, options)
    print(f"exported {args.ref} (sha {meta.sha256[:12]}) to {args.dir}: {manifest.quantize}, {manifest.steps} steps, "
          f"opset {manifest.opset}, cameras {', '.join(manifest.cameras)}")
    return 0


def _parity(root: Path | None, args: argparse.Namespace) -> int:
    """Prints the comparison as JSON; exit 1 when an fp32 export exceeds its manifest's tolerance."""
    from zk0.agent.policy_store import resolve_policy
    from zk0.learn.onnx_parity import parity

    result = parity(resolve_policy(args.ref, root), args.dir, trials=args.trials)
    print(json.dumps(result.to_dict()))
    return 1 if result.passed is False else 0


ACTIONS = {"list": _list, "show": _show, "promote": _promote, "rollback": _rollback, "prune": _prune,
           "export": _export, "import": _import}
CHECKPOINT_ACTIONS = {"export-onnx": _export_onnx, "parity": _parity}
