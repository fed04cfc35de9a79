"""LeRobot datasets (v3.0 and v2.1) from a local directory, without importing ``lerobot``.

Numbers come from the data parquet files (only the columns needed, cached per file); frames
come from image bytes stored in parquet (PNG/JPEG) or from MP4 videos decoded with PyAV and
located by timestamp, optionally through an on-disk decoded-frame cache (``frame_cache``).

Image bytes are read one parquet row group of one camera at a time (the smallest unit parquet
reads: HF datasets and LeRobot write 100 rows per group, the writer here one episode) and kept
in a per-process LRU bounded in bytes, so shuffled samples over several cameras never re-read a
file's whole image column.
"""

from __future__ import annotations

import hashlib
import io
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from robot_data.frame_cache import FrameCache
from robot_data.lerobot_meta import EpisodeMeta, load_meta
from robot_data.reader import DatasetFormatError, Episode, EpisodeArrays, Reader, UnknownFeatureError
from robot_data.video import VideoDecoder, VideoFrameError

IMAGE_CACHE_BYTES = 256 << 20  # image cells kept per process (LRU), yet always one row group per camera
INDEX_COLUMNS = ("episode_index", "frame_index", "timestamp", "index", "task_index")
OPTIONAL_COLUMNS = ("task_index",)  # read when present: an episode's instruction may change per frame


def is_list_type(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def leaf_type(t: pa.DataType) -> pa.DataType:
    """The value type under every list level: float32 for list<list<float32>>."""
    while is_list_type(t):
        t = t.value_type
    return t


def flatten_rows(column: pa.Array) -> pa.Array:
    """Each row's values in row-major order, one list level: LeRobot stores a feature of 2-D shape
    as ``datasets.Array2D``, a list of lists per row. A row with a null inside becomes null."""
    if not (is_list_type(column.type) and is_list_type(column.type.value_type)):
        return column

    def flat(row: list | None) -> list | None:
        if row is None:
            return None
        out: list = []
        for value in row:
            value = flat(value) if isinstance(value, list) else value
            if value is None:
                return None
            out += value if isinstance(value, list) else [value]
        return out

    return pa.array([flat(r) for r in column.to_pylist()], pa.list_(leaf_type(column.type)))


def column_to_numpy(
    column: pa.ChunkedArray | pa.Array, dtype: Any = np.float32, width: int | None = None
) -> np.ndarray:
    """A scalar or list column of n rows -> (n, D) array; null rows become NaN rows.

    ``width`` (the feature's size from ``info.json``) sets D; a row of another length becomes a
    NaN row, so one malformed row never shifts or widens the other rows of its file (the
    checks name it). Without ``width``, D is the longest row and shorter rows are NaN-padded.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    column = flatten_rows(column)
    if not is_list_type(column.type):
        return column.to_numpy(zero_copy_only=False).astype(dtype).reshape(len(column), 1)
    lengths = pc.list_value_length(column)
    span = pc.min_max(lengths).as_py()
    if column.null_count == 0 and len(column) and span["min"] == span["max"] and width in (None, span["min"]):
        values = pc.list_flatten(column).to_numpy(zero_copy_only=False)
        return values.astype(dtype).reshape(len(column), -1)
    rows = column.to_pylist()  # ragged, null or mis-sized rows: slow path
    full = width if width is not None else max((len(r) for r in rows if r is not None), default=0)
    out = np.full((len(rows), full), np.nan, dtype)
    for i, r in enumerate(rows):
        if r is not None and (width is None or len(r) == width):
            out[i, : len(r)] = np.asarray(r, dtype=np.float64).astype(dtype)
    return out


def storage_slack(values: np.ndarray, stored: pa.DataType) -> np.ndarray:
    """Half a unit in the last place of each of ``values`` (float64) at the float precision of
    ``stored`` (0 for float64 and integers): how far a stored value may lie from the exact one it
    rounds. LeRobot stores ``timestamp`` as float32, whose steps pass 1e-4 s beyond 2048 s (a long
    episode), more than a tight ``video_tolerance_s``: k / fps itself is stored that far off."""
    stored = leaf_type(stored)
    if not pa.types.is_floating(stored) or stored.bit_width >= 64:
        return np.zeros(np.shape(values))
    narrow = np.abs(np.asarray(values, np.float64)).astype(stored.to_pandas_dtype())
    return np.spacing(narrow).astype(np.float64) / 2


@dataclass
class DataFile:
    """Numeric columns of one data parquet file; ``rows[episode]`` = row ids sorted by frame_index.

    ``group_starts`` (n_groups + 1,): the first row of each row group, then the row count;
    ``metadata``: the footer, so image reads skip re-parsing it; ``text``: None for a null cell;
    ``stamp_slack`` (rows,): each timestamp's storage rounding (:func:`storage_slack`).
    """

    columns: dict[str, np.ndarray]
    text: list[str | None] | None
    rows: dict[int, np.ndarray]
    group_starts: np.ndarray
    metadata: pq.FileMetaData
    stamp_slack: np.ndarray


def read_data_file(path: Path, numeric: dict[str, int | None], text_key: str | None) -> DataFile:
    """Read the index columns plus the ``numeric`` columns (name -> width) and ``text_key`` of one data file."""
    if not path.is_file():
        raise DatasetFormatError(f"{path}: data file missing")
    wanted = ["episode_index", "frame_index", "timestamp", *numeric] + ([text_key] if text_key else [])
    try:
        present = set(pq.read_schema(path).names)
        missing = [c for c in wanted if c not in present]
        if missing:
            raise DatasetFormatError(f"{path}: missing column(s) {missing}")
        optional = [c for c in OPTIONAL_COLUMNS if c in present]
        table = pq.read_table(path, columns=list(dict.fromkeys(wanted + optional)))
        metadata = pq.read_metadata(path)
    except (pa.ArrowException, OSError) as err:
        raise DatasetFormatError(f"{path}: unreadable parquet file ({type(err).__name__}: {err})") from None
    names = dict.fromkeys(wanted + optional)
    columns = {c: column_to_numpy(table[c], np.float64, numeric.get(c)) for c in names if c != text_key}
    nulls = null_index_cells({c: columns[c][:, 0] for c in INDEX_COLUMNS if c in columns})
    if nulls:
        raise DatasetFormatError(f"{path}: {nulls}")
    episode, frame = columns["episode_index"][:, 0].astype(np.int64), columns["frame_index"][:, 0]
    order = np.lexsort((frame, episode))
    ids, starts = np.unique(episode[order], return_index=True)
    bounds = [*starts[1:], len(order)]
    rows = {int(e): order[s:b] for e, s, b in zip(ids, starts, bounds, strict=True)}
    # A null cell is a frame without text (no language target), never the narration "None".
    text = [None if t is None else str(t) for t in table[text_key].to_pylist()] if text_key else None
    sizes = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
    starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
    slack = storage_slack(columns["timestamp"][:, 0], table.schema.field("timestamp").type)
    return DataFile(columns, text, rows, starts, metadata, slack)


def null_index_cells(columns: dict[str, np.ndarray]) -> str | None:
    """What is wrong with the first of ``columns`` (name -> (rows,) float) that has a null cell, else None.

    A null episode or frame index leaves its row nowhere; a null timestamp or task index, a frame
    without a video time or an instruction.
    """
    for name, values in columns.items():
        null = np.flatnonzero(~np.isfinite(values))
        if len(null):
            return f"column {name}: {len(null)} null cell(s), first at row {int(null[0])}"
    return None


def feature_width(feature: dict[str, Any]) -> int | None:
    """Values per frame of a numeric feature (the product of its ``shape``); None if it has none."""
    shape = feature.get("shape")
    return int(np.prod(shape)) if shape else None


def gripper_dims(feature: dict[str, Any]) -> list[int]:
    """Dims whose name mentions a gripper, from a feature's ``names`` (list or {group: list})."""
    names = feature.get("names") or []
    if isinstance(names, dict):
        names = [n for group in names.values() for n in (group if isinstance(group, list) else [group])]
    return [i for i, n in enumerate(names) if "gripper" in str(n).lower()]


NOT_NUMBERS = ("image", "video", "string")
"""Feature dtypes a state or action key cannot name."""


def check_keys(path: str | Path, features: dict[str, Any], **keys: str | None) -> None:
    """Raise :class:`UnknownFeatureError` for the first key (role=name) naming no feature, and a
    DatasetFormatError for a state or action key naming images, videos or strings; None is unset."""
    for role, key in keys.items():
        if key is not None and key not in features:
            raise UnknownFeatureError(role, key, path, list(features))
        dtype = features[key].get("dtype") if key is not None else None
        if role in ("state_key", "action_key") and dtype in NOT_NUMBERS:
            numbers = [k for k, f in features.items() if f.get("dtype") not in NOT_NUMBERS and k not in INDEX_COLUMNS]
            raise DatasetFormatError(f"data.{role}: '{key}' of {path} has dtype {dtype}; numeric features: {numbers}")


class LeRobotReader(Reader):
    """A LeRobot v3.0 / v2.1 dataset directory. Keys pick features by name (see ``meta/info.json``)."""

    def __init__(
        self,
        path: str | Path,
        state_key: str = "observation.state",
        action_key: str = "action",
        text_key: str | None = None,
        video_tolerance_s: float = 1e-3,
        frame_cache: str | Path | None = None,
    ):
        self.meta = load_meta(path)
        features = self.meta.features
        check_keys(path, features, state_key=state_key, action_key=action_key, text_key=text_key)
        self.path, self.state_key, self.action_key, self.text_key = Path(path), state_key, action_key, text_key
        self.cameras, self.fps = self.meta.cameras, self.meta.fps
        self.gripper_dims = gripper_dims(features[action_key])
        if video_tolerance_s >= 0.5 / self.fps:
            # Wider, a missing frame would silently be replaced by its neighbour (another episode's
            # at a segment start in a shared file).
            raise ValueError(
                f"{path}: video_tolerance_s {video_tolerance_s} must be under half a frame "
                f"(0.5 / fps {self.fps:g} = {0.5 / self.fps:.4g}s)"
            )
        self._by_index = {e.index: e for e in self.meta.episodes}
        self._decoder = VideoDecoder(video_tolerance_s)
        self._frame_cache = FrameCache(frame_cache) if frame_cache else None
        self.decodes_video = any(features[c]["dtype"] == "video" for c in self.cameras)
        self._files: dict[Path, DataFile] = {}
        self._stamps: dict[int, str] = {}  # episode -> digest of its timestamps, read with its data file
        self._first_tasks: dict[int, str] = {}  # episode listing several tasks -> its first frame's
        # (data file, camera, row group) -> that group's image cells, least recently used first
        self._images: OrderedDict[tuple[Path, str, int], pa.ChunkedArray] = OrderedDict()
        self._image_bytes = 0

    def __getstate__(self) -> dict[str, Any]:
        # Workers rebuild caches lazily; shipping parquet columns through pickle would be slow.
        return {**self.__dict__, "_files": {}, "_stamps": {}, "_images": OrderedDict(), "_image_bytes": 0}

    def episodes(self) -> list[Episode]:
        """Each episode with its task: the one its metadata lists, or for an episode listing several
        (LeRobot builds the list from a set: its order is arbitrary), its first frame's (``task_index``).
        Frames whose own task is another (metadata out of step with ``task_index``) get theirs through
        ``numeric().tasks``."""
        return [Episode(e.index, e.length, self._task(e)) for e in self.meta.episodes]

    def _task(self, episode: EpisodeMeta) -> str:
        if len(episode.tasks) <= 1:
            return episode.tasks[0] if episode.tasks else ""
        if episode.index not in self._first_tasks:
            try:
                data, rows = self._data(episode)
            except DatasetFormatError:  # the check names the file; such an episode is skipped or refused
                data, rows = None, np.zeros(0, np.int64)
            first = None
            if data is not None and "task_index" in data.columns and len(rows):
                first = self.meta.tasks.get(int(data.columns["task_index"][rows[0], 0]))
            self._first_tasks[episode.index] = first if first is not None else episode.tasks[0]
        return self._first_tasks[episode.index]

    def _episode(self, episode_index: int) -> EpisodeMeta:
        if episode_index not in self._by_index:
            raise IndexError(f"{self.path}: no episode {episode_index}")
        return self._by_index[episode_index]

    def _data(self, episode: EpisodeMeta) -> tuple[DataFile, np.ndarray]:
        path = episode.data_path
        if path not in self._files:
            widths = {k: feature_width(self.meta.features[k]) for k in (self.state_key, self.action_key)}
            self._files[path] = read_data_file(path, widths, self.text_key)
        data = self._files[path]
        if episode.index not in data.rows:
            raise DatasetFormatError(f"{path}: no rows for episode {episode.index}")
        return data, data.rows[episode.index]

    def numeric(self, episode_index: int) -> EpisodeArrays:
        episode = self._episode(episode_index)
        data, rows = self._data(episode)
        text = [data.text[r] for r in rows] if data.text is not None else None
        stamps = data.columns["timestamp"][rows, 0]
        return EpisodeArrays(
            data.columns[self.state_key][rows].astype(np.float32),
            data.columns[self.action_key][rows].astype(np.float32),
            stamps - stamps[:1],  # from the episode start, as every reader's (the stored t0 may be a recorder's clock)
            text,
            self._frame_tasks(episode, data, rows),
        )

    def stored_times(self, episode_index: int) -> np.ndarray:
        """The episode's parquet ``timestamp`` column (T,) float64, as stored: with from_timestamp,
        where its frames sit in the video (``numeric().timestamp`` counts from the episode start)."""
        episode = self._episode(episode_index)
        data, rows = self._data(episode)
        return data.columns["timestamp"][rows, 0].copy()

    def _frame_tasks(self, episode: EpisodeMeta, data: DataFile, rows: np.ndarray) -> list[str] | None:
        """Per-frame instructions from ``task_index`` unless every frame's is the episode's task (None):
        it changes within the episode, or the one task the metadata lists is not the frames'. A frame's
        own task wins, as LeRobot's ``task`` is; ``data check`` names the mismatch (task_mismatch)."""
        if "task_index" not in data.columns or not len(rows):
            return None
        ids = data.columns["task_index"][rows, 0]
        fallback = self._task(episode)
        if (ids == ids[0]).all() and self.meta.tasks.get(int(ids[0]), fallback) == fallback:
            return None
        return [self.meta.tasks.get(int(i), fallback) for i in ids]

    def frames(self, episode_index: int, camera: str, frame_indices: Sequence[int]) -> np.ndarray:
        if camera not in self.cameras:
            raise KeyError(f"{self.path}: unknown camera '{camera}'; valid: {', '.join(self.cameras)}")
        episode = self._episode(episode_index)
        data, rows = self._data(episode)
        bad = [t for t in frame_indices if not 0 <= t < len(rows)]
        if bad:
            raise IndexError(f"{episode.data_path}: episode {episode_index} has no frame {bad[0]}")
        if self.meta.features[camera]["dtype"] == "video":
            stamps = data.columns["timestamp"][rows, 0]
            return self._video_frames(episode, camera, stamps, data.stamp_slack[rows], frame_indices)
        return self._image_frames(episode, data, camera, rows[np.asarray(frame_indices, np.int64)])

    def _video_frames(
        self,
        episode: EpisodeMeta,
        camera: str,
        timestamps: np.ndarray,
        slack: np.ndarray,
        frame_indices: Sequence[int],
    ) -> np.ndarray:
        """``timestamps``, ``slack`` (T,): the episode's stored times and their storage rounding,
        widening the tolerance per frame (float64 sums; from_timestamp is float64 in LeRobot)."""
        ref = episode.videos[camera]
        picked = list(frame_indices)
        wanted = ref.from_timestamp + timestamps[picked]
        if ref.to_timestamp is not None:
            # In a shared file, a frame at or past the segment's end is the next episode's (half a
            # frame of slack, as for the video length in the checks): refuse it, never train on it.
            late = np.flatnonzero(wanted + 0.5 / self.fps > ref.to_timestamp + self._decoder.tolerance_s)
            if len(late):
                k = int(late[0])
                raise VideoFrameError(
                    f"{ref.path}: episode {episode.index} frame {frame_indices[k]} needs t={wanted[k]:.4f}s, "
                    f"at or after the episode's video segment end (to_timestamp {ref.to_timestamp:.4f}s); "
                    "video shorter than the episode?"
                )
        if self._frame_cache is None:
            return self._decoder.decode(ref.path, wanted, slack[picked])
        whole = self._frame_cache.get(
            ref.path,
            camera,
            episode.index,
            lambda: self._decoder.decode(ref.path, ref.from_timestamp + timestamps, slack),
            extra=f"{ref.from_timestamp}|{self._stamps_digest(episode.index, timestamps)}",
        )
        return np.array(whole[list(frame_indices)])

    def _stamps_digest(self, episode_index: int, timestamps: np.ndarray) -> str:
        """A digest of an episode's timestamps (T,) for the frame cache key: the parquet's times pick
        the frames, so re-synced times must miss the entries decoded at the old ones."""
        if episode_index not in self._stamps:
            self._stamps[episode_index] = hashlib.blake2b(
                np.ascontiguousarray(timestamps, np.float64).tobytes()
            ).hexdigest()[:16]
        return self._stamps[episode_index]

    def _image_frames(self, episode: EpisodeMeta, data: DataFile, camera: str, rows: np.ndarray) -> np.ndarray:
        if not len(rows):  # no frames, shaped as the episode's first decodes (the feature's shape may be CHW)
            return self._image_frames(episode, data, camera, data.rows[episode.index][:1])[:0]
        groups = np.searchsorted(data.group_starts, rows, side="right") - 1
        cells = [
            self._image_group(episode, data, camera, int(g))[int(r - data.group_starts[g])]
            for r, g in zip(rows, groups, strict=True)
        ]
        return np.stack([self._decode_image(cell.as_py(), episode) for cell in cells])

    def _image_group(self, episode: EpisodeMeta, data: DataFile, camera: str, group: int) -> pa.ChunkedArray:
        """The image cells of one row group of ``episode``'s data file, through the LRU."""
        key = (episode.data_path, camera, group)
        if key in self._images:
            self._images.move_to_end(key)
            return self._images[key]
        try:
            with pq.ParquetFile(episode.data_path, memory_map=True, metadata=data.metadata) as file:
                cells = file.read_row_group(group, columns=[camera])[camera]
        except (pa.ArrowException, OSError, KeyError) as err:
            raise DatasetFormatError(
                f"{episode.data_path}: cannot read camera {camera} of episode {episode.index} "
                f"({type(err).__name__}: {err})"
            ) from None
        self._images[key] = cells
        self._image_bytes += cells.nbytes
        keep = len(self.cameras)  # one sample's worth, whatever its size
        while self._image_bytes > IMAGE_CACHE_BYTES and len(self._images) > keep:
            self._image_bytes -= self._images.popitem(last=False)[1].nbytes
        return cells

    def _decode_image(self, item: dict[str, Any] | bytes | None, episode: EpisodeMeta) -> np.ndarray:
        """A parquet image cell ({bytes, path} struct, or raw bytes) -> (H, W, 3) uint8."""
        blob = item.get("bytes") if isinstance(item, dict) else item
        if not blob and isinstance(item, dict) and item.get("path"):  # image files beside the parquet (v2)
            blob = (self.path / item["path"]).read_bytes()
        if not blob:
            raise DatasetFormatError(f"{episode.data_path}: empty image cell in episode {episode.index}")
        with Image.open(io.BytesIO(blob)) as img:
            return np.asarray(img.convert("RGB"))

    def stats(self) -> dict[str, dict[str, np.ndarray]] | None:
        shipped = self.meta.stats
        if not shipped or self.state_key not in shipped or self.action_key not in shipped:
            return None
        pick = {"state": shipped[self.state_key], "action": shipped[self.action_key]}
        return {k: {s: np.asarray(v, np.float32).reshape(-1) for s, v in d.items()} for k, d in pick.items()}
