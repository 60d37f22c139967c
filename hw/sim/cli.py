"""`zk0 sim arm|rig`: run simulated SO-100/SO-101 hardware.

`zk0 sim arm --role follower --print-port` serves one calibrated arm on a pty and prints its device path
as the first stdout line. `zk0 sim rig` runs the whole rig (see zk0.hw.sim.rig) and prints one JSON line
describing its ports and addresses. Both serve until SIGTERM/SIGINT. `--bus-trace FILE` writes every
Goal_Position and Torque_Enable write the simulated servos receive as JSON lines (see zk0.hw.sim.bus_trace).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from contextlib import ExitStack
from pathlib import Path

from zk0.hw.realtime import make_realtime
from zk0.hw.sim.bus_trace import BusTrace
from zk0.hw.sim.calibration import ROBOTS, ROLES, calibrated_arm_bus, write_calibration_file
from zk0.hw.sim.pty_bus import SIM_BUS_PRIORITY, LinkConfig, PtyBusServer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="sim_command", metavar="WHAT", required=True)
    arm = sub.add_parser("arm", help="serve one simulated arm (six STS3215 servos) on a pty")
    arm.add_argument("--role", choices=ROLES, required=True)
    arm.add_argument("--robot", choices=ROBOTS, default="so101")
    arm.add_argument("--print-port", action="store_true", help="print only the device path (first line)")
    arm.add_argument("--calibration-dir", type=Path, help="also write the lerobot calibration file here")
    arm.add_argument("--id", default=None, help="arm id for the calibration file (default sim_<role>)")
    _add_link_arguments(arm)

    rig = sub.add_parser("rig", help="serve follower + leader + cameras + operator, controlled over ZMQ")
    rig.add_argument("--robot", choices=ROBOTS, default="so101")
    rig.add_argument("--calibration-dir", type=Path, required=True)
    rig.add_argument("--cameras", default="front,wrist", help="comma-separated camera names")
    rig.add_argument("--width", type=int, default=320)
    rig.add_argument("--height", type=int, default=240)
    rig.add_argument("--fps", type=int, default=30)
    rig.add_argument("--seed", type=int, default=0)
    rig.add_argument("--exit-with-stdin", action="store_true", help="shut down when stdin reaches EOF (parent gone)")
    _add_link_arguments(rig)


def _add_link_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--baudrate", type=int, default=1_000_000, help="wire speed the replies are paced at")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="servo turnaround before each reply")
    parser.add_argument("--bus-trace", type=Path, metavar="FILE",
                        help="write every Goal_Position and Torque_Enable write the servos receive (JSON lines)")


def link_config(args: argparse.Namespace) -> LinkConfig:
    if args.baudrate <= 0 or args.latency_ms < 0:
        raise SystemExit("zk0 sim: --baudrate must be positive and --latency-ms non-negative")
    return LinkConfig(baudrate=args.baudrate, latency_s=args.latency_ms / 1000)


def wait_for_termination() -> None:
    """Block until SIGTERM or SIGINT."""
    done = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: done.set())
    done.wait()


def _run_arm(args: argparse.Namespace) -> int:
    arm_id = args.id or f"sim_{args.role}"
    bus = calibrated_arm_bus(args.role)
    with ExitStack() as stack:
        if args.bus_trace is not None:
            bus.write_observer = stack.enter_context(BusTrace(args.bus_trace)).observer(args.role)
        server = stack.enter_context(PtyBusServer(bus, link_config(args)))
        # Real servos answer within microseconds whatever the host is doing: the simulator's threads are
        # real-time where allowed, or a starved simulator would miss lerobot's reply timeout.
        make_realtime(SIM_BUS_PRIORITY)
        # The calibration file exists before the port is announced: readers of the first line may connect at once.
        if args.calibration_dir is not None:
            path = write_calibration_file(args.calibration_dir, arm_id, args.role)
            if not args.print_port:
                print(f"calibration: {path}", file=sys.stderr, flush=True)
        print(server.port, flush=True)
        if not args.print_port:
            print(f"simulated {args.robot} {args.role} (ids 1-6, STS3215) serving on {server.port}",
                  file=sys.stderr, flush=True)
        wait_for_termination()
    return 0


def run(args: argparse.Namespace) -> int:
    if args.sim_command == "arm":
        return _run_arm(args)
    from zk0.hw.sim.rig import serve_rig  # the rig pulls in the world and renderer

    return serve_rig(args)
