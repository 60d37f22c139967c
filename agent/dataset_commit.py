"""A zk0 dataset's commit record (`meta/zk0.json`) and crash recovery back to it.

lerobot keeps the data parquet open across episodes and buffers episode metadata in memory, so a
process killed before `finalize()` loses every episode since the last finalize and leaves a dataset
that no longer opens. zk0 therefore commits one episode at a time (`zk0.agent.dataset_store`):

1. `save_episode()` + `finalize()` (each episode lands in its own data/video/metadata files, because a
   dataset reopened with `LeRobotDataset.resume` always starts new files);
2. fsync what lerobot wrote (`zk0.learn.checkpoint.fsync_tree`);
3. atomically replace `meta/zk0.json`, the commit record: episode count, zk0 per-episode metadata
   (seed, success verdict, timing), a snapshot of `info.json`, `stats.json` and the task list, and the
   dataset's stable id (`zk0.learn.data.dataset_stable_id`: the held-out split is drawn from it).

On open (`check_and_repair`), everything past the commit record (files no committed episode references,
metadata rows of uncommitted episodes, lerobot's temporary encoder/image directories) is removed and the
snapshot restored, so a killed episode is absent, never half-present. Committed episodes are checked too
(`inspect_dataset`: contiguous indices, frame counts and index spans in the data files, video spans in the
video files); damage there is refused with guidance, never appended past.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
from lerobot.datasets.utils import DEFAULT_TASKS_PATH, INFO_PATH, STATS_PATH

from zk0.learn.checkpoint import ATOMIC_TMP_GLOB, write_file_atomic
from zk0.learn.data import DATASET_ID_KEY, ZK0_META_PATH, derived_dataset_id

ZK0_META_FORMAT = 1
# Seconds of slack between an episode's video span and its video file's duration.
VIDEO_SPAN_TOLERANCE_S = 0.05


class DatasetError(RuntimeError):
    """The dataset cannot be opened or appended to; the message says why and what to do."""


@dataclass(frozen=True)
class DatasetIdentity:
    """Who recorded a dataset and with what: kept in `meta/zk0.json`."""

    host_id: str
    robot_type: str
    calibration_hash: str


@dataclass(frozen=True)
class EpisodeMeta:
    """zk0's per-episode record, next to lerobot's own episode metadata."""

    episode_index: int
    length: int
    task: str
    started_at: float  # Unix time of the first frame
    achieved_fps: float
    overruns: int
    jitter_p99_ms: float
    slow: bool  # achieved rate below the configured fraction of the dataset fps
    calibration_hash: str
    seed: int | None = None
    success: bool | None = None
    failed_ticks: int = 0  # ticks dropped because the hardware did not answer (no frame for them)
    jitter_p50_ms: float = 0.0
    policy: str | None = None  # rollout episodes: the policy version that drove the arm
    interventions: int | None = None  # rollout episodes: frames whose target was not the policy's own


@dataclass
class CommitRecord:
    """The content of `meta/zk0.json`."""

    identity: DatasetIdentity
    episodes: list[EpisodeMeta] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    stats: dict | None = None
    tasks: list[str] = field(default_factory=list)
    # Leading episodes recorded outside zk0 (a lerobot-record dataset zk0 adopted): committed, without zk0 metadata.
    adopted: int = 0
    # Fixed for the dataset's life (see `new_dataset_id`); "" only in records written before zk0 kept one.
    dataset_id: str = ""

    @property
    def committed(self) -> int:
        return self.adopted + len(self.episodes)

    def to_json(self) -> dict:
        return {
            "format": ZK0_META_FORMAT,
            "identity": asdict(self.identity),
            "episodes": [asdict(e) for e in self.episodes],
            "info": self.info,
            "stats": self.stats,
            "tasks": self.tasks,
            "adopted": self.adopted,
            DATASET_ID_KEY: self.dataset_id,
        }

    @classmethod
    def from_json(cls, raw: dict) -> CommitRecord:
        return cls(
            identity=DatasetIdentity(**raw["identity"]),
            episodes=[EpisodeMeta(**e) for e in raw["episodes"]],
            info=raw["info"],
            stats=raw["stats"],
            tasks=raw["tasks"],
            adopted=raw.get("adopted", 0),
            dataset_id=raw.get(DATASET_ID_KEY, ""),
        )


# ---------------------------------------------------------------- consistency check (read-only)


@dataclass
class Inspection:
    """What is on disk: the episodes that are intact, and the first problem after them (if any)."""

    intact: int  # episodes 0..intact-1 are fully present and consistent
    problem: str | None  # why episode `intact` is not
    referenced: set[Path]  # files that episodes 0..intact-1 live in


def inspect_dataset(root: Path, expected_episodes: int, first: int = 0) -> Inspection:
    """Check episodes first..expected_episodes-1 in order and stop at the first inconsistent one
    (`referenced` then only names the files of the episodes checked)."""
    info = json.loads((root / INFO_PATH).read_text())
    rows = _episode_rows(root)
    data_cache: dict[Path, pd.DataFrame | None] = {}
    video_cache: dict[Path, float | None] = {}
    referenced: set[Path] = set()
    if first and first - 1 not in rows:
        return Inspection(first, f"episode {first - 1}: no metadata row", referenced)
    next_frame = rows[first - 1]["dataset_to_index"] if first else 0
    for index in range(first, expected_episodes):
        row = rows.get(index)
        if row is None:
            return Inspection(index, f"episode {index}: no metadata row", referenced)
        files, problem = _check_episode(root, info, row, next_frame, data_cache, video_cache)
        if problem:
            return Inspection(index, f"episode {index}: {problem}", referenced)
        referenced |= files
        next_frame = row["dataset_to_index"]
    return Inspection(expected_episodes, None, referenced)


def _episode_rows(root: Path) -> dict[int, dict]:
    """Episode metadata rows by index, from every readable `meta/episodes` file (unreadable ones skipped)."""
    rows: dict[int, dict] = {}
    for path in sorted((root / "meta" / "episodes").glob("chunk-*/file-*.parquet")):
        try:
            table = pq.read_table(path)
        except Exception:  # no footer: written by a process killed before finalize
            continue
        for row in table.drop_columns([c for c in table.column_names if c.startswith("stats/")]).to_pylist():
            row["_meta_file"] = path
            rows.setdefault(row["episode_index"], row)
    return rows


def _check_episode(
    root: Path,
    info: dict,
    row: dict,
    expected_from: int,
    data_cache: dict[Path, pd.DataFrame | None],
    video_cache: dict[Path, float | None],
) -> tuple[set[Path], str | None]:
    index, length = row["episode_index"], row["length"]
    if row["dataset_from_index"] != expected_from or row["dataset_to_index"] - expected_from != length:
        return set(), f"frame span {row['dataset_from_index']}..{row['dataset_to_index']} does not follow {expected_from}"
    data_path = root / info["data_path"].format(chunk_index=row["data/chunk_index"], file_index=row["data/file_index"])
    if data_path not in data_cache:
        data_cache[data_path] = _read_data_index(data_path)
    frames = data_cache[data_path]
    if frames is None:
        return set(), f"data file {data_path.relative_to(root)} missing or unreadable"
    mine = frames[frames["episode_index"] == index]
    if len(mine) != length or (length and (mine["index"].min(), mine["index"].max()) != (expected_from, expected_from + length - 1)):
        return set(), f"data file holds {len(mine)} frames, metadata says {length}"
    files = {data_path, row["_meta_file"]}
    for key, feature in info["features"].items():
        if feature["dtype"] != "video":
            continue
        video_path = root / info["video_path"].format(
            video_key=key, chunk_index=row[f"videos/{key}/chunk_index"], file_index=row[f"videos/{key}/file_index"]
        )
        if video_path not in video_cache:
            video_cache[video_path] = _video_duration(video_path)
        duration = video_cache[video_path]
        if duration is None:
            return set(), f"video {video_path.relative_to(root)} missing or unreadable"
        span = row[f"videos/{key}/to_timestamp"] - row[f"videos/{key}/from_timestamp"]
        if row[f"videos/{key}/to_timestamp"] > duration + VIDEO_SPAN_TOLERANCE_S or abs(span - length / info["fps"]) > 1.5 / info["fps"] + VIDEO_SPAN_TOLERANCE_S:
            return set(), f"video span of {key} ({span:.2f} s) does not match {length} frames"
        files.add(video_path)
    return files, None


def _read_data_index(path: Path) -> pd.DataFrame | None:
    try:
        return pq.read_table(path, columns=["episode_index", "index"]).to_pandas()
    except Exception:
        return None


def _video_duration(path: Path) -> float | None:
    from lerobot.datasets.video_utils import get_video_duration_in_s

    try:
        return get_video_duration_in_s(path)
    except Exception:
        return None


# ---------------------------------------------------------------- repair and commit (writes)


def _dataset_files(root: Path) -> list[Path]:
    files = [*(root / "data").rglob("*.parquet"), *(root / "videos").rglob("*.mp4"), *(root / "meta" / "episodes").rglob("*.parquet")]
    return sorted(files)


def _leftovers(root: Path) -> list[Path]:
    """lerobot's temporary directories (streaming encoder, image staging) and interrupted atomic writes."""
    return [
        *(p for p in root.glob("tmp*") if p.is_dir()),
        *([root / "images"] if (root / "images").exists() else []),
        *root.rglob("*.tmp"),
        *root.rglob(ATOMIC_TMP_GLOB),
    ]


def _write_tasks(root: Path, tasks: list[str]) -> None:
    frame = pd.DataFrame({"task_index": range(len(tasks))}, index=pd.Index(tasks, name="task"))
    tmp = root / (DEFAULT_TASKS_PATH + ".tmp")
    frame.to_parquet(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, root / DEFAULT_TASKS_PATH)


def _read_tasks(root: Path) -> list[str]:
    path = root / DEFAULT_TASKS_PATH
    if not path.exists():
        return []
    frame = pd.read_parquet(path)
    return list(frame.sort_values("task_index").index)


def read_commit(root: Path) -> CommitRecord | None:
    path = root / ZK0_META_PATH
    if not path.exists():
        return None
    return CommitRecord.from_json(json.loads(path.read_text()))


def write_commit(root: Path, record: CommitRecord) -> None:
    write_file_atomic(root / ZK0_META_PATH, json.dumps(record.to_json(), indent=1).encode())


def snapshot_commit(root: Path, identity: DatasetIdentity, episodes: list[EpisodeMeta], dataset_id: str,
                    adopted: int = 0) -> CommitRecord:
    """A commit record for what lerobot has just finalized on disk."""
    stats_path = root / STATS_PATH
    return CommitRecord(
        identity=identity,
        episodes=episodes,
        info=json.loads((root / INFO_PATH).read_text()),
        stats=json.loads(stats_path.read_text()) if stats_path.exists() else None,
        tasks=_read_tasks(root),
        adopted=adopted,
        dataset_id=dataset_id,
    )


def new_dataset_id(root: Path, has_episodes: bool) -> str:
    """The stable id a dataset gets when zk0 first records it: random for a new, empty dataset.

    A dataset that already has episodes (recorded by lerobot-record, or by zk0 before it kept ids) has had its
    held-out split drawn from `derived_dataset_id` until now; keeping that id keeps every episode on its side.
    """
    return derived_dataset_id(root) if has_episodes else uuid.uuid4().hex


def _rewrite_without_later_episodes(path: Path, keep: int) -> None:
    table = pq.read_table(path)
    kept = table.filter(pq.ParquetFile(path).read(columns=["episode_index"]).column(0).to_numpy() < keep)
    if kept.num_rows == table.num_rows:
        return
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(kept, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True)
class RepairReport:
    removed: list[str]
    restored_metadata: bool


def check_and_repair(root: Path) -> tuple[CommitRecord | None, RepairReport]:
    """Bring the dataset at `root` back to its last commit, or refuse with `DatasetError`.

    Datasets without a zk0 commit record (written by lerobot-record, say) are only checked: if every
    episode info.json counts is intact and nothing else is there, zk0 adopts it; otherwise it refuses.
    """
    if not (root / INFO_PATH).exists():
        raise DatasetError(f"{root} exists but is not a LeRobot dataset (no {INFO_PATH}); choose another --dataset name")
    record = read_commit(root)
    if record is None:
        return None, _check_foreign(root)
    committed = record.committed
    _restore_metadata(root, record)  # info.json must describe the committed layout before inspecting it
    inspection = inspect_dataset(root, committed)
    if inspection.problem:
        raise DatasetError(
            f"{root}: committed {inspection.problem}; episodes 0..{inspection.intact - 1} are intact. "
            "zk0 will not append past damage: restore the dataset from a backup or record into a new --dataset name"
        )
    removed = []
    for path in _dataset_files(root):
        if path in inspection.referenced:
            if path.suffix == ".parquet":  # a file shared with a later, uncommitted episode keeps only committed rows
                _rewrite_without_later_episodes(path, committed)
            continue
        path.unlink()
        removed.append(str(path.relative_to(root)))
    for path in _leftovers(root):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        removed.append(str(path.relative_to(root)))
    return record, RepairReport(removed=removed, restored_metadata=True)


def _restore_metadata(root: Path, record: CommitRecord) -> None:
    write_file_atomic(root / INFO_PATH, json.dumps(record.info, indent=4).encode())
    if record.stats is not None:
        write_file_atomic(root / STATS_PATH, json.dumps(record.stats, indent=4).encode())
    elif (root / STATS_PATH).exists():
        (root / STATS_PATH).unlink()
    if record.tasks:
        _write_tasks(root, record.tasks)
    elif (root / DEFAULT_TASKS_PATH).exists():
        (root / DEFAULT_TASKS_PATH).unlink()


def _check_foreign(root: Path) -> RepairReport:
    try:
        total = json.loads((root / INFO_PATH).read_text())["total_episodes"]
    except (ValueError, KeyError):
        raise DatasetError(f"{root}: {INFO_PATH} is unreadable and there is no zk0 commit record; record into a new --dataset name") from None
    inspection = inspect_dataset(root, total)
    stray = [p for p in _dataset_files(root) if p not in inspection.referenced]
    if inspection.problem or stray:
        what = inspection.problem or f"{stray[0].relative_to(root)} belongs to no episode"
        raise DatasetError(
            f"{root}: not recorded by zk0 and inconsistent ({what}); "
            f"episodes 0..{inspection.intact - 1} are intact. Record into a new --dataset name"
        )
    # lerobot-record leaves its image staging directory behind; no saved episode needs it.
    removed = []
    for path in _leftovers(root):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        removed.append(str(path.relative_to(root)))
    return RepairReport(removed=removed, restored_metadata=False)
