"""LeRobot dataset metadata (v3.0 and v2.x) read from a local directory, without ``lerobot``.

v3.0 (many episodes per file)::

    meta/info.json                  codebase_version, fps, features, data_path, video_path, chunks_size
    meta/tasks.parquet              task (pandas index) -> task_index
    meta/episodes/chunk-XXX/file-XXX.parquet
                                    episode_index, tasks, length, data/{chunk,file}_index,
                                    videos/<key>/{chunk_index,file_index,from_timestamp,to_timestamp}
    meta/stats.json                 {feature: {mean, std, min, max, count, q01, ...}}
    data/chunk-XXX/file-XXX.parquet one row per frame
    videos/<key>/chunk-XXX/file-XXX.mp4

v2.1 (one file per episode): ``meta/tasks.jsonl``, ``meta/episodes.jsonl``,
``meta/episodes_stats.jsonl`` (per-episode stats, aggregated here), ``data_path`` and
``video_path`` templates formatted with ``episode_chunk = episode_index // chunks_size``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from robot_data.reader import DatasetFormatError, UnknownFeatureError  # noqa: F401 - defined there for every format

VISUAL_DTYPES = ("image", "video")


@dataclass
class VideoRef:
    """Where one episode of one camera lives: a file and the episode's start time in it."""

    path: Path
    from_timestamp: float = 0.0
    to_timestamp: float | None = None


@dataclass
class EpisodeMeta:
    index: int
    length: int
    tasks: list[str]
    data_path: Path
    videos: dict[str, VideoRef] = field(default_factory=dict)


@dataclass
class LeRobotMeta:
    root: Path
    info: dict[str, Any]
    tasks: dict[int, str]
    episodes: list[EpisodeMeta]
    stats: dict[str, dict[str, np.ndarray]] | None

    @property
    def version(self) -> str:
        return str(self.info.get("codebase_version", ""))

    @property
    def fps(self) -> float:
        return float(self.info["fps"])

    @property
    def features(self) -> dict[str, dict[str, Any]]:
        return self.info["features"]

    @property
    def cameras(self) -> list[str]:
        return [k for k, f in self.features.items() if f.get("dtype") in VISUAL_DTYPES]


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise DatasetFormatError(f"{path}: missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DatasetFormatError(f"{path}: invalid JSON ({err})") from None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DatasetFormatError(f"{path}: missing")
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise DatasetFormatError(f"{path}: invalid JSON line ({err})") from None


def is_v3(info: dict[str, Any]) -> bool:
    return str(info.get("codebase_version", "")).startswith("v3")


def _tasks_v3(root: Path) -> dict[int, str]:
    path = root / "meta/tasks.parquet"
    if not path.is_file():
        raise DatasetFormatError(f"{path}: missing")
    table = pq.read_table(path)
    # The task text is the pandas index: a column named "task", or "__index_level_0__" when unnamed.
    name = next((n for n in ("task", "__index_level_0__") if n in table.column_names), None)
    if name is None or "task_index" not in table.column_names:
        raise DatasetFormatError(f"{path}: expected columns task and task_index, got {table.column_names}")
    return dict(zip(table["task_index"].to_pylist(), table[name].to_pylist(), strict=True))


def _tasks(row: dict[str, Any]) -> list[str]:
    """An episode's ``tasks`` cell: a list as LeRobot writes it, or one string (third-party writers)."""
    tasks = row.get("tasks") or []
    return [tasks] if isinstance(tasks, str) else list(tasks)


def _episodes_v3(root: Path, info: dict[str, Any]) -> list[EpisodeMeta]:
    files = sorted((root / "meta/episodes").glob("*/*.parquet"))
    if not files:
        raise DatasetFormatError(f"{root / 'meta/episodes'}: no episode metadata parquet files")
    cameras = [k for k, f in info["features"].items() if f.get("dtype") == "video"]
    out = []
    for path in files:
        columns = [c for c in pq.read_schema(path).names if not c.startswith("stats/")]
        for row in pq.read_table(path, columns=columns).to_pylist():
            data = info["data_path"].format(chunk_index=row["data/chunk_index"], file_index=row["data/file_index"])
            videos = {
                cam: VideoRef(
                    root
                    / info["video_path"].format(
                        video_key=cam,
                        chunk_index=row[f"videos/{cam}/chunk_index"],
                        file_index=row[f"videos/{cam}/file_index"],
                    ),
                    float(row.get(f"videos/{cam}/from_timestamp") or 0.0),
                    row.get(f"videos/{cam}/to_timestamp"),
                )
                for cam in cameras
            }
            out.append(EpisodeMeta(int(row["episode_index"]), int(row["length"]), _tasks(row), root / data, videos))
    return sorted(out, key=lambda e: e.index)


def _episodes_v2(root: Path, info: dict[str, Any]) -> list[EpisodeMeta]:
    chunks = int(info.get("chunks_size", 1000))
    cameras = [k for k, f in info["features"].items() if f.get("dtype") == "video"]
    out = []
    for row in read_jsonl(root / "meta/episodes.jsonl"):
        ep, chunk = int(row["episode_index"]), int(row["episode_index"]) // chunks
        data = root / info["data_path"].format(episode_chunk=chunk, episode_index=ep)
        videos = {
            cam: VideoRef(root / info["video_path"].format(episode_chunk=chunk, video_key=cam, episode_index=ep))
            for cam in cameras
        }
        out.append(EpisodeMeta(ep, int(row["length"]), _tasks(row), data, videos))
    return sorted(out, key=lambda e: e.index)


def _as_arrays(stats: dict[str, dict[str, Any]]) -> dict[str, dict[str, np.ndarray]]:
    return {k: {s: np.asarray(v, np.float64) for s, v in d.items()} for k, d in stats.items() if isinstance(d, dict)}


def aggregate_episode_stats(per_episode: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, np.ndarray]]:
    """Pool per-episode {mean, std, min, max, count} into dataset stats (quantiles cannot be pooled)."""
    out: dict[str, dict[str, np.ndarray]] = {}
    needed = ("mean", "std", "min", "max", "count")
    keys = {k for ep in per_episode for k, d in ep.items() if all(s in d for s in needed)}
    for key in sorted(keys):
        parts = [_as_arrays({key: ep[key]})[key] for ep in per_episode if key in ep]
        counts = np.array([float(np.ravel(p["count"])[0]) for p in parts])
        total = counts.sum()
        w = (counts / max(total, 1.0)).reshape(-1, *[1] * parts[0]["mean"].ndim)
        means, stds = np.stack([p["mean"] for p in parts]), np.stack([p["std"] for p in parts])
        mean = (w * means).sum(0)
        var = (w * (stds**2 + (means - mean) ** 2)).sum(0)  # law of total variance
        lo, hi = np.min(np.stack([p["min"] for p in parts]), 0), np.max(np.stack([p["max"] for p in parts]), 0)
        out[key] = {"mean": mean, "std": np.sqrt(var), "min": lo, "max": hi, "count": np.array([total])}
    return out


def _stats(root: Path, info: dict[str, Any]) -> dict[str, dict[str, np.ndarray]] | None:
    """The dataset's shipped stats, as LeRobot reads them: v2.1 pools ``episodes_stats.jsonl`` (a
    ``stats.json`` left from v2.0 is stale there; LeRobot ignores it), v3.0 and older read ``stats.json``."""
    if not is_v3(info) and (root / "meta/episodes_stats.jsonl").is_file():
        return aggregate_episode_stats([row["stats"] for row in read_jsonl(root / "meta/episodes_stats.jsonl")])
    if (root / "meta/stats.json").is_file():
        return _as_arrays(read_json(root / "meta/stats.json"))
    return None


def load_meta(root: str | Path) -> LeRobotMeta:
    """Read info, tasks, episode index and shipped stats of a LeRobot dataset directory."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"LeRobot dataset directory not found: {root}")
    info = read_json(root / "meta/info.json")
    missing = [k for k in ("codebase_version", "fps", "features", "data_path") if k not in info]
    if missing:
        raise DatasetFormatError(f"{root / 'meta/info.json'}: missing key(s) {missing}")
    if is_v3(info):
        tasks, episodes = _tasks_v3(root), _episodes_v3(root, info)
    elif str(info["codebase_version"]).startswith("v2"):
        rows = read_jsonl(root / "meta/tasks.jsonl")
        tasks, episodes = {int(r["task_index"]): r["task"] for r in rows}, _episodes_v2(root, info)
    else:
        version = info["codebase_version"]
        raise DatasetFormatError(f"{root / 'meta/info.json'}: unsupported codebase_version {version!r}")
    return LeRobotMeta(root, info, tasks, episodes, _stats(root, info))
