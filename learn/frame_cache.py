"""Decoded camera frames kept across training steps, rounds and processes: a memory tier and a disk tier.

Each episode's video is decoded once and resized to the policy's input size (see zk0.learn.data); the uint8
frames are kept in a `FrameCache` bounded in bytes, in memory and optionally on disk (Flower starts a
ClientApp process per message, so the disk tier is what keeps frames across rounds). `sized_frame_cache`
sizes both tiers from the datasets and the policy's input size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

# Share of the memory available when a cache is sized that its memory tier may take (training needs the rest).
MEMORY_SHARE = 0.25

log = logging.getLogger(__name__)


def dataset_fingerprint(root: Path) -> str:
    """Changes whenever episodes are added or data/video files are rewritten (cache invalidation only)."""
    h = hashlib.sha256(str(root.resolve()).encode())
    for path in sorted([root / "meta" / "info.json", *root.glob("meta/episodes/**/*.parquet"),
                        *root.glob("videos/**/*.mp4"), *root.glob("data/**/*.parquet")]):
        st = path.stat()
        h.update(f"{path.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _root_folder(root_key: str) -> str:
    return hashlib.sha256(root_key.encode()).hexdigest()[:16]


class FrameCache:
    """Decoded, resized uint8 camera frames per (dataset, episode, camera), LRU-bounded in bytes.

    Memory tier: least recently used arrays are dropped beyond `memory_bytes`. Disk tier (with `disk_dir`): one
    .npy file per entry under `disk_dir/<dataset path digest>/<dataset fingerprint>/`, within `disk_bytes`.
    Flower starts a process per message, so the disk tier is what keeps frames across rounds; it is scanned
    once when the cache is built and then tracked in memory (no rescans on the hot path). Room for a new file
    is made by deleting least recently used files first (reads and writes bump a file's mtime, so processes
    sharing the folder agree on the order; folders left empty go too), and binding a dataset whose fingerprint
    changed deletes its older fingerprint folders at once, since nothing can hit them again. Processes sharing
    one folder each track their own writes, so together they may exceed the budget by what they wrote since
    their scans.
    """

    def __init__(self, memory_bytes: int = 1 << 30, disk_dir: str | Path | None = None, disk_bytes: int = 0):
        self.memory_bytes = memory_bytes
        self.disk_dir = Path(disk_dir) if disk_dir else None
        self.disk_bytes = disk_bytes
        self._memory: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._memory_used = 0
        self._disk: OrderedDict[Path, int] = OrderedDict()  # file -> bytes, least recently used first
        self._disk_used = 0
        self._fingerprints: dict[str, str] = {}
        self.hits = 0
        self.misses = 0
        self._scan_disk()
        self._make_room(0)

    @property
    def size_bytes(self) -> int:
        """Bytes held in memory."""
        return self._memory_used

    @property
    def disk_used_bytes(self) -> int:
        """Bytes of the disk tier's files, as this cache knows them."""
        return self._disk_used

    def _scan_disk(self) -> None:
        if self.disk_dir is None or not self.disk_dir.is_dir():
            return
        found = []
        for path in self.disk_dir.rglob("*.npy"):  # older zk0 kept one level less: those files age out first
            try:
                st = path.stat()
            except OSError:  # deleted by another process meanwhile
                continue
            found.append((st.st_mtime_ns, path, st.st_size))
        for _, path, size in sorted(found):
            self._disk[path] = size
            self._disk_used += size

    def _forget(self, path: Path) -> None:
        self._disk_used -= self._disk.pop(path, 0)
        path.unlink(missing_ok=True)

    def _make_room(self, nbytes: int) -> None:
        """Delete least recently used disk entries until `nbytes` more fit in the budget."""
        while self._disk and self._disk_used + nbytes > self.disk_bytes:
            path = next(iter(self._disk))
            self._forget(path)
            for folder in (path.parent, path.parent.parent):
                if folder == self.disk_dir:
                    break
                try:
                    folder.rmdir()
                except OSError:  # not empty (or already gone)
                    break

    def _used(self, path: Path) -> None:
        """Mark a disk entry most recently used, here and (through its mtime) for other processes."""
        try:
            os.utime(path)
            size = path.stat().st_size
        except OSError:  # pruned by another process meanwhile
            self._disk_used -= self._disk.pop(path, 0)
            return
        self._disk_used += size - self._disk.get(path, 0)
        self._disk[path] = size
        self._disk.move_to_end(path)

    def bind(self, root: Path) -> str:
        """Register a dataset's current fingerprint, forgetting its frames if the dataset changed."""
        key = str(root.resolve())
        fingerprint = dataset_fingerprint(root)
        if self._fingerprints.get(key) != fingerprint:
            for k in [k for k in self._memory if k[0] == key]:
                self._memory_used -= self._memory.pop(k).nbytes
            self._fingerprints[key] = fingerprint
            self._drop_stale_folders(key, fingerprint)
        return fingerprint

    def _drop_stale_folders(self, key: str, fingerprint: str) -> None:
        if self.disk_dir is None:
            return
        folder = self.disk_dir / _root_folder(key)
        stale = [child for child in folder.iterdir() if child.name != fingerprint] if folder.is_dir() else []
        for child in stale:
            for path in [p for p in self._disk if p.parent == child]:
                self._disk_used -= self._disk.pop(path)
            shutil.rmtree(child, ignore_errors=True)

    def _disk_path(self, key: tuple) -> Path | None:
        if self.disk_dir is None:
            return None
        root, episode, camera, size = key
        name = f"ep{episode:06d}_{camera}_{size[0]}x{size[1]}.npy"
        return self.disk_dir / _root_folder(root) / self._fingerprints[root] / name

    def _read_disk(self, path: Path | None) -> np.ndarray | None:
        if path is None:
            return None
        try:
            frames = np.load(path)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # damaged file: drop it and decode again
            self._forget(path)
            return None
        self._used(path)
        return frames

    def _write_disk(self, path: Path | None, frames: np.ndarray) -> None:
        if path is None or frames.nbytes > self.disk_bytes:
            return
        self._make_room(frames.nbytes)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                np.save(f, frames)
            os.replace(tmp, path)
            self._used(path)
        except OSError:  # disk full, or the folder was pruned by another process: the entry stays in memory only
            tmp.unlink(missing_ok=True)

    def _remember(self, key: tuple, frames: np.ndarray) -> None:
        if frames.nbytes > self.memory_bytes:
            return
        self._memory[key] = frames
        self._memory_used += frames.nbytes
        while self._memory_used > self.memory_bytes:
            self._memory_used -= self._memory.popitem(last=False)[1].nbytes

    def get_or_decode(self, key: tuple, decode: Callable[[], np.ndarray]) -> np.ndarray:
        """The frames of `key` (root, episode, camera, (height, width)), decoded only if neither tier has them."""
        frames = self._memory.get(key)
        if frames is not None:
            self._memory.move_to_end(key)
            self.hits += 1
            return frames
        path = self._disk_path(key)
        frames = self._read_disk(path)
        if frames is not None:
            self.hits += 1
        else:
            frames = decode()
            self.misses += 1
            self._write_disk(path, frames)
        self._remember(key, frames)
        return frames


def frames_bytes(image_size: tuple[int, int], roots: Sequence[Path]) -> int:
    """Bytes the datasets' camera frames take decoded at `image_size` (height, width): frames x cameras x H x W x 3."""
    height, width = image_size
    total = 0
    for root in roots:
        info = json.loads((Path(root) / "meta" / "info.json").read_text())
        cameras = sum(1 for spec in info["features"].values() if spec["dtype"] == "video")
        total += int(info["total_frames"]) * cameras * height * width * 3
    return total


def _available_memory() -> int:
    """MemAvailable (what can be allocated without swapping), or free physical memory where /proc lacks it."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def sized_frame_cache(image_size: tuple[int, int], roots: Sequence[Path], disk_dir: Path | None,
                      disk_budget_bytes: int | None = None) -> FrameCache:
    """A frame cache sized for these datasets at the policy's input size (`policy_image_size`).

    The memory tier holds all their frames when that fits in `MEMORY_SHARE` of the available memory (a warning
    is logged when not: episodes beyond it are then re-read from disk or decoded again as training revisits
    them); the disk tier, with `disk_dir`, gets `disk_budget_bytes` or else what all the frames need.
    At SmolVLA's 512x512 a frame of one camera is 768 KiB: 1.4 GB per camera per minute of 30 fps video.
    """
    need = frames_bytes(image_size, roots)
    memory = min(need, int(MEMORY_SHARE * _available_memory()))
    if memory < need:
        log.warning("frame cache: the datasets' frames need %.2f GB at %dx%d, the memory tier holds %.2f GB "
                    "(%.0f%% of available memory); episodes beyond it are read from disk or decoded again",
                    need / 1e9, image_size[0], image_size[1], memory / 1e9, 100 * MEMORY_SHARE)
    disk = 0 if disk_dir is None else (need if disk_budget_bytes is None else disk_budget_bytes)
    return FrameCache(memory_bytes=memory, disk_dir=disk_dir, disk_bytes=disk)
