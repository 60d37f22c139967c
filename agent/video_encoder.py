"""Streaming camera encoding for the dataset writer: the protocol lerobot's `DatasetWriter` drives
(`start_episode`, `feed_frame`, `finish_episode`, `cancel_episode`, `close`), at less CPU per frame.

Besides the codec's ~16 ms, lerobot's `StreamingVideoEncoder` spends about 4 ms of CPU on every 640x480
frame: a PIL round trip to build the video frame, and a 5000-bin running-quantile histogram update for the
image statistics. Camera images are uint8, so a 256-bin count per channel gives the same statistics exactly;
and PyAV builds the video frame straight from the array. With two cameras at 30 fps that is a quarter of a
core. lerobot offers no hook into its (private) encoder thread, so `EncodingDataset` plugs this encoder in
where `LeRobotDataset` builds its own.

Unlike lerobot's, this encoder never drops a frame: when the codec falls behind, `feed_frame` waits. In the
writer process that fills the ring, and the recorder's loop then waits on the ring (counted as late ticks).
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import tempfile
import threading
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from lerobot.configs.video import DepthEncoderConfig, RGBEncoderConfig
from lerobot.datasets import LeRobotDataset
from lerobot.datasets.compute_stats import DEFAULT_QUANTILES, auto_downsample_height_width

FEED_POLL_S = 0.5
# Encoding is bulk work that may lag and catch up: each encoder thread, and the SVT-AV1 threads it starts
# (Linux threads inherit their creator's niceness), yields to the hardware and to whatever feeds it.
ENCODER_NICENESS = 19


class PixelStats:
    """Exact per-channel statistics of uint8 images, downsampled as lerobot samples them for its image stats,
    with the keys lerobot's `RunningQuantileStats` reports (min, max, mean, std, count, q01 ... q99)."""

    def __init__(self, channels: int = 3) -> None:
        self._counts = np.zeros((channels, 256), dtype=np.int64)

    def update(self, image: np.ndarray) -> None:
        """Count the pixels of one (height, width, channels) image."""
        for counts, plane in zip(self._counts, auto_downsample_height_width(image.transpose(2, 0, 1)), strict=True):
            counts += np.bincount(plane.ravel(), minlength=256)

    @property
    def count(self) -> int:
        return int(self._counts[0].sum())

    def statistics(self) -> dict[str, np.ndarray]:
        count = self.count
        if count < 2:
            raise ValueError("statistics need at least 2 pixels")
        values = np.arange(256, dtype=np.float64)
        mean = self._counts @ values / count
        variance = self._counts @ values**2 / count - mean**2
        seen = self._counts > 0
        cumulative = self._counts.cumsum(axis=1)
        stats = {
            "min": seen.argmax(axis=1).astype(np.float64),
            "max": (255 - seen[:, ::-1].argmax(axis=1)).astype(np.float64),
            "mean": mean,
            "std": np.sqrt(np.maximum(variance, 0.0)),
            "count": np.array([count]),
        }
        for q in DEFAULT_QUANTILES:
            # The smallest value whose cumulative share reaches q, as lerobot's histogram quantiles estimate it.
            stats[f"q{int(q * 100):02d}"] = np.array(
                [np.searchsorted(channel, q * count) for channel in cumulative], dtype=np.float64
            )
        return stats


class _CameraEncoder(threading.Thread):
    """Encodes one camera's frames of one episode into `path`, in order, until it receives `None`."""

    def __init__(self, key: str, path: Path, fps: int, codec: RGBEncoderConfig, encoder_threads: int | None,
                 queue_frames: int) -> None:
        super().__init__(name=f"zk0-encode-{key}", daemon=True)
        self.key = key
        self.path = path
        self.fps = fps
        self.codec = codec
        self.encoder_threads = encoder_threads
        self.frames: queue.Queue[av.VideoFrame | None] = queue.Queue(maxsize=queue_frames)
        self.stats = PixelStats()
        self.encoded = 0
        self.error: str | None = None
        self.cancelled = False

    def run(self) -> None:
        os.setpriority(os.PRIO_PROCESS, 0, ENCODER_NICENESS)  # this thread only, on Linux
        try:
            with av.open(str(self.path), "w") as container:
                stream = None
                while (frame := self.frames.get()) is not None and not self.cancelled:
                    if stream is None:
                        stream = self._add_stream(container, frame)
                    frame.pts = self.encoded
                    container.mux(stream.encode(frame))
                    self.encoded += 1
                if stream is not None and not self.cancelled:
                    container.mux(stream.encode())
        except Exception as exc:  # reported by the next feed_frame / finish_episode
            self.error = f"{type(exc).__name__}: {exc}"

    def _add_stream(self, container, frame: av.VideoFrame):
        stream = container.add_stream(
            self.codec.vcodec, self.fps, options=self.codec.get_codec_options(self.encoder_threads, as_strings=True)
        )
        stream.pix_fmt = self.codec.pix_fmt
        stream.width, stream.height = frame.width, frame.height
        stream.time_base = Fraction(1, self.fps)
        return stream

    def put(self, frame: av.VideoFrame | None) -> None:
        """Queue a frame (or the end marker), waiting while the queue is full; raises if the thread stopped."""
        while True:
            if not self.is_alive():
                raise RuntimeError(f"the video encoder for {self.key} stopped: {self.error or 'no error reported'}")
            try:
                self.frames.put(frame, timeout=FEED_POLL_S)
                return
            except queue.Full:
                continue

    def cancel(self) -> None:
        self.cancelled = True
        with contextlib.suppress(queue.Full):
            self.frames.put_nowait(None)  # wakes the thread if it waits; a busy one sees `cancelled` next


class StreamingEncoder:
    """One `_CameraEncoder` thread per camera per episode, each writing a temporary MP4 under the dataset root
    (lerobot's layout: `tmp*/KEY_streaming.mp4`, which lerobot moves into the dataset on `save_episode`)."""

    def __init__(self, fps: int, rgb_encoder: RGBEncoderConfig, queue_frames: int, encoder_threads: int | None) -> None:
        self.fps = fps
        self.codec = rgb_encoder
        self.queue_frames = queue_frames
        self.encoder_threads = encoder_threads
        self._encoders: dict[str, _CameraEncoder] = {}

    def start_episode(self, video_keys: list[str], temp_dir: Path, depth_video_keys: list[str] | None = None) -> None:
        if depth_video_keys:
            raise ValueError(f"depth cameras are not supported: {depth_video_keys}")
        self.cancel_episode()
        for key in video_keys:
            path = Path(tempfile.mkdtemp(dir=temp_dir)) / f"{key.replace('/', '_')}_streaming.mp4"
            encoder = _CameraEncoder(key, path, self.fps, self.codec, self.encoder_threads, self.queue_frames)
            encoder.start()
            self._encoders[key] = encoder

    def feed_frame(self, video_key: str, image: np.ndarray) -> None:
        """Encode one (height, width, 3) uint8 image; the image is copied, the caller may reuse its buffer."""
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"{video_key}: expected a (height, width, 3) uint8 image, got {image.dtype} {image.shape}")
        encoder = self._encoders[video_key]
        encoder.stats.update(image)
        encoder.put(av.VideoFrame.from_ndarray(image, format="rgb24"))

    def finish_episode(self) -> dict[str, tuple[Path, dict[str, np.ndarray] | None]]:
        """Flush every camera's video; returns each key's temporary MP4 and image statistics."""
        for encoder in self._encoders.values():
            encoder.put(None)
        results = {}
        for key, encoder in self._encoders.items():
            encoder.join()
            if encoder.error is not None:
                self.cancel_episode()
                raise RuntimeError(f"the video encoder for {key} failed: {encoder.error}")
            results[key] = (encoder.path, encoder.stats.statistics() if encoder.encoded >= 2 else None)
        self._encoders.clear()
        return results

    def cancel_episode(self) -> None:
        for encoder in self._encoders.values():
            encoder.cancel()
        for encoder in self._encoders.values():
            encoder.join()
            shutil.rmtree(encoder.path.parent, ignore_errors=True)
        self._encoders.clear()

    def close(self) -> None:
        self.cancel_episode()


class EncodingDataset(LeRobotDataset):
    """A `LeRobotDataset` (for `create`/`resume`) whose streaming encoder is zk0's `StreamingEncoder`."""

    @staticmethod
    def _build_streaming_encoder(
        fps: int,
        rgb_encoder: RGBEncoderConfig | None,
        depth_encoder: DepthEncoderConfig | None,
        encoder_queue_maxsize: int,
        encoder_threads: int | None,
    ) -> StreamingEncoder:
        return StreamingEncoder(fps, rgb_encoder or RGBEncoderConfig(), encoder_queue_maxsize, encoder_threads)
