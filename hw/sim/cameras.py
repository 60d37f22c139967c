"""Simulated cameras published with lerobot's ZMQ image-server protocol.

lerobot's `ImageServer` (lerobot/cameras/zmq/image_server.py) sends, on a PUB socket, JSON strings
`{"timestamps": {name: t}, "images": {name: base64 JPEG}}`; `ZMQCamera` subscribes and picks its
`camera_name`. The server JPEG-encodes the RGB array as is and the camera decodes it as is, so the
frames a ZMQCamera returns are the RGB images rendered here.
"""

from __future__ import annotations

import base64
import json
import multiprocessing
import pickle
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

import cv2
import numpy as np
import zmq

JPEG_QUALITY = 90
STARTUP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class CameraSpec:
    name: str
    width: int = 320
    height: int = 240


def encode_frame(image: np.ndarray) -> str:
    ok, buffer = cv2.imencode(".jpg", image, [int(cv2.IMWRITE_JPEG_QUALITY), JPEG_QUALITY])
    if not ok:
        raise RuntimeError("JPEG encoding of a simulated camera frame failed")
    return base64.b64encode(buffer).decode("ascii")


def frame_message(frames: dict[str, np.ndarray], timestamp: float) -> str:
    return json.dumps({
        "timestamps": {name: timestamp for name in frames},
        "images": {name: encode_frame(image) for name, image in frames.items()},
    })


class CameraPublisher:
    """Renders and publishes the cameras in a child process.

    Rasterizing and JPEG encoding take tens of milliseconds a frame; in the rig process they would hold
    the GIL while a pty bus thread must answer lerobot within its 50 ms packet timeout. The rig sends the
    world (a ~2 kB pickle) with `publish`; the child renders the newest one it has and drops older ones,
    and renders nothing while no camera subscribes (like a real camera nobody reads): a rig kept between jobs (the
    agent's, with --sim) idles at ~0.1 of a core instead of ~0.2 with two 640x480 cameras.
    """

    def __init__(self, specs: tuple[CameraSpec, ...], host: str = "127.0.0.1") -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(
            target=_publisher_main, args=(specs, host, child_conn), name="sim-cameras", daemon=True
        )
        self.host = host
        self.port: int | None = None

    def start(self) -> CameraPublisher:
        self._process.start()
        if not self._conn.poll(STARTUP_TIMEOUT_S):
            self._process.terminate()
            raise RuntimeError("simulated camera process did not start")
        self.port = self._conn.recv()
        return self

    def publish(self, world: object) -> None:
        self._conn.send_bytes(pickle.dumps(world))

    def stop(self) -> None:
        try:
            self._conn.send_bytes(b"")
        except (BrokenPipeError, OSError):
            pass
        self._process.join(timeout=3.0)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join()
        self._conn.close()


def _publisher_main(specs: tuple[CameraSpec, ...], host: str, conn: Connection) -> None:
    from zk0.hw.sim.render import CameraRenderer

    renderers = [CameraRenderer(spec.name, spec.width, spec.height) for spec in specs]
    socket = zmq.Context.instance().socket(zmq.XPUB)  # a PUB that hears (un)subscriptions
    socket.setsockopt(zmq.XPUB_VERBOSER, 1)  # every subscriber's, not only a topic's first and last
    socket.setsockopt(zmq.SNDHWM, 20)
    socket.setsockopt(zmq.LINGER, 0)
    socket.bind(f"tcp://{host}:0")
    conn.send(int(socket.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1]))
    subscribers = 0
    try:
        while True:
            blob = conn.recv_bytes()
            while blob and conn.poll():
                blob = conn.recv_bytes()
            if not blob:
                return
            subscribers = _subscribers_after(subscribers, socket)
            if not subscribers:
                continue
            world = pickle.loads(blob)
            frames = {renderer.name: renderer.render(world) for renderer in renderers}
            try:
                socket.send_string(frame_message(frames, time.time()), zmq.NOBLOCK)
            except zmq.Again:
                pass  # no subscriber keeping up: drop the frame, as lerobot's server does
    except (EOFError, KeyboardInterrupt):
        return
    finally:
        socket.close()


def _subscribers_after(count: int, socket: zmq.Socket) -> int:
    """`count` updated by the (un)subscription messages waiting on the XPUB `socket` (first byte 1: subscribe, 0:
    unsubscribe; a subscriber that goes away unsubscribes once its connection is seen closed)."""
    while True:
        try:
            message = socket.recv(zmq.NOBLOCK)
        except zmq.Again:
            return count
        count = subscription_count(count, message)


def subscription_count(count: int, message: bytes) -> int:
    """The subscriber count after one XPUB message (never below zero)."""
    if message[:1] == b"\x01":
        return count + 1
    if message[:1] == b"\x00":
        return max(0, count - 1)
    return count
