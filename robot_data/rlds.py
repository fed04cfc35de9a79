"""RLDS datasets (TensorFlow Datasets' tfrecord layout: Open X-Embodiment, OpenVLA's LIBERO), read
without TensorFlow.

A dataset version directory (``libero_spatial_no_noops/1.0.0/``) holds::

    dataset_info.json   splits: name, shardLengths (episodes per shard), filepathTemplate
    features.json       the feature tree: FeaturesDict{steps: Dataset(FeaturesDict{...}), ...}
    <name>-<split>.tfrecord-00000-of-00016, ...   one tf.train.Example per episode

An episode's Example holds each per-step feature as one flat list under its path (``steps/action``:
T x 7 floats, ``steps/observation/image``: T encoded JPEG/PNG frames, ``steps/language_instruction``:
T strings). Recipe keys name features by their path under ``steps`` (``observation/state``; dots work
too, so the default ``observation.state`` and ``action`` fit LIBERO and most Open X datasets);
``data.state_key`` may list several, comma-separated, concatenated in that order. Cameras are the
RGB image features (``observation/image``, ``observation/wrist_image``; not 1-channel depth or masks).
A TFDS Text feature has a string for every step, so an empty ``data.text_key`` string is a frame
without text (None: no language target there, as a null LeRobot cell), never a target of end-of-text.
A dim declared -1 (TFDS: any size) is read from the data: a numeric feature's width is its values
per step, the step count coming from a feature of fixed size when the action itself is open.
The instruction is ``language_instruction``, else ``observation/natural_language_instruction``
(RT-1). Episodes are numbered across the splits in ``dataset_info.json``'s order, and each split
is an episode filter (``data.val_filter: val``). RLDS records no control rate: ``fps`` must be
given (``data.fps``).

Opening reads every episode once (lengths, state, action and text are kept; frames are decoded
from the episode's record when asked, or from the decoded-frame cache). With a frame cache
(``data.frame_cache``) those numbers are saved there too (``rlds_index/``, keyed by the shards'
sizes and times and the keys), so a later open of an unchanged dataset skips the pass.
The two JSON files are read by :mod:`robot_data.rlds_meta`.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tempfile
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from robot_data.frame_cache import FrameCache
from robot_data.reader import DatasetFormatError, Episode, EpisodeArrays, Reader, UnknownFeatureError
from robot_data.rlds_meta import feature_shape, is_camera, read_json, shard_records, step_features, version_dir
from robot_data.tfrecord import parse_example, read_checked_record, read_record

INSTRUCTION = "language_instruction"
# Where the datasets keep it, first found wins: most of Open X, then RT-1 (fractal) and its kin.
INSTRUCTIONS = (INSTRUCTION, "observation/natural_language_instruction")
STEPS = "steps/"
PARSED_EPISODES = 2  # per process: the cameras and history of one sample come from one record
NUMBERS_FORMAT = 3  # of the saved numbers (rlds_index/ in the frame cache); a change makes new entries
# (3: features declared with a -1 dim read, where 2 saved their episodes as unreadable; flat, with widths)


def _text(value: bytes) -> str:
    return value.decode("utf-8", errors="replace")  # TFDS Text is UTF-8; a stray byte must not stop the run


class RLDSReader(Reader):
    """An RLDS/TFDS dataset version directory (see the module docstring)."""

    def __init__(
        self,
        path: str | Path,
        state_key: str = "observation.state",
        action_key: str = "action",
        text_key: str | None = None,
        fps: float | None = None,
        frame_cache: str | Path | None = None,
    ):
        self.path = version_dir(Path(path))
        if fps is None:
            raise DatasetFormatError(
                f"{self.path}: RLDS records no control rate; set data.fps (LIBERO runs at 20, Bridge at 5)"
            )
        self.fps = float(fps)
        self.gripper_dims: list[int] = []
        info = read_json(self.path / "dataset_info.json")
        steps = step_features(read_json(self.path / "features.json"), self.path)
        self.state_keys = [self._feature(k, "state_key", steps) for k in state_key.split(",")]
        self.action_key = self._feature(action_key, "action_key", steps)
        self.text_key = None if text_key is None else self._feature(text_key, "text_key", steps)
        self._steps = steps
        self.instruction_key = next((STEPS + k for k in INSTRUCTIONS if k in steps), None)
        self.camera_keys = {name: STEPS + name for name, leaf in steps.items() if is_camera(leaf)}
        self.cameras = list(self.camera_keys)
        self.camera_shapes = {name: feature_shape(steps[name]) for name in self.cameras}  # (H, W, 3) as declared
        self._records, self._filters = shard_records(self.path, info)
        self._frame_cache = FrameCache(frame_cache) if frame_cache else None
        self._parsed: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self._pid = os.getpid()
        self._numeric: dict[int, EpisodeArrays] = {}
        self.unreadable: dict[int, str] = {}  # episodes whose record or features are broken: index -> why
        saved = Path(frame_cache) / "rlds_index" / self._numbers_key() if frame_cache else None
        self._episodes = self._load_numbers(saved) if saved is not None else None
        if self._episodes is None:
            self._episodes = [self._read_episode(i) for i in range(len(self._records))]
            if saved is not None:
                self._save_numbers(saved)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_parsed": OrderedDict()}  # parsed records (frames included) stay behind

    def _read_episode(self, episode_index: int) -> Episode:
        """The episode's numbers, kept; a broken one is recorded in ``unreadable`` (length 0)."""
        try:
            return self._read_numeric(episode_index)
        except DatasetFormatError as err:
            self.unreadable[episode_index] = str(err)
            return Episode(episode_index, 0, "")

    def _numbers_key(self) -> str:
        """What the numbers read at open depend on: the dataset's place, its shards' sizes and times, the keys."""
        keys = [*self.state_keys, self.action_key, str(self.text_key), str(self.instruction_key)]
        parts = [str(self.path.resolve()), *keys, str(NUMBERS_FORMAT)]
        for file in dict.fromkeys(r[0] for r in self._records):
            st = file.stat()
            parts.append(f"{file.name}|{st.st_size}|{st.st_mtime_ns}")
        return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:16]

    def _save_numbers(self, base: Path) -> None:
        """Lengths, widths, instructions, text and problems as JSON, state and action flattened into one
        npz (written first: the JSON's presence marks a whole entry), each under a temporary name and
        renamed. Flat, with each episode's widths: a feature declared with a -1 dim may differ in width
        from episode to episode (the check names such episodes; the saved numbers must keep them)."""
        episodes = [
            {
                "length": e.length,
                "task": e.task,
                "unreadable": self.unreadable.get(e.index),
                "text": None if e.index in self.unreadable else self._numeric[e.index].text,
                "tasks": None if e.index in self.unreadable else self._numeric[e.index].tasks,
                "widths": None if e.index in self.unreadable else _widths(self._numeric[e.index]),
            }
            for e in self._episodes
        ]
        sound = [self._numeric[e.index] for e in self._episodes if e.index not in self.unreadable]
        arrays = {
            key: np.concatenate([getattr(a, key).reshape(-1) for a in sound] or [np.zeros(0, np.float32)])
            for key in ("state", "action")
        }
        base.parent.mkdir(parents=True, exist_ok=True)
        for suffix, write in (
            (".npz", lambda f: np.savez(f, **arrays)),
            (".json", lambda f: f.write(json.dumps(episodes).encode())),
        ):
            fd, tmp = tempfile.mkstemp(dir=base.parent, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, base.with_suffix(suffix))

    def _load_numbers(self, base: Path) -> list[Episode] | None:
        """The episodes and their numbers from :meth:`_save_numbers`, or None when there is no entry."""
        if not base.with_suffix(".json").is_file():
            return None
        episodes = json.loads(base.with_suffix(".json").read_text())
        with np.load(base.with_suffix(".npz")) as arrays:
            flat = {"state": arrays["state"], "action": arrays["action"]}
        out, at = [], {"state": 0, "action": 0}
        for i, e in enumerate(episodes):
            out.append(Episode(i, e["length"], e["task"]))
            if e["unreadable"] is not None:
                self.unreadable[i] = e["unreadable"]
                continue
            n, rows = e["length"], {}
            for key, width in zip(("state", "action"), e["widths"], strict=True):
                rows[key] = flat[key][at[key] : at[key] + n * width].reshape(n, width)
                at[key] += n * width
            timestamp = np.arange(n, dtype=np.float64) / self.fps
            self._numeric[i] = EpisodeArrays(rows["state"], rows["action"], timestamp, e["text"], e["tasks"])
        return out

    def _feature(self, key: str, role: str, steps: dict[str, dict[str, Any]]) -> str:
        name = key.strip().replace(".", "/").removeprefix(STEPS)
        if name not in steps:
            raise UnknownFeatureError(role, key, self.path, sorted(steps))
        return STEPS + name

    def location(self, episode_index: int) -> str:
        """'<shard file>, record k' of an episode, for messages."""
        file, _, _, k = self._records[episode_index]
        return f"{file.name}, record {k}"

    def checksum_error(self, episode_index: int) -> str | None:
        """Why the episode's record fails its data checksum, or None. Not checked when reading for
        training: it costs a pass over every byte (see :mod:`robot_data.tfrecord`). A sound record is
        parsed and kept from this one read, so a check going on to its frames reads it once."""
        data, error = read_checked_record(*self._records[episode_index][:3])
        if error is None and episode_index not in self.unreadable:  # unreadable: it may not even parse
            self._keep(episode_index, data)
        return error

    def _example(self, episode_index: int) -> dict[str, Any]:
        """The episode's parsed Example (the last few kept per process)."""
        if episode_index not in self._cache():
            if not 0 <= episode_index < len(self._records):
                raise IndexError(f"{self.path}: no episode {episode_index}")
            self._keep(episode_index, read_record(*self._records[episode_index][:3]))
        self._parsed.move_to_end(episode_index)
        return self._parsed[episode_index]

    def _cache(self) -> OrderedDict[int, dict[str, Any]]:
        """This process's parsed Examples: a forked DataLoader worker starts its own."""
        if os.getpid() != self._pid:
            self._parsed, self._pid = OrderedDict(), os.getpid()
        return self._parsed

    def _keep(self, episode_index: int, data: bytes) -> None:
        """Parse the episode's record ``data`` into the cache, dropping the oldest beyond PARSED_EPISODES."""
        try:
            parsed = parse_example(data)
        except Exception as err:  # protobuf's DecodeError and the like: name the record
            raise DatasetFormatError(f"{self.location(episode_index)}: not a tf.train.Example ({err})") from None
        cache = self._cache()
        cache[episode_index] = parsed
        cache.move_to_end(episode_index)
        if len(cache) > PARSED_EPISODES:
            cache.popitem(last=False)

    def _rows(self, example: dict[str, Any], key: str, episode_index: int, length: int | None) -> np.ndarray:
        """A numeric per-step feature as (T, D) float32, its size checked against its declared shape.

        A dim declared -1 (TFDS: any size) is read from the data: D is the values per step, which the
        step count (``length``, else :meth:`_step_count`) gives, and a multiple of the fixed dims."""
        if key not in example:
            raise DatasetFormatError(f"{self.location(episode_index)}: no {key}")
        flat = example[key]
        if isinstance(flat, list):
            raise DatasetFormatError(f"{self.location(episode_index)}: {key} is not numeric")
        shape = feature_shape(self._steps[key.removeprefix(STEPS)])
        if any(d < 0 for d in shape):
            return self._open_rows(flat, key, shape, episode_index, length)
        width = math.prod(shape)
        steps = len(flat) // max(width, 1)
        if steps * width != len(flat) or (length is not None and steps != length):
            want = f"{length} steps x {width}" if length is not None else f"a multiple of {width}"
            raise DatasetFormatError(f"{self.location(episode_index)}: {key} holds {len(flat)} values, not {want}")
        return flat.reshape(steps, width).astype(np.float32)

    def _open_rows(
        self, flat: np.ndarray, key: str, shape: tuple[int, ...], episode_index: int, length: int | None
    ) -> np.ndarray:
        """``flat`` of a feature declared with a -1 dim as (T, D): D = values / T (see :func:`_per_step`)."""
        steps = self._step_count(episode_index) if length is None else length
        width = _per_step(len(flat), steps, shape)
        if width is None:
            raise DatasetFormatError(
                f"{self.location(episode_index)}: {key} holds {len(flat)} values, not {steps} steps of the "
                f"declared shape {list(shape)}"
            )
        return flat.reshape(steps, width).astype(np.float32)

    def _step_count(self, episode_index: int) -> int:
        """Steps of an episode whose action size is open (-1): the size of the first per-step feature
        whose size per step is known (a Text or encoded Image: one value; a tensor declared without -1)."""
        example, where = self._example(episode_index), self.location(episode_index)
        for name, leaf in self._steps.items():
            values, shape = example.get(STEPS + name), feature_shape(leaf)
            if values is None or any(d < 0 for d in shape):
                continue
            per_step = 1 if isinstance(values, list) and ("image" in leaf or "text" in leaf) else math.prod(shape)
            if per_step and len(values) % per_step == 0:
                return len(values) // per_step
        raise DatasetFormatError(
            f"{where}: {self.action_key} is declared with an open (-1) dim and no feature of fixed size gives "
            "the episode's step count"
        )

    def _strings(self, example: dict[str, Any], key: str, episode_index: int, length: int) -> list[str]:
        values = example.get(key)
        if not isinstance(values, list) or len(values) != length:
            raise DatasetFormatError(f"{self.location(episode_index)}: {key} is not {length} strings")
        return [_text(v) for v in values]

    def _frame_text(self, example: dict[str, Any], episode_index: int, length: int) -> list[str | None]:
        """The ``text_key`` strings, an empty one as None (see the module docstring)."""
        return [t or None for t in self._strings(example, self.text_key, episode_index, length)]

    def _read_numeric(self, episode_index: int) -> Episode:
        example = self._example(episode_index)
        action = self._rows(example, self.action_key, episode_index, None)
        length = len(action)
        state = np.concatenate([self._rows(example, k, episode_index, length) for k in self.state_keys], axis=1)
        text = self._frame_text(example, episode_index, length) if self.text_key else None
        key = self.instruction_key
        tasks = self._strings(example, key, episode_index, length) if key else []
        task = tasks[0] if tasks else ""
        timestamp = np.arange(length, dtype=np.float64) / self.fps
        changing = tasks if len(set(tasks)) > 1 else None
        self._numeric[episode_index] = EpisodeArrays(state, action, timestamp, text, changing)
        return Episode(episode_index, length, task)

    def episodes(self) -> list[Episode]:
        return list(self._episodes)

    def episode_filters(self) -> dict[str, list[int]]:
        """Each split of ``dataset_info.json`` (``train``, ``val``, ...) -> its episode ids."""
        return {name: list(ids) for name, ids in self._filters.items()}

    def numeric(self, episode_index: int) -> EpisodeArrays:
        if episode_index in self.unreadable:
            raise DatasetFormatError(self.unreadable[episode_index])
        if episode_index not in self._numeric:
            raise IndexError(f"{self.path}: no episode {episode_index}")
        return self._numeric[episode_index]

    def frames(self, episode_index: int, camera: str, frame_indices: Sequence[int]) -> np.ndarray:
        if camera not in self.camera_keys:
            raise KeyError(f"{self.path}: unknown camera '{camera}'; valid: {', '.join(self.cameras)}")
        length = self._episodes[episode_index].length
        wanted = np.asarray(frame_indices, np.int64)
        if len(wanted) and (wanted.min() < 0 or wanted.max() >= length):
            raise IndexError(f"{self.path}: episode {episode_index} camera {camera} has {length} frames")
        if self._frame_cache is not None:
            file, offset, _, _ = self._records[episode_index]
            every = range(length)
            whole = self._frame_cache.get(
                file, camera, episode_index, lambda: self._decode(episode_index, camera, every), extra=str(offset)
            )
            return np.ascontiguousarray(whole[wanted])
        return self._decode(episode_index, camera, wanted)

    def _decode(self, episode_index: int, camera: str, frame_indices: Sequence[int]) -> np.ndarray:
        key, where = self.camera_keys[camera], self.location(episode_index)
        leaf, values = self._steps[camera], self._example(episode_index).get(self.camera_keys[camera])
        length, shape = self._episodes[episode_index].length, feature_shape(leaf)
        if "image" not in leaf:  # a raw uint8 tensor per step: (T, H, W, 3)
            return self._raw_frames(values, key, shape, episode_index, frame_indices)
        if values is None or len(values) != length:
            raise DatasetFormatError(f"{where}: {key} does not hold {length} frames")
        if not len(frame_indices) and length:
            # No frames, shaped as the episode's first decodes, as the other readers answer: the
            # declared shape may leave a dim open (-1: any size), and frames may differ from it.
            return self._decode(episode_index, camera, [0])[:0]
        rows = [_decode_image(values[i], f"{where}: {key} frame {i}") for i in frame_indices]
        return np.stack(rows) if rows else np.zeros((0, *(max(d, 0) for d in shape)), np.uint8)

    def _raw_frames(
        self, values: Any, key: str, shape: tuple[int, ...], episode_index: int, frame_indices: Sequence[int]
    ) -> np.ndarray:
        """Frames of a raw tensor camera (values: T x H x W x 3 integers). One dim declared -1 is read
        from the data; two leave the frame's height and width unknowable."""
        where, length = self.location(episode_index), self._episodes[episode_index].length
        if sum(d < 0 for d in shape) > 1:
            raise DatasetFormatError(
                f"{where}: {key} is a raw tensor declared {list(shape)}: with more than one open (-1) dim its "
                "frames cannot be shaped (declare the height and width in features.json)"
            )
        per_step = None if values is None else _per_step(len(values), length, shape)
        if per_step is None:
            raise DatasetFormatError(f"{where}: {key} does not hold {length} frames of shape {list(shape)}")
        fixed = math.prod(d for d in shape if d >= 0)
        frames = values.reshape(length, *(per_step // max(fixed, 1) if d < 0 else d for d in shape))
        return np.ascontiguousarray(frames[list(frame_indices)], np.uint8)


def _per_step(size: int, steps: int, shape: tuple[int, ...]) -> int | None:
    """Values per step of a feature declared ``shape`` with a -1 dim (TFDS: any size) that holds
    ``size`` values over ``steps`` steps: ``size / steps``, which must be a whole multiple of the
    declared dims' product (the product alone for no steps); None when the values do not fit."""
    fixed = math.prod(d for d in shape if d >= 0)
    per_step = size // steps if steps else fixed
    if steps * per_step != size or (fixed and per_step % fixed):
        return None
    return per_step


def _widths(arrays: EpisodeArrays) -> list[int]:
    """(state, action) widths of an episode's numbers."""
    return [arrays.state.shape[1], arrays.action.shape[1]]


def _decode_image(data: bytes, where: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"))
    except OSError as err:
        raise DatasetFormatError(f"{where}: undecodable image ({err})") from None
