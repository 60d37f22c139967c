"""The dataset store in a child process, so video encoding never delays the control loop.

Two AV1 encoders (SVT-AV1 threads driven by Python threads) in the recorder's process hold the GIL for
milliseconds at a time and take the cores the loop needs, which made ticks start tens of milliseconds late.
Here the loop only copies each camera image into a shared-memory ring slot and sends a small message; the
child (its encoder threads at the lowest CPU priority) feeds lerobot's `add_frame`, encodes and commits.

Flow control: the child publishes how many frames it has consumed; when the encoders fall behind, their
queues and then the ring fill, and `add_frame` waits (a late tick, counted by the loop) rather than drop
anything. Crash semantics are the store's: if the
recorder dies, the child sees its pipe close and drops the episode in progress (committed episodes stay
intact); if the child dies, the next call raises `WriterDied`.
"""

from __future__ import annotations

import multiprocessing
import signal
import time
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

import numpy as np

from zk0.agent.dataset_commit import DatasetError, DatasetIdentity, EpisodeMeta, RepairReport
from zk0.agent.dataset_store import DatasetStore, EncodingSettings, EpisodeRejected
from zk0.hw.realtime import drop_realtime_rights

# Errors the child reports by type, so callers handle them as if the store ran in-process.
_REMOTE_ERRORS = {cls.__name__: cls for cls in (DatasetError, EpisodeRejected)}
RING_WAIT_POLL_S = 0.001

class WriterDied(DatasetError):
    """The writer process is gone; committed episodes are intact, the one in progress is lost."""


def _remote_error(error: tuple[str, str]) -> DatasetError:
    error_type, message = error
    return _REMOTE_ERRORS.get(error_type, DatasetError)(message)


def _video_keys(features: dict) -> list[str]:
    return [key for key, feature in features.items() if feature["dtype"] == "video"]


class _Ring:
    """`slots` images per video key in shared memory; slot `seq % slots` holds frame `seq`."""

    def __init__(self, features: dict, slots: int, names: dict[str, str] | None = None) -> None:
        self.slots = slots
        self.memory: dict[str, SharedMemory] = {}
        self.images: dict[str, np.ndarray] = {}
        for key in _video_keys(features):
            shape = (slots, *features[key]["shape"])
            size = int(np.prod(shape))
            memory = SharedMemory(name=names[key]) if names else SharedMemory(create=True, size=size)
            self.memory[key] = memory
            self.images[key] = np.ndarray(shape, dtype=np.uint8, buffer=memory.buf)

    @property
    def names(self) -> dict[str, str]:
        return {key: memory.name for key, memory in self.memory.items()}

    def close(self, unlink: bool) -> None:
        self.images.clear()
        for memory in self.memory.values():
            memory.close()
            if unlink:
                memory.unlink()


class WriterProcess:
    """A `DatasetStore` in a child process, with the same episode interface (`add_frame`, `commit_episode`,
    `discard_episode`, `close`, `num_episodes`, `features`, `root`)."""

    def __init__(self, process, connection: Connection, ring: _Ring, consumed, root: Path, features: dict,
                 num_episodes: int) -> None:
        self._process = process
        self._connection = connection
        self._ring = ring
        self._consumed = consumed
        self.root = root
        self.features = features
        self.num_episodes = num_episodes
        self._sent = 0
        self._frame_error: tuple[str, str] | None = None
        self._closed = False

    @classmethod
    def open(
        cls,
        datasets_root: Path,
        name: str,
        features: dict,
        fps: int,
        identity: DatasetIdentity,
        encoding: EncodingSettings = EncodingSettings(),
        ring_slots: int = 30,
    ) -> tuple[WriterProcess, RepairReport | None]:
        """Start the child, which opens (checks, repairs, creates) the dataset as `DatasetStore.open` does."""
        ring = _Ring(features, ring_slots)
        # fork: the recorder opens its dataset before it starts any thread, and a spawned child would
        # spend seconds re-importing lerobot.
        context = multiprocessing.get_context("fork")
        consumed = context.RawValue("q", 0)
        parent, child = context.Pipe()
        process = context.Process(
            target=_serve, name="zk0-dataset-writer", daemon=True,
            args=(child, parent, ring.names, ring_slots, consumed, datasets_root, name, features, fps, identity, encoding),
        )
        process.start()
        child.close()
        writer = cls(process, parent, ring, consumed, Path(datasets_root) / name, features, 0)
        try:
            writer.num_episodes, report = writer._reply()
        except BaseException:
            writer._shutdown()
            raise
        return writer, report

    # -- the episode interface ------------------------------------------------------------------------------
    def add_frame(self, frame: dict[str, Any]) -> None:
        """Hand one frame to the writer; waits only while the ring is full (the writer is behind)."""
        self._raise_frame_error()
        while self._sent - self._consumed.value >= self._ring.slots:
            if not self._process.is_alive():
                raise WriterDied(self._died_message())
            time.sleep(RING_WAIT_POLL_S)
        slot = self._sent % self._ring.slots
        fields = {}
        for key, value in frame.items():
            if key in self._ring.images:
                self._ring.images[key][slot] = value
            else:
                fields[key] = value
        self._send(("frame", self._sent, fields))
        self._sent += 1

    def commit_episode(self, meta: EpisodeMeta) -> None:
        self._send(("commit", meta))
        self.num_episodes = self._reply()

    def discard_episode(self) -> None:
        self._send(("discard",))
        self._reply()
        self._frame_error = None  # it voided the episode just discarded

    def close(self) -> None:
        """Drop the episode in progress, release lerobot's writers and stop the child."""
        if self._closed:
            return
        try:
            if self._process.is_alive():
                self._send(("close",))
                self._reply()
        except WriterDied:
            pass
        finally:
            self._shutdown()

    # -- plumbing -------------------------------------------------------------------------------------------
    def _send(self, message: tuple) -> None:
        try:
            self._connection.send(message)
        except (BrokenPipeError, ConnectionResetError, OSError) as exc:
            raise WriterDied(self._died_message()) from exc

    def _reply(self) -> Any:
        """The answer to the last request. Frames get no answer; an error the child met writing one arrives
        on its own ("frame-error") and is kept until `add_frame` raises it."""
        while True:
            kind, payload = self._receive()
            if kind == "frame-error":
                self._frame_error = payload
                continue
            if kind == "error":
                raise _remote_error(payload)
            return payload

    def _receive(self) -> tuple[str, Any]:
        try:
            return self._connection.recv()
        except (EOFError, ConnectionResetError, OSError) as exc:
            raise WriterDied(self._died_message()) from exc

    def _raise_frame_error(self) -> None:
        while self._frame_error is None and self._connection.poll():
            kind, payload = self._receive()
            self._frame_error = payload if kind == "frame-error" else ("DatasetError", f"unexpected {kind} from the writer")
        if self._frame_error is not None:
            error, self._frame_error = self._frame_error, None
            raise _remote_error(error)

    def _died_message(self) -> str:
        self._process.join(timeout=1.0)
        return (f"the dataset writer process stopped (exit code {self._process.exitcode}); "
                f"committed episodes in {self.root} are intact, the episode in progress is lost")

    def _shutdown(self) -> None:
        self._closed = True
        self._connection.close()
        self._process.join(timeout=30.0)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._ring.close(unlink=True)

    def __enter__(self) -> WriterProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _serve(connection: Connection, recorder_end: Connection, ring_names: dict[str, str], ring_slots: int, consumed, datasets_root: Path,
           name: str, features: dict, fps: int, identity: DatasetIdentity, encoding: EncodingSettings,
) -> None:
    # The recorder decides when to stop (it saves on Ctrl-C); a terminal's SIGINT must not kill the writer first.
    recorder_end.close()  # inherited by fork: open here, the pipe would never report the recorder's death
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    drop_realtime_rights()
    ring = _Ring(features, ring_slots, ring_names)
    store = None
    try:
        try:
            store, report = DatasetStore.open(datasets_root, name, features, fps, identity, encoding)
        except DatasetError as exc:
            connection.send(("error", (type(exc).__name__, str(exc))))
            return
        connection.send(("ok", (store.num_episodes, report)))
        _serve_requests(connection, ring, consumed, store)
    finally:
        if store is not None:
            store.close()
        ring.close(unlink=False)
        connection.close()


def _serve_requests(connection: Connection, ring: _Ring, consumed, store: DatasetStore) -> None:
    failed_frame = False  # after a frame failed, the episode is void until discarded
    while True:
        try:
            message = connection.recv()
        except (EOFError, ConnectionResetError):
            return  # the recorder is gone: `store.close()` drops the episode in progress
        kind = message[0]
        try:
            if kind == "frame":
                _, seq, fields = message
                if not failed_frame:
                    slot = seq % ring.slots
                    store.add_frame({**fields, **{key: images[slot] for key, images in ring.images.items()}})
                consumed.value = seq + 1
            elif kind == "commit":
                if failed_frame:
                    raise DatasetError("a frame of this episode could not be written; discard it")
                store.commit_episode(message[1])
                connection.send(("ok", store.num_episodes))
            elif kind == "discard":
                store.discard_episode()
                failed_frame = False
                connection.send(("ok", None))
            elif kind == "close":
                connection.send(("ok", None))
                return
        except Exception as exc:  # reported to the recorder, which decides; the store stays usable
            error = (type(exc).__name__, str(exc))
            if kind == "frame":
                failed_frame = True
                consumed.value = message[1] + 1
                connection.send(("frame-error", error))
            else:
                connection.send(("error", error))
