"""Write any reader as a LeRobot dataset (v3.0, or the v2.1 layout), images in parquet or MP4.

``vla-ft data synth OUT`` uses it to put the synthetic task on disk, which also gives the
readers a file fixture. Layout written (v3.0; v2.1 differs as described in ``lerobot_meta``)::

    OUT/meta/info.json, meta/tasks.parquet, meta/stats.json
    OUT/meta/episodes/chunk-000/file-000.parquet      one row per episode, incl. stats/<feature>/<stat>
    OUT/data/chunk-000/file-{k:03d}.parquet           ``episodes_per_file`` episodes, one row group each
    OUT/videos/<camera>/chunk-000/file-{k:03d}.mp4    (video=True) the same episodes, back to back
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from robot_data.normalize import compute_stats
from robot_data.reader import Episode, EpisodeArrays, Reader
from robot_data.video import encode_video

CHUNKS_SIZE = 1000
FILE_SIZES_IN_MB = {"data_files_size_in_mb": 100, "video_files_size_in_mb": 500}
"""v3.0 info.json keys LeRobot always writes (its defaults) and reads when it appends episodes."""
V3_DATA = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
V3_VIDEO = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
V2_DATA = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
V2_VIDEO = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
STATE, ACTION = "observation.state", "action"
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # the HF datasets Image() layout


def frame_tasks(ep: Episode, tasks: list[str] | None) -> list[str]:
    """Each frame's instruction: the reader's per-frame ones when it changes within the episode."""
    return list(tasks) if tasks is not None else [ep.task] * ep.length


class LeRobotCameraNames(Reader):
    """``reader`` with its cameras named as LeRobot names them (``observation.images.<last part>``)
    and without the episodes it could not read (``reader.unreadable``), for :func:`write_lerobot`."""

    def __init__(self, reader: Reader):
        self.reader, self.fps, self.gripper_dims = reader, reader.fps, list(reader.gripper_dims)
        self.source = {f"observation.images.{c.replace('/', '.').rsplit('.', 1)[-1]}": c for c in reader.cameras}
        if len(self.source) != len(reader.cameras):
            raise ValueError(f"cameras {reader.cameras}: two end in the same name")
        self.cameras = list(self.source)
        self.skipped = set(getattr(reader, "unreadable", {}))

    def episodes(self) -> list[Episode]:
        return [e for e in self.reader.episodes() if e.index not in self.skipped]

    def numeric(self, episode_index: int) -> EpisodeArrays:
        return self.reader.numeric(episode_index)

    def frames(self, episode_index: int, camera: str, frame_indices) -> np.ndarray:
        return self.reader.frames(episode_index, self.source[camera], frame_indices)


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _vectors(x: np.ndarray) -> pa.Array:
    """(n, D) float -> fixed-size list column, as HF datasets writes Sequence(length=D)."""
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.float32()), x.shape[1])


def _stats_json(reader: Reader, episodes: list[Episode]) -> dict[str, dict[str, list[float]]]:
    """Stats of ``episodes`` as LeRobot writes them: ``count`` is the frame count, shape (1,) (its
    ``aggregate_stats`` refuses any other shape), not the per-dim finite counts of ``compute_stats``."""
    stats = compute_stats(reader, [e.index for e in episodes])
    frames = [sum(e.length for e in episodes)]
    names = {STATE: "state", ACTION: "action"}
    return {name: {**{s: v.tolist() for s, v in stats[key].items()}, "count": frames} for name, key in names.items()}


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _write_tasks_v3(path: Path, tasks: list[str]) -> None:
    # pandas metadata marks "task" as the index, as lerobot's pd.read_parquet expects.
    column = {"metadata": None, "pandas_type": "int64", "numpy_type": "int64"}
    pandas_meta = {
        "index_columns": ["task"],
        "column_indexes": [],
        "pandas_version": "2.2.0",
        "columns": [
            {**column, "name": "task_index", "field_name": "task_index"},
            {**column, "name": "task", "field_name": "task", "pandas_type": "unicode", "numpy_type": "object"},
        ],
    }
    table = pa.table({"task_index": pa.array(range(len(tasks)), pa.int64()), "task": pa.array(tasks, pa.string())})
    pq.write_table(table.replace_schema_metadata({"pandas": json.dumps(pandas_meta)}), path)


class _Writer:
    """Shared settings of one write; ``write_file`` writes one data file and its videos."""

    def __init__(
        self,
        reader: Reader,
        out: Path,
        version: str,
        video: bool,
        codec: str,
        gop: int,
        text_name: str | None,
        tasks: list[str],
        episodes: list[Episode],
    ):
        self.reader, self.out, self.version, self.video = reader, out, version, video
        self.codec, self.gop, self.text_name = codec, gop, text_name
        self.task_ids = {t: i for i, t in enumerate(tasks)}
        self.ids = written_ids(episodes)

    def _table(self, ep: Episode, arrays: EpisodeArrays, first_index: int) -> pa.Table:
        n = len(arrays.state)
        cols: dict[str, pa.Array] = {STATE: _vectors(arrays.state), ACTION: _vectors(arrays.action)}
        if not self.video:
            for camera in self.reader.cameras:
                images = self.reader.frames(ep.index, camera, range(n))
                cols[camera] = pa.array([{"bytes": _png(im), "path": None} for im in images], IMAGE_TYPE)
        if self.text_name:
            cols[self.text_name] = pa.array(arrays.text, pa.string())
        # frame_index / fps, as the videos are encoded and LeRobot reads them (a source's own clock,
        # an HDF5 timestamp of seconds since boot say, would point past every video segment).
        cols["timestamp"] = pa.array((np.arange(n) / self.reader.fps).astype(np.float32))
        cols["frame_index"] = pa.array(np.arange(n, dtype=np.int64))
        cols["episode_index"] = pa.array(np.full(n, self.ids[ep.index], np.int64))
        cols["index"] = pa.array(np.arange(first_index, first_index + n, dtype=np.int64))
        cols["task_index"] = pa.array([self.task_ids[t] for t in frame_tasks(ep, arrays.tasks)], pa.int64())
        return pa.table(cols)

    def write_file(self, file_number: int, group: list[Episode], index: int) -> list[dict[str, Any]]:
        """Write one data file (one row group per episode) and its videos; return the episode rows."""
        chunk, file_index = divmod(file_number, CHUNKS_SIZE)
        if self.version == "v3.0":
            path = self.out / V3_DATA.format(chunk_index=chunk, file_index=file_index)
        else:
            new = self.ids[group[0].index]
            path = self.out / V2_DATA.format(episode_chunk=new // CHUNKS_SIZE, episode_index=new)
        path.parent.mkdir(parents=True, exist_ok=True)
        rows, writer = [], None
        for ep in group:
            arrays = self.reader.numeric(ep.index)
            table = self._table(ep, arrays, index)
            writer = writer or pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
            rows.append(
                {
                    "episode_index": self.ids[ep.index],
                    "tasks": list(dict.fromkeys(frame_tasks(ep, arrays.tasks))),
                    "length": ep.length,
                    "data/chunk_index": chunk,
                    "data/file_index": file_index,
                    "dataset_from_index": index,
                    "dataset_to_index": index + ep.length,
                    "meta/episodes/chunk_index": 0,
                    "meta/episodes/file_index": 0,
                    "stats": _stats_json(self.reader, [ep]),
                }
            )
            index += ep.length
        if writer is not None:
            writer.close()
        if self.video:
            for camera in self.reader.cameras:
                self._write_video(camera, chunk, file_index, group, rows)
        return rows

    def _write_video(self, camera: str, chunk: int, file_index: int, group: list[Episode], rows: list[dict]) -> None:
        if self.version == "v3.0":
            path = self.out / V3_VIDEO.format(video_key=camera, chunk_index=chunk, file_index=file_index)
        else:
            new = self.ids[group[0].index]
            path = self.out / V2_VIDEO.format(episode_chunk=new // CHUNKS_SIZE, video_key=camera, episode_index=new)
        frames = (im for ep in group for im in self.reader.frames(ep.index, camera, range(ep.length)))
        encode_video(frames, path, self.reader.fps, self.codec, self.gop)
        offset = 0
        for ep, row in zip(group, rows, strict=True):
            row[f"videos/{camera}/chunk_index"], row[f"videos/{camera}/file_index"] = chunk, file_index
            row[f"videos/{camera}/from_timestamp"] = offset / self.reader.fps
            row[f"videos/{camera}/to_timestamp"] = (offset + ep.length) / self.reader.fps
            offset += ep.length

    def features(self, dims: tuple[int, int]) -> dict[str, Any]:
        reader = self.reader
        action_names = ["gripper" if i in reader.gripper_dims else f"action_{i}" for i in range(dims[1])]
        features: dict[str, Any] = {
            STATE: {"dtype": "float32", "shape": [dims[0]], "names": [f"state_{i}" for i in range(dims[0])]},
            ACTION: {"dtype": "float32", "shape": [dims[1]], "names": action_names},
        }
        for camera in reader.cameras:
            h, w, c = reader.frames(reader.episodes()[0].index, camera, [0]).shape[1:]
            features[camera] = {
                "dtype": "video" if self.video else "image",
                "shape": [h, w, c],
                "names": ["height", "width", "channels"],
            }
            if self.video:
                features[camera]["info"] = {
                    "video.height": h,
                    "video.width": w,
                    "video.codec": self.codec,
                    "video.pix_fmt": "yuv420p",
                    "video.is_depth_map": False,
                    "video.fps": reader.fps,
                    "video.channels": c,
                    "has_audio": False,
                }
        if self.text_name:
            features[self.text_name] = {"dtype": "string", "shape": [1], "names": None}
        for name, dtype in (
            ("timestamp", "float32"),
            ("frame_index", "int64"),
            ("episode_index", "int64"),
            ("index", "int64"),
            ("task_index", "int64"),
        ):
            features[name] = {"dtype": dtype, "shape": [1], "names": None}
        return features


def check_new_directory(out: Path) -> None:
    """Refuse an ``out`` that holds anything, before the first write: files already there are never
    overwritten or mixed into a new dataset."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a directory; choose a new or empty output directory")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not empty; choose a new or empty output directory")


def written_ids(episodes: list[Episode]) -> dict[int, int]:
    """{source id: written id}: written episodes are numbered 0..N-1 in order, as LeRobot finds an
    episode's metadata by its position (a source's gaps, a skipped episode, would name another)."""
    return {e.index: i for i, e in enumerate(episodes)}


def renumbering(reader: Reader) -> dict[int, int]:
    """{source id: written id} of the episodes :func:`write_lerobot` writes under another id."""
    return {old: new for old, new in written_ids(reader.episodes()).items() if old != new}


def write_lerobot(
    reader: Reader,
    out_dir: str | Path,
    video: bool,
    codec: str = "h264",
    version: str = "v3.0",
    episodes_per_file: int = 50,
    text_name: str | None = "narration",
    gop: int = 2,
) -> Path:
    """Write every episode of ``reader`` under ``out_dir`` (which must not exist or be empty), as
    episodes 0..N-1 in the reader's order (:func:`renumbering` gives the ids that changed).

    video: MP4 per camera (``codec`` h264 or av1, keyframe every ``gop`` frames) instead of
    PNG bytes in parquet. text_name: column for the reader's per-frame text (skipped when the
    reader has none). version "v2.1" writes the one-file-per-episode layout. Returns ``out_dir``.
    """
    if version not in ("v3.0", "v2.1"):
        raise ValueError(f"version: unknown '{version}'; valid: v3.0, v2.1")
    out = Path(out_dir)
    check_new_directory(out)
    episodes = reader.episodes()
    first = reader.numeric(episodes[0].index)
    tasks = list(dict.fromkeys(t for e in episodes for t in frame_tasks(e, reader.numeric(e.index).tasks)))
    text = text_name if first.text is not None else None
    writer = _Writer(reader, out, version, video, codec, gop, text, tasks, episodes)
    per_file = episodes_per_file if version == "v3.0" else 1
    rows, index = [], 0
    for number, start in enumerate(range(0, len(episodes), per_file)):
        group = episodes[start : start + per_file]
        rows += writer.write_file(number, group, index)
        index += sum(e.length for e in group)
    info: dict[str, Any] = {
        "codebase_version": version,
        "robot_type": "synthetic",
        "total_episodes": len(episodes),
        "total_frames": index,
        "total_tasks": len(tasks),
        "chunks_size": CHUNKS_SIZE,
        **(FILE_SIZES_IN_MB if version == "v3.0" else {}),
        "fps": reader.fps,
        "splits": {"train": f"0:{len(episodes)}"},
        "data_path": V3_DATA if version == "v3.0" else V2_DATA,
        "video_path": (V3_VIDEO if version == "v3.0" else V2_VIDEO) if video else None,
        "features": writer.features((first.state.shape[1], first.action.shape[1])),
    }
    (out / "meta").mkdir(parents=True, exist_ok=True)
    (out / "meta/info.json").write_text(json.dumps(info, indent=4))
    if version == "v3.0":
        _write_tasks_v3(out / "meta/tasks.parquet", tasks)
        for row in rows:  # per-episode stats are flat columns in v3.0
            row.update({f"stats/{k}/{s}": v for k, d in row.pop("stats").items() for s, v in d.items()})
        (out / "meta/episodes/chunk-000").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), out / "meta/episodes/chunk-000/file-000.parquet")
        stats = _stats_json(reader, episodes)
        (out / "meta/stats.json").write_text(json.dumps(stats, indent=4))
    else:
        _jsonl(out / "meta/tasks.jsonl", [{"task_index": i, "task": t} for i, t in enumerate(tasks)])
        _jsonl(out / "meta/episodes.jsonl", [{k: r[k] for k in ("episode_index", "tasks", "length")} for r in rows])
        _jsonl(
            out / "meta/episodes_stats.jsonl",
            [{"episode_index": r["episode_index"], "stats": r["stats"]} for r in rows],
        )
    return out
