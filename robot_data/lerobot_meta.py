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
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise DatasetFormatError(f"{path}: invalid JSON line ({err})") from None
    bad = next((i for i, row in enumerate(rows, 1) if not isinstance(row, dict)), None)
    if bad is not None:
        raise DatasetFormatError(f"{path}: row {bad} is not a JSON object")
    return rows


def is_v3(info: dict[str, Any]) -> bool:
    return str(info.get("codebase_version", "")).startswith("v3")


def _cell(row: dict[str, Any], key: str, where: str) -> Any:
    """A required cell of a metadata row; missing or null is a DatasetFormatError naming ``where``."""
    value = row.get(key)
    if value is None:
        raise DatasetFormatError(f"{where}: {key} is {'null' if key in row else 'missing'}")
    return value


def _number(row: dict[str, Any], key: str, where: str, kind: type = int) -> Any:
    value = _cell(row, key, where)
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise DatasetFormatError(f"{where}: {key} is {value!r}, not a number") from None


def _template(info: dict[str, Any], key: str, root: Path, **fields: Any) -> str:
    """``info[key]`` (a path template) formatted with ``fields``; a null or unknown template is an error."""
    template = info.get(key)
    try:
        return template.format(**fields)
    except (AttributeError, KeyError, IndexError, ValueError) as err:
        if isinstance(err, KeyError):
            why = f"{key} {template!r} has an unknown placeholder {err}; valid: {', '.join(fields)}"
        else:
            why = f"{key} is {template!r}, not a path template"
        raise DatasetFormatError(f"{root / 'meta/info.json'}: {why}") from None


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


def _video_ref_v3(root: Path, info: dict[str, Any], row: dict[str, Any], cam: str, where: str) -> VideoRef:
    """One camera's segment of a v3 episode. ``from_timestamp`` is required, as LeRobot reads it: a
    default of 0 would silently give every episode of a shared file the first episode's frames."""
    prefix = f"videos/{cam}/"
    chunk, file = _number(row, prefix + "chunk_index", where), _number(row, prefix + "file_index", where)
    start = _number(row, prefix + "from_timestamp", where, float)
    end = None if row.get(prefix + "to_timestamp") is None else _number(row, prefix + "to_timestamp", where, float)
    return VideoRef(
        root / _template(info, "video_path", root, video_key=cam, chunk_index=chunk, file_index=file), start, end
    )


def _episodes_v3(root: Path, info: dict[str, Any]) -> list[EpisodeMeta]:
    files = sorted((root / "meta/episodes").glob("*/*.parquet"))
    if not files:
        raise DatasetFormatError(f"{root / 'meta/episodes'}: no episode metadata parquet files")
    cameras = [k for k, f in info["features"].items() if f.get("dtype") == "video"]
    out = []
    for path in files:
        columns = [c for c in pq.read_schema(path).names if not c.startswith("stats/")]
        for i, row in enumerate(pq.read_table(path, columns=columns).to_pylist()):
            ep = _number(row, "episode_index", f"{path} row {i}")
            where = f"{path} (episode {ep})"
            chunk, file = _number(row, "data/chunk_index", where), _number(row, "data/file_index", where)
            data = root / _template(info, "data_path", root, chunk_index=chunk, file_index=file)
            videos = {cam: _video_ref_v3(root, info, row, cam, where) for cam in cameras}
            out.append(EpisodeMeta(ep, _number(row, "length", where), _tasks(row), data, videos))
    return sorted(out, key=lambda e: e.index)


def _episodes_v2(root: Path, info: dict[str, Any]) -> list[EpisodeMeta]:
    chunks = int(info.get("chunks_size", 1000))
    cameras = [k for k, f in info["features"].items() if f.get("dtype") == "video"]
    path = root / "meta/episodes.jsonl"
    out = []
    for n, row in enumerate(read_jsonl(path), 1):
        ep = _number(row, "episode_index", f"{path} row {n}")
        length, chunk = _number(row, "length", f"{path} row {n} (episode {ep})"), ep // chunks
        data = root / _template(info, "data_path", root, episode_chunk=chunk, episode_index=ep)
        videos = {
            cam: VideoRef(
                root / _template(info, "video_path", root, episode_chunk=chunk, video_key=cam, episode_index=ep)
            )
            for cam in cameras
        }
        out.append(EpisodeMeta(ep, length, _tasks(row), data, videos))
    return sorted(out, key=lambda e: e.index)


def _tasks_v2(root: Path) -> dict[int, str]:
    path = root / "meta/tasks.jsonl"
    rows = enumerate(read_jsonl(path), 1)
    return {_number(r, "task_index", f"{path} row {i}"): str(_cell(r, "task", f"{path} row {i}")) for i, r in rows}


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
    episodes, pooled = root / "meta/episodes_stats.jsonl", root / "meta/stats.json"
    path = episodes if not is_v3(info) and episodes.is_file() else pooled if pooled.is_file() else None
    try:
        if path == episodes:
            return aggregate_episode_stats([row["stats"] for row in read_jsonl(episodes)])
        return _as_arrays(read_json(pooled)) if path is not None else None
    except (KeyError, TypeError, ValueError, IndexError) as err:  # a row without stats, ragged or text values
        raise DatasetFormatError(f"{path}: malformed statistics ({type(err).__name__}: {err})") from None


def load_meta(root: str | Path) -> LeRobotMeta:
    """Read info, tasks, episode index and shipped stats of a LeRobot dataset directory."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"LeRobot dataset directory not found: {root}")
    info = read_json(root / "meta/info.json")
    if not isinstance(info, dict):
        raise DatasetFormatError(f"{root / 'meta/info.json'}: not a JSON object")
    missing = [k for k in ("codebase_version", "fps", "features", "data_path") if info.get(k) is None]
    if missing:
        raise DatasetFormatError(f"{root / 'meta/info.json'}: missing or null key(s) {missing}")
    fps = info["fps"]
    if isinstance(fps, bool) or not isinstance(fps, int | float) or not fps > 0:
        raise DatasetFormatError(f"{root / 'meta/info.json'}: fps is {fps!r}, not a positive number")
    if not isinstance(info["features"], dict) or not all(isinstance(f, dict) for f in info["features"].values()):
        raise DatasetFormatError(f"{root / 'meta/info.json'}: features is not a mapping of name -> feature")
    videos = [k for k, f in info["features"].items() if f.get("dtype") == "video"]
    if videos and not isinstance(info.get("video_path"), str):
        video_path = info.get("video_path")
        raise DatasetFormatError(f"{root / 'meta/info.json'}: video_path is {video_path!r}, but {videos} are videos")
    if is_v3(info):
        tasks, episodes = _tasks_v3(root), _episodes_v3(root, info)
    elif str(info["codebase_version"]).startswith("v2"):
        tasks, episodes = _tasks_v2(root), _episodes_v2(root, info)
    else:
        version = info["codebase_version"]
        raise DatasetFormatError(f"{root / 'meta/info.json'}: unsupported codebase_version {version!r}")
    return LeRobotMeta(root, info, tasks, episodes, _stats(root, info))
