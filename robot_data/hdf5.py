"""HDF5 robot datasets through h5py: the robomimic and the ALOHA layouts.

robomimic (one file)::                      ALOHA (one file per episode, in a directory)::

    data/demo_<i>/actions      (T, A)           episode_<i>.hdf5
    data/demo_<i>/obs/<key>    (T, ...)             action                    (T, 14)
    data.attrs["env_args"]     JSON, env_name       observations/qpos         (T, 14)
    mask/<filter key>          demo names           observations/images/<cam> (T, H, W, 3) uint8,
                                                        or (T, L) JPEG bytes padded (attrs compress)

Keys name datasets relative to the episode group (robomimic: demo_<i>; ALOHA: the file root);
a bare name is looked up under ``obs/`` / ``observations/`` first. Cameras are the RGB datasets
(robomimic: obs/<key> of (T, H, W, 3); ALOHA: those or encoded rows), never depth maps. Several state keys may be
joined with commas and are concatenated. The recipe defaults ``observation.state`` and
``action`` map to each layout's usual keys (``LAYOUTS``). The episode index is the number in the
demo group / file name. Instructions come from an attribute ``task`` or ``language_instruction``
on the episode; robomimic falls back to the ``language_instruction`` of ``data.attrs["problem_info"]``
(LIBERO's files), then to the env name; ALOHA to "". robomimic's filter keys (``mask/train``,
``mask/valid``, ``mask/20_percent``...) are :meth:`HDF5Reader.episode_filters`.

ALOHA's recorders compress a camera frame with ``cv2.imencode``, which takes the array as BGR, and
its loaders decode with ``cv2.imdecode``, which gives the array back; the encoded image therefore
holds the channels reversed, and :func:`_decode` reverses them again so a compressed episode reads
as the same array an uncompressed one stores.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from PIL import Image

from robot_data.reader import DatasetFormatError, Episode, EpisodeArrays, Reader, UnknownFeatureError
from robot_data.video import drop_if_forked

LAYOUTS: dict[str, dict[str, Any]] = {
    "robomimic": {
        "state": ["obs/robot0_eef_pos", "obs/robot0_eef_quat", "obs/robot0_gripper_qpos"],
        "action": "actions",
        "obs": "obs",
        "fps": 20.0,
        "expects": "one HDF5 file with groups data/demo_<i> (or a directory of them)",
    },
    "aloha": {
        "state": ["observations/qpos"],
        "action": "action",
        "obs": "observations",
        "fps": 50.0,
        "expects": "a directory of episode_<i>.hdf5 files or one such file",
    },
}
TASK_ATTRS = ("task", "language_instruction")
OPEN_FILES = 8  # ALOHA: files kept open per process


@dataclass(frozen=True)
class _Source:
    """Where an episode lives: a file and the group path inside it."""

    file: Path
    group: str


def _number(name: str) -> int | None:
    digits = re.findall(r"\d+", name)
    return int(digits[-1]) if digits else None


def _demo_number(name: str) -> int | None:
    """robomimic's ``demo_<i>`` -> i; anything else -> None."""
    return _number(name) if name.startswith("demo_") else None


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())  # h5py's messages can span lines


def _json_attr(attrs: Any, name: str, path: Path) -> dict[str, Any]:
    """The JSON object in attribute ``name`` of ``data`` ({} when absent)."""
    try:
        value = json.loads(_text(attrs.get(name, "{}")))
    except json.JSONDecodeError as err:
        raise DatasetFormatError(f"{path}: data.attrs['{name}'] is not JSON ({err})") from None
    if not isinstance(value, dict):
        raise DatasetFormatError(f"{path}: data.attrs['{name}'] is JSON {type(value).__name__}, not an object")
    return value


def _not_a_dataset(path: Path, layout: str, why: str) -> DatasetFormatError:
    """``path`` is no dataset of ``layout``: the message says what each layout expects."""
    others = "".join(f", the {name} layout {spec['expects']}" for name, spec in LAYOUTS.items() if name != layout)
    return DatasetFormatError(f"{path}: {why}; the {layout} layout expects {LAYOUTS[layout]['expects']}{others}")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class HDF5Reader(Reader):
    """robomimic or ALOHA HDF5 data (see the module docstring for keys and layouts)."""

    def __init__(
        self,
        path: str | Path,
        layout: str = "robomimic",
        state_key: str = "observation.state",
        action_key: str = "action",
        text_key: str | None = None,
        fps: float | None = None,
    ):
        if layout not in LAYOUTS:
            raise ValueError(f"data.layout: unknown hdf5 layout '{layout}'; valid: {', '.join(LAYOUTS)}")
        self.path, self.layout, self.text_key = Path(path), layout, text_key
        if not self.path.exists():
            raise FileNotFoundError(f"HDF5 dataset not found: {self.path}")
        if not (self.path.is_file() or self.path.is_dir()):
            raise _not_a_dataset(self.path, layout, "neither a file nor a directory")
        spec = LAYOUTS[layout]
        self.state_keys = spec["state"] if state_key == "observation.state" else state_key.split(",")
        self.action_key = spec["action"] if action_key == "action" else action_key
        self._handles: OrderedDict[Path, h5py.File] = OrderedDict()
        self._pid = os.getpid()
        self.unreadable: dict[int, str] = {}  # ALOHA episode files h5py cannot open: index -> why
        self._sources, tasks = self._index()
        if not self._sources:
            files = "no data/demo_<i> groups" if layout == "robomimic" else "no episode_<i>.hdf5 files"
            raise _not_a_dataset(self.path, layout, f"no episodes found ({files})")
        first = self._reference_group(state_key, text_key)
        self.camera_keys = self._find_cameras(first)
        self.cameras = list(self.camera_keys)
        holders = [first, first.parent, first.file]  # robomimic: demo, data group, file; ALOHA: the file
        recorded = fps or next((h.attrs["fps"] for h in holders if "fps" in h.attrs), None)
        self.fps = float(recorded or spec["fps"])
        self.fps_is_default = recorded is None  # the layout's usual rate, not this dataset's own
        action = first[self.action_key]  # before the lengths: opening every file closes the first
        action_dim = action.shape[1] if action.ndim > 1 else 1  # (T,): one action dim, as numeric() reads it
        lengths = {i: self._length(i) for i in self._sources}
        self._episodes = [Episode(i, lengths[i], tasks[i]) for i in sorted(self._sources)]
        self.gripper_dims = {"aloha": [6, 13] if action_dim == 14 else [], "robomimic": [action_dim - 1]}[layout]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": OrderedDict()}  # h5py handles do not cross processes

    def _file(self, path: Path) -> h5py.File:
        self._pid = drop_if_forked(self._pid, self._handles)  # HDF5 handles are not fork-safe either
        if path not in self._handles:
            self._handles[path] = h5py.File(path, "r")
            if len(self._handles) > OPEN_FILES:
                self._handles.popitem(last=False)[1].close()
        self._handles.move_to_end(path)
        return self._handles[path]

    def location(self, episode_index: int) -> str:
        """'file:group' of an episode, for messages."""
        source = self._sources[episode_index]
        return f"{source.file}:{source.group}"

    def group(self, episode_index: int) -> h5py.Group:
        """The h5py group of an episode (keys ``state_keys``, ``action_key``, ``camera_keys`` live in it)."""
        if episode_index not in self._sources:
            raise IndexError(f"{self.path}: no episode {episode_index}")
        if episode_index in self.unreadable:
            raise ValueError(f"{self.location(episode_index)}: {self.unreadable[episode_index]}")
        source = self._sources[episode_index]
        return self._file(source.file)[source.group]

    def _reference_group(self, state_key: str, text_key: str | None) -> h5py.Group:
        """Resolve the keys on the first episode that has them all; its group sets cameras and fps.

        One damaged episode (a missing dataset, a file h5py cannot open) must not make the whole
        dataset unreadable: the checks report it by name, and a run can skip it.
        """
        error: ValueError | None = None
        for index in self._sources:
            if index in self.unreadable:
                continue
            group = self.group(index)
            try:
                state = [self._resolve(group, k, "state_key") for k in self.state_keys]
                action = self._resolve(group, self.action_key, "action_key")
                text = self._resolve(group, text_key, "text_key") if text_key else None
            except ValueError as err:
                error = error or err
                continue
            self.state_keys, self.action_key, self.text_key = state, action, text
            return group
        if error:
            raise error
        index, why = next(iter(self.unreadable.items()))  # every episode is unreadable
        why = f"no episode file can be opened ({self._sources[index].file.name}: {why})"
        raise _not_a_dataset(self.path, self.layout, why)

    def _length(self, episode_index: int) -> int:
        """Frames of an episode (its action rows); 0 when unreadable or without actions (the checks say why)."""
        if episode_index in self.unreadable:
            return 0
        group = self.group(episode_index)
        return int(group[self.action_key].shape[0]) if self.action_key in group else 0

    def _datasets(self, episode_index: int, keys: Sequence[str]) -> list[np.ndarray]:
        """The named datasets of an episode as float32 (T, D) arrays of one length, or an error naming them."""
        group = self.group(episode_index)
        missing = [k for k in keys if k not in group]
        if missing:
            raise ValueError(f"{self.location(episode_index)}: missing dataset(s) {missing}")
        arrays = [np.asarray(group[k], np.float32) for k in keys]
        rows = {k: len(a) for k, a in zip(keys, arrays, strict=True)}
        if len(set(rows.values())) > 1:
            raise ValueError(f"{self.location(episode_index)}: datasets of different lengths {rows}")
        return [a.reshape(len(a), math.prod(a.shape[1:])) for a in arrays]  # not -1: an empty demo is (0, D)

    def _index(self) -> tuple[dict[int, _Source], dict[int, str]]:
        """Episode index -> where it lives, and its instruction."""
        sources, tasks = {}, {}
        if self.layout == "robomimic":
            if self.path.is_dir():  # robot_data.build_reader reads it as a mixture of its files
                raise _not_a_dataset(self.path, self.layout, "a directory, not an HDF5 file")
            try:
                f = self._file(self.path)
            except OSError as err:  # not HDF5 at all, or truncated
                raise _not_a_dataset(self.path, self.layout, f"unreadable HDF5 file ({_one_line(err)})") from None
            if "data" not in f:
                raise _not_a_dataset(self.path, self.layout, "no 'data' group, so not a robomimic file")
            attrs = f["data"].attrs
            env = _json_attr(attrs, "env_args", self.path).get("env_name", "")
            problem = _json_attr(attrs, "problem_info", self.path).get("language_instruction", "")
            for name in f["data"]:
                if _demo_number(name) is not None:
                    group = f["data"][name]
                    sources[_demo_number(name)] = _Source(self.path, f"data/{name}")
                    tasks[_demo_number(name)] = self._task(group, f["data"], _text(problem) or env)
        else:
            files = sorted(self.path.glob("*.hdf5")) if self.path.is_dir() else [self.path]
            numbers = self._file_numbers(files)
            for number, file in zip(numbers, files, strict=True):
                sources[number] = _Source(file, "/")
                try:
                    tasks[number] = self._task(self._file(file), None, "")
                except OSError as err:  # a truncated or corrupt episode file
                    self.unreadable[number] = f"unreadable HDF5 file ({_one_line(err)})"
                    tasks[number] = ""
        return sources, tasks

    def _file_numbers(self, files: list[Path]) -> list[int]:
        """Episode index of each ALOHA file: the last number in its name (``episode_12.hdf5`` ->
        12), or the name order where no file has one. A file without a number, or a number used
        twice, among numbered episodes is refused: renumbering all by name order would silently
        move every episode index (``episode_10`` before ``episode_2``) that splits and
        ``data.val_episodes`` name."""
        named = {p.name: _number(p.stem) for p in files}
        numbered = {name: n for name, n in named.items() if n is not None}
        if not numbered:
            return list(range(len(files)))
        if len(numbered) < len(named):
            stray = ", ".join(name for name in named if name not in numbered)
            why = f"{stray}: no episode number in the name, unlike {next(iter(numbered))}"
            raise _not_a_dataset(self.path, self.layout, f"{why} (move it out of the folder or rename it)")
        by_number: dict[int, list[str]] = {}
        for name, n in numbered.items():
            by_number.setdefault(n, []).append(name)
        clashes = [f"{', '.join(names)} share episode number {n}" for n, names in by_number.items() if len(names) > 1]
        if clashes:
            raise _not_a_dataset(self.path, self.layout, f"{'; '.join(clashes)} (keep one file per episode)")
        return list(numbered.values())

    @staticmethod
    def _task(group: h5py.Group, parent: h5py.Group | None, fallback: str) -> str:
        for holder in (group, parent):
            for attr in TASK_ATTRS:
                if holder is not None and attr in holder.attrs:
                    return _text(holder.attrs[attr])
        return fallback

    def _resolve(self, group: h5py.Group, key: str, role: str) -> str:
        """The dataset path of ``key`` in ``group``; an unknown key is the recipe's ``data.<role>`` typo."""
        obs = LAYOUTS[self.layout]["obs"]
        for candidate in (f"{obs}/{key}", key):
            if candidate in group:
                return candidate
        available = sorted(f"{obs}/{k}" for k in group.get(obs, {})) + sorted(k for k in group if k != obs)
        raise UnknownFeatureError(role, key, self.path, available, kind="key")

    def _find_cameras(self, group: h5py.Group) -> dict[str, str]:
        """Camera name -> dataset path inside an episode group."""
        if self.layout == "aloha":  # RGB frames (T, H, W, 3) or encoded ones (T, L); not depth maps (T, H, W)
            images = group.get("observations/images", {})
            return {name: f"observations/images/{name}" for name in images if _is_frames(images[name])}
        obs = group.get("obs", {})
        return {k: f"obs/{k}" for k in obs if obs[k].ndim == 4 and obs[k].shape[-1] == 3}

    def episodes(self) -> list[Episode]:
        return list(self._episodes)

    def episode_filters(self) -> dict[str, list[int]]:
        """robomimic's filter keys: ``mask/<key>`` lists of demo names -> sorted episode indices."""
        if self.layout != "robomimic":
            return {}
        masks = self._file(self.path).get("mask", {})
        out = {}
        for key in masks:
            names = [_text(n) for n in masks[key][()]]
            unknown = [n for n in names if _demo_number(n) not in self._sources]
            if unknown:
                raise DatasetFormatError(f"{self.path}: mask/{key} names demos the file lacks: {unknown[:5]}")
            out[key] = sorted({_demo_number(n) for n in names})  # a demo listed twice is one episode
        return out

    def numeric(self, episode_index: int) -> EpisodeArrays:
        *parts, action = self._datasets(episode_index, [*self.state_keys, self.action_key])
        state = np.concatenate(parts, axis=1)
        group = self.group(episode_index)
        if "timestamp" in group:  # seconds from the episode start, whatever clock the recorder used
            timestamp = np.asarray(group["timestamp"], np.float64).reshape(-1)
            if len(timestamp) != len(action):
                raise DatasetFormatError(
                    f"{self.location(episode_index)}: timestamp has {len(timestamp)} rows, "
                    f"{self.action_key} {len(action)}"
                )
            timestamp = timestamp - timestamp[:1]
        else:
            timestamp = np.arange(len(action), dtype=np.float64) / self.fps
        text = self._text_rows(episode_index, len(action)) if self.text_key else None
        return EpisodeArrays(state, action, timestamp, text)

    def _text_rows(self, episode_index: int, length: int) -> list[str | None]:
        """The ``text_key`` strings of an episode, one per action row, or an error naming file:group.
        An empty string is a frame without text (None: no language target, as a null LeRobot cell),
        never a target of end-of-text."""
        group, where = self.group(episode_index), self.location(episode_index)
        if self.text_key not in group:
            raise DatasetFormatError(f"{where}: missing text dataset {self.text_key} (data.text_key)")
        rows = group[self.text_key]
        if len(rows) != length:
            raise DatasetFormatError(f"{where}: text dataset {self.text_key} has {len(rows)} rows, actions {length}")
        return [_text(t) or None for t in rows[()]]

    def frames(self, episode_index: int, camera: str, frame_indices: Sequence[int]) -> np.ndarray:
        if camera not in self.camera_keys:
            raise KeyError(f"{self.path}: unknown camera '{camera}'; valid: {', '.join(self.cameras)}")
        data = self.group(episode_index)[self.camera_keys[camera]]
        wanted = np.asarray(frame_indices, np.int64)
        if len(wanted) and (wanted.min() < 0 or wanted.max() >= len(data)):
            raise IndexError(f"{self.path}: episode {episode_index} camera {camera} has {len(data)} frames")
        unique, inverse = np.unique(wanted, return_inverse=True)  # h5py wants increasing indices
        rows = data[unique] if len(unique) else np.zeros((0, *data.shape[1:]), data.dtype)
        if data.ndim == 2:  # ALOHA compressed: padded encoded images, one per row
            where = f"{data.file.filename} {data.name}"
            if not len(rows):  # no frames, shaped as the episode's first decodes
                return np.zeros((0, *(_decode(data[0], where).shape if len(data) else (0, 0, 3))), np.uint8)
            rows = np.stack([_decode(r, where) for r in rows])
        return np.ascontiguousarray(rows[inverse], np.uint8)


def _is_frames(item: h5py.Dataset | h5py.Group) -> bool:
    """An ALOHA camera dataset: RGB frames (T, H, W, 3) or encoded ones, padded per row (T, L)."""
    return isinstance(item, h5py.Dataset) and (item.ndim == 2 or item.ndim == 4 and item.shape[-1] == 3)


def _decode(buffer: np.ndarray, where: str) -> np.ndarray:
    """One padded encoded frame -> (H, W, 3) uint8, channels as ``cv2.imdecode`` returns them."""
    try:
        with Image.open(io.BytesIO(buffer.tobytes())) as img:  # JPEG/PNG ignore the zero padding
            return np.asarray(img.convert("RGB"))[..., ::-1]  # cv2.imencode stored BGR (module docstring)
    except OSError as err:
        raise ValueError(f"{where}: undecodable image ({err})") from None
