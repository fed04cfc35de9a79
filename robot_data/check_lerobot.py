"""Checks of a LeRobot v3.0 / v2.1 directory (see :mod:`robot_data.check` for the contract).

Reads the metadata, then every data file once (index and numeric columns only), then decodes
the ends (or all) of every episode and camera through :class:`LeRobotReader`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from robot_data.check import Problem, checked_cameras, decode_checks, missing_text, non_finite
from robot_data.lerobot import (
    INDEX_COLUMNS,
    LeRobotReader,
    check_keys,
    column_to_numpy,
    feature_width,
    flatten_rows,
    is_list_type,
    leaf_type,
    null_index_cells,
    storage_slack,
)
from robot_data.lerobot_meta import DatasetFormatError, EpisodeMeta, LeRobotMeta, is_v3, load_meta, read_json
from robot_data.video import video_duration

NUMPY_DTYPES = {
    "float16": pa.float16(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "int64": pa.int64(),
    "int32": pa.int32(),
}
CHANNEL_NAMES = ("channels", "channel", "rgb", "color", "colour", "c")  # a camera shape's channel axis, by name
HEIGHT_NAMES, WIDTH_NAMES = ("height", "h"), ("width", "w")


def _meta_problems(root: Path) -> list[Problem]:
    """Missing or unreadable metadata files: all of them, before anything else is read (``meta/info.json``
    is there: :func:`check_lerobot` refuses a path without it)."""
    try:
        info = read_json(root / "meta/info.json")
    except DatasetFormatError as err:
        return [Problem("unreadable", str(root / "meta/info.json"), None, str(err))]
    if not isinstance(info, dict):
        return [Problem("unreadable", str(root / "meta/info.json"), None, "not a JSON object")]
    needed = ["meta/tasks.parquet"] if is_v3(info) else ["meta/tasks.jsonl", "meta/episodes.jsonl"]
    problems = [Problem("missing_file", str(root / n), None, "missing") for n in needed if not (root / n).is_file()]
    if is_v3(info) and not list((root / "meta/episodes").glob("*/*.parquet")):
        problems.append(Problem("missing_file", str(root / "meta/episodes"), None, "no episode metadata files"))
    return problems


def _episode_gaps(meta: LeRobotMeta) -> list[Problem]:
    indices = [e.index for e in meta.episodes]
    expected = list(range(len(indices)))
    if indices == expected:
        return []
    missing = sorted(set(expected) - set(indices))
    extra = sorted(set(indices) - set(expected))
    msg = f"episode indices are not 0..{len(indices) - 1}: missing {missing[:10]}, unexpected {extra[:10]}"
    return [Problem("index_gap", str(meta.root / "meta"), None, msg)]


def _type_problems(schema: pa.Schema, meta: LeRobotMeta, keys: list[str]) -> list[str]:
    """Columns whose parquet type cannot stand for the feature's dtype (scalar or list of it).

    Any float type stands for a float feature, as any integer type for an integer one: the reader
    casts to float32 (as LeRobot casts to the declared features), so float64 columns of a
    pandas-built dataset declared float32 read right. Other types (strings, floats declared as
    integers) are problems.
    """
    out = []
    for key in keys:
        value_type = leaf_type(schema.field(key).type)
        want = NUMPY_DTYPES.get(meta.features[key].get("dtype", ""))
        if want is None or value_type == want:
            continue
        if pa.types.is_floating(want) and (pa.types.is_floating(value_type) or pa.types.is_integer(value_type)):
            continue
        if pa.types.is_integer(want) and pa.types.is_integer(value_type):
            continue
        out.append(f"column {key} holds {value_type}, the features say {meta.features[key]['dtype']}")
    return out


def _width_problems(table: pa.Table, meta: LeRobotMeta, keys: list[str]) -> dict[str, np.ndarray]:
    """Per key: row ids whose vector length differs from the feature shape."""
    out = {}
    for key in keys:
        width = feature_width(meta.features[key])
        if width is None:  # no shape in info.json: nothing to compare with
            out[key] = np.zeros(0, np.int64)
            continue
        column = flatten_rows(table[key].combine_chunks())
        if is_list_type(column.type):
            lengths = pc.fill_null(pc.list_value_length(column), -1).to_numpy(zero_copy_only=False)
        else:
            lengths = np.ones(len(column), np.int64)
        out[key] = np.flatnonzero(lengths != width)
    return out


def _check_data_file(
    meta: LeRobotMeta, path: Path, episodes: list[EpisodeMeta], keys: list[str], text_key: str | None, tol: float
) -> list[Problem]:
    where = str(path)
    if not path.is_file():
        return [Problem("missing_file", where, e.index, "data file missing") for e in episodes]
    wanted = [*INDEX_COLUMNS, *keys] + ([text_key] if text_key else [])
    try:
        schema = pq.read_schema(path)
        missing = [c for c in wanted if c not in schema.names]
        table = None if missing else pq.read_table(path, columns=wanted)
    except (pa.ArrowException, OSError) as err:
        msg = f"unreadable parquet file ({type(err).__name__}: {err})"
        return [Problem("unreadable", where, e.index, msg) for e in episodes]
    if table is None:
        return [Problem("bad_feature", where, e.index, f"missing column(s) {missing}") for e in episodes]
    type_msgs = _type_problems(schema, meta, keys)
    widths = _width_problems(table, meta, keys)
    cols = {c: column_to_numpy(table[c], np.float64)[:, 0] for c in INDEX_COLUMNS}
    nulls = null_index_cells(cols)
    if nulls:  # which episode a row with a null index belongs to is unknowable
        return [Problem("bad_feature", where, e.index, nulls) for e in episodes]
    slack = storage_slack(cols["timestamp"], schema.field("timestamp").type)
    problems = []
    for ep in episodes:
        rows = np.flatnonzero(cols["episode_index"] == ep.index)
        rows = rows[np.argsort(cols["frame_index"][rows], kind="stable")]
        problems += [Problem("bad_feature", where, ep.index, m) for m in type_msgs]
        problems += _episode_problems(meta, table, cols, widths, rows, ep, keys, where, tol, slack[rows])
        if text_key:
            cells = table[text_key].take(pa.array(rows, pa.int64())).to_pylist()  # None: a null cell
            problems += missing_text(cells, text_key, where, ep.index)
    return problems


def _episode_problems(
    meta: LeRobotMeta,
    table: pa.Table,
    cols: dict[str, np.ndarray],
    widths: dict[str, np.ndarray],
    rows: np.ndarray,
    ep: EpisodeMeta,
    keys: list[str],
    where: str,
    tol: float,
    slack: np.ndarray,
) -> list[Problem]:
    """``slack`` (rows,): each timestamp's storage rounding, added to the check's ``tol``."""
    p = []
    if len(rows) != ep.length:
        p.append(Problem("index_gap", where, ep.index, f"{len(rows)} frames in the data, metadata says {ep.length}"))
    frames = cols["frame_index"][rows]
    if len(rows) and not np.array_equal(frames, np.arange(len(rows))):
        k = int(np.flatnonzero(frames != np.arange(len(rows)))[0])
        p.append(Problem("index_gap", where, ep.index, f"frame_index not contiguous: row {k} has {int(frames[k])}"))
    index = cols["index"][rows]
    if len(rows) > 1 and not np.all(np.diff(index) == 1):
        k = int(np.flatnonzero(np.diff(index) != 1)[0])
        msg = f"global index jumps from {int(index[k])} to {int(index[k + 1])}"
        p.append(Problem("index_gap", where, ep.index, msg))
    # LeRobot's rule (check_timestamps_sync): each gap is 1 / fps within the tolerance, wherever the
    # episode starts (t0 may be a recorder's clock: the videos hold its frames at those times). In
    # float64; a float32 cell is off by up to half its step (``slack``), so a gap by both ends'.
    stamps = cols["timestamp"][rows]
    gaps = np.diff(stamps)
    off = ~(np.abs(gaps - 1 / meta.fps) <= tol + slack[1:] + slack[:-1])  # NaN (a null cell) is off too
    if off.any():
        k = int(np.argmax(off)) + 1
        msg = (
            f"timestamp {stamps[k]:.4f}s at frame {int(frames[k])} disagrees with fps {meta.fps}: "
            f"{gaps[k - 1]:.4f}s after frame {int(frames[k - 1])}'s, not 1/fps = {1 / meta.fps:.4f}s"
        )
        p.append(Problem("timestamp", where, ep.index, msg))
    unknown = sorted({int(t) for t in cols["task_index"][rows]} - set(meta.tasks))
    unknown_text = [t for t in ep.tasks if t not in meta.tasks.values()]
    if unknown or unknown_text:
        p.append(Problem("unknown_task", where, ep.index, f"unknown task index(es) {unknown} / task(s) {unknown_text}"))
    # LeRobot lists an episode's tasks from its frames'; a list out of step with task_index gives the
    # frames another prompt than the metadata says (training uses the frames' own, as LeRobot's ``task``).
    listed = {t for t in ep.tasks if t in meta.tasks.values()}
    framed = list(dict.fromkeys(meta.tasks[int(t)] for t in cols["task_index"][rows] if int(t) in meta.tasks))
    if listed and framed and not set(framed) <= listed:  # a listed task no frame has is stale, not wrong
        msg = f"episode {ep.index}'s metadata lists task(s) {sorted(listed)}, its frames' task_index gives {framed}"
        p.append(Problem("task_mismatch", where, ep.index, msg))
    for key in keys:
        bad = np.intersect1d(widths[key], rows)
        if len(bad):
            shape = meta.features[key].get("shape")
            p.append(Problem("bad_feature", where, ep.index, f"{key}: {len(bad)} row(s) not of shape {shape}"))
        else:
            p += non_finite(column_to_numpy(table[key].take(pa.array(rows)), np.float64), key, where, ep.index)
    return p


def _axis(names: list[str], aliases: tuple[str, ...]) -> int | None:
    found = [i for i, n in enumerate(names) if n in aliases]
    return found[0] if len(found) == 1 else None


def expected_hwc(feature: dict[str, Any]) -> tuple[int, ...] | None:
    """A camera feature's declared ``shape`` as the (H, W, C) of the frames the reader decodes.

    Datasets declare (H, W, C) or (C, H, W) (v1 conversions). The layout comes from ``names``
    when they name the channel axis (channel, channels, rgb, ...), else from which axis is 3;
    height and width keep their declared order unless ``names`` say otherwise.
    """
    shape, names = feature.get("shape"), feature.get("names")
    if not shape or len(shape) != 3:
        return None
    names = [str(n).lower() for n in names] if isinstance(names, list) and len(names) == 3 else []
    channel = _axis(names, CHANNEL_NAMES)
    if channel is None:
        channel = 2 if shape[2] == 3 or shape[0] != 3 else 0
    rest = [i for i in range(3) if i != channel]
    height, width = _axis(names, HEIGHT_NAMES), _axis(names, WIDTH_NAMES)
    if height in rest and width in rest and height != width:
        rest = [height, width]
    return (shape[rest[0]], shape[rest[1]], shape[channel])


def _check_camera(
    reader: LeRobotReader,
    ep: EpisodeMeta,
    camera: str,
    decode: str,
    tol: float,
    durations: dict[Path, tuple[int, float] | Exception],
) -> list[Problem]:
    feature = reader.meta.features[camera]
    if feature["dtype"] == "video":
        ref = ep.videos[camera]
        if not ref.path.is_file():
            return [Problem("missing_file", str(ref.path), ep.index, f"camera {camera}: video missing")]
        if ref.path not in durations:
            try:
                durations[ref.path] = video_duration(ref.path)
            except Exception as err:  # noqa: BLE001 - PyAV's errors for a damaged file are many; each is a finding
                durations[ref.path] = err
        if isinstance(durations[ref.path], Exception):
            msg = f"camera {camera}: unreadable video ({type(durations[ref.path]).__name__}: {durations[ref.path]})"
            return [Problem("undecodable", str(ref.path), ep.index, msg)]
        _, seconds = durations[ref.path]
        last = ref.from_timestamp + float(reader.stored_times(ep.index).max()) if ep.length else 0.0
        if seconds and last > seconds - 0.5 / reader.fps + tol:
            msg = f"camera {camera}: the episode needs t={last:.3f}s, the video lasts {seconds:.3f}s"
            return [Problem("video_short", str(ref.path), ep.index, msg)]
        # Past its segment's end (to_timestamp), the frame at a time is the next episode's.
        if ref.to_timestamp is not None and ep.length and last > ref.to_timestamp - 0.5 / reader.fps + tol:
            msg = (
                f"camera {camera}: the episode needs t={last:.3f}s, its video segment "
                f"[{ref.from_timestamp:.3f}s, {ref.to_timestamp:.3f}s) ends before (to_timestamp)"
            )
            return [Problem("video_short", str(ref.path), ep.index, msg)]
        where = str(ref.path)
    else:
        where = str(ep.data_path)
    frames = lambda idx: reader.frames(ep.index, camera, idx)  # noqa: E731
    return decode_checks(frames, ep.length, expected_hwc(feature), decode, where, ep.index, camera)


def _segment_problems(meta: LeRobotMeta, cameras: list[str], starts: dict[int, float], tol: float) -> list[Problem]:
    """v3 episodes sharing a video file each own a segment of it, from their first frame (at
    from_timestamp + its timestamp) to to_timestamp: an empty segment, or one that starts inside the
    one before, gives an episode another's frames. ``starts``: each episode's first timestamp (0 when
    unknown); from_timestamp alone is not where the segment starts when the timestamps do not
    start at 0 (it maps the episode's times to the file's, as LeRobot reads it)."""
    p = []
    for camera in cameras:
        by_file: dict[Path, list[tuple[float, EpisodeMeta]]] = {}
        for ep in meta.episodes:
            ref = ep.videos.get(camera)
            if ref is not None and ref.to_timestamp is not None:
                by_file.setdefault(ref.path, []).append((ref.from_timestamp + starts.get(ep.index, 0.0), ep))
        for path, episodes in by_file.items():
            episodes.sort(key=lambda pair: pair[0])
            for before, (start, ep) in zip([None, *episodes], episodes, strict=False):
                end = ep.videos[camera].to_timestamp
                if end <= start:
                    msg = f"camera {camera}: empty video segment [{start:.3f}s, {end:.3f}s)"
                    p.append(Problem("timestamp", str(path), ep.index, msg))
                elif before is not None and start < before[1].videos[camera].to_timestamp - tol:
                    end = before[1].videos[camera].to_timestamp
                    msg = (
                        f"camera {camera}: video segment starts at {start:.3f}s, inside episode "
                        f"{before[1].index}'s (which ends at {end:.3f}s) in the same file"
                    )
                    p.append(Problem("timestamp", str(path), ep.index, msg))
    return p


def check_lerobot(
    path: str | Path,
    state_key: str = "observation.state",
    action_key: str = "action",
    text_key: str | None = None,
    video_tolerance_s: float = 1e-3,
    decode: str = "ends",
    cameras: Sequence[str] = (),
    **_: Any,
) -> list[Problem]:
    """Every problem of a LeRobot directory (metadata, data files, videos/images of ``cameras``, or
    of every camera when empty).

    A key naming no feature raises :class:`UnknownFeatureError`: the caller's typo, not the data's problem;
    a path without ``meta/info.json`` (a file, a directory of another format) raises :class:`DatasetFormatError`:
    it is no LeRobot dataset, and a list of problems would not say so.
    """
    root = Path(path)
    if not root.exists():
        return [Problem("missing_file", str(root), None, "dataset directory not found")]
    if not (root / "meta/info.json").is_file():
        raise DatasetFormatError(f"{root}: no meta/info.json")
    problems = _meta_problems(root)
    if problems:
        return problems
    try:
        meta = load_meta(root)
    except (DatasetFormatError, KeyError, ValueError, OSError, pa.ArrowException) as err:
        return [Problem("unreadable", str(root / "meta"), None, f"{type(err).__name__}: {err}")]
    check_keys(root, meta.features, state_key=state_key, action_key=action_key, text_key=text_key)
    keys = [k for k in (state_key, action_key) if k]
    problems += _episode_gaps(meta)
    tol = max(video_tolerance_s, 1e-4)
    checked = checked_cameras(meta.cameras, cameras)
    by_file: dict[Path, list[EpisodeMeta]] = {}
    for ep in meta.episodes:
        by_file.setdefault(ep.data_path, []).append(ep)
    for data_path, episodes in by_file.items():
        problems += _check_data_file(meta, data_path, episodes, keys, text_key, tol)
    unusable = {p.episode for p in problems if p.kind in ("missing_file", "unreadable", "bad_feature", "index_gap")}
    reader = LeRobotReader(root, state_key, action_key, text_key, video_tolerance_s)
    starts = {
        ep.index: float(reader.stored_times(ep.index)[0])
        for ep in meta.episodes
        if ep.index not in unusable and ep.length and any(ep.videos.get(c) for c in checked)
    }
    problems += _segment_problems(meta, checked, starts, tol)
    durations: dict[Path, tuple[int, float] | Exception] = {}
    for ep in meta.episodes:
        if ep.index not in unusable:
            for camera in checked:
                problems += _check_camera(reader, ep, camera, decode, tol, durations)
    return problems
