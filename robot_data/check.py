"""Dataset validation: every problem at once, each naming the file and the episode.

``check_dataset`` returns a list of :class:`Problem`; the trainer calls
``episodes_to_skip(problems, skip_bad_episodes)``, which refuses the dataset (raising
:class:`DatasetCheckError` with the full list) unless ``skip_bad_episodes`` is set and every
problem belongs to an episode, and then returns the episodes to leave out.

Frame decoding is the expensive part: ``decode="ends"`` (default) decodes the first and last
frame of every episode and camera, ``"all"`` every frame, ``"none"`` none.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from robot_data.hdf5 import HDF5Reader
from robot_data.mixture import next_offsets, robomimic_files
from robot_data.reader import DatasetFormatError, EpisodeArrays, Reader, UnknownFeatureError
from robot_data.registry import build_reader, is_robomimic_dir
from robot_data.rlds import RLDSReader
from robot_data.rlds_meta import version_dir

KINDS = (
    "missing_file",
    "unreadable",
    "bad_feature",
    "non_finite",
    "index_gap",
    "timestamp",
    "video_short",
    "undecodable",
    "unknown_task",
    "task_mismatch",
    "missing_text",
)
DECODE_MODES = ("ends", "all", "none")


@dataclass(frozen=True)
class Problem:
    """One problem. ``episode`` is None when it concerns the whole dataset (never skippable)."""

    kind: str
    file: str
    episode: int | None
    message: str

    def __str__(self) -> str:
        where = self.file if self.episode is None else f"{self.file} (episode {self.episode})"
        return f"[{self.kind}] {where}: {self.message}"


class DatasetCheckError(ValueError):
    """The dataset failed its checks; ``problems`` holds them all."""

    def __init__(self, problems: list[Problem], hint: str = ""):
        self.problems = problems
        lines = "\n  - ".join(str(p) for p in problems)
        super().__init__(f"dataset check: {len(problems)} problem(s):\n  - {lines}{hint}")


def bad_episodes(problems: Iterable[Problem]) -> set[int]:
    """Episodes that have at least one problem."""
    return {p.episode for p in problems if p.episode is not None}


def episodes_to_skip(problems: list[Problem], skip_bad_episodes: bool) -> set[int]:
    """Refuse a failing dataset, or (``skip_bad_episodes``) return the bad episodes to leave out."""
    if not problems:
        return set()
    whole = [p for p in problems if p.episode is None]
    if whole or not skip_bad_episodes:
        hint = "" if whole else f"\nset data.skip_bad_episodes=true to skip episodes {sorted(bad_episodes(problems))}"
        raise DatasetCheckError(problems, hint)
    return bad_episodes(problems)


def non_finite(values: np.ndarray, name: str, file: str, episode: int) -> list[Problem]:
    """A problem if ``values`` (T, D) holds NaN/inf, naming the first frame and dim."""
    bad = ~np.isfinite(values)
    if not bad.any():
        return []
    frame, dim = (int(v) for v in np.argwhere(bad)[0])
    msg = f"{name} has {int(bad.sum())} NaN/inf value(s), first at frame {frame} dim {dim}"
    return [Problem("non_finite", file, episode, msg)]


def missing_text(text: Sequence[str | None] | None, text_key: str, where: str, episode: int) -> list[Problem]:
    """A ``missing_text`` problem if frames of ``text`` (T per-frame strings, None: no text there, a null
    LeRobot cell or an empty RLDS/HDF5 string) have none, naming the first: those frames get no
    language target. The same words for every format."""
    nulls = [i for i, t in enumerate(text or ()) if t is None]
    if not nulls:
        return []
    msg = f"{text_key}: {len(nulls)} null text cell(s), first at frame {nulls[0]} (no language target there)"
    return [Problem("missing_text", where, episode, msg)]


def decode_checks(
    frames: Callable[[list[int]], np.ndarray],
    length: int,
    shape: tuple[int, ...] | None,
    decode: str,
    where: str,
    episode: int,
    camera: str,
) -> list[Problem]:
    """Decode the ends (or all) of one episode's camera; report failures and wrong shapes."""
    if decode == "none" or length == 0:
        return []
    wanted = sorted({0, length - 1}) if decode == "ends" else list(range(length))
    try:
        images = frames(wanted)
    except Exception as err:  # noqa: BLE001 - any decoder failure is a finding, not a crash
        text = str(err)
        kind = "video_short" if "no frame within" in text or "has no frame" in text else "undecodable"
        return [Problem(kind, where, episode, f"camera {camera}: {text}")]
    if shape is not None and not shape_matches(images.shape[1:], shape):
        msg = f"camera {camera}: frames are {tuple(images.shape[1:])}, the features say {tuple(shape)}"
        return [Problem("bad_feature", where, episode, msg)]
    return []


def shape_matches(actual: Sequence[int], declared: Sequence[int]) -> bool:
    """Whether frames of ``actual`` (H, W, C) fit ``declared``, where -1 is a dimension the dataset
    leaves open (TFDS writes an Image of varying size as (-1, -1, 3))."""
    return len(actual) == len(declared) and all(d == -1 or a == d for a, d in zip(actual, declared, strict=True))


def checked_cameras(available: Sequence[str], cameras: Sequence[str]) -> list[str]:
    """The cameras a check looks at: those of ``cameras`` the dataset has, or all when it is empty
    (a broken camera training never reads must not refuse the dataset)."""
    return [c for c in available if not cameras or c in cameras]


def check_hdf5(
    path: str | Path,
    layout: str = "robomimic",
    state_key: str = "observation.state",
    action_key: str = "action",
    text_key: str | None = None,
    decode: str = "ends",
    cameras: Sequence[str] = (),
    **_: Any,
) -> list[Problem]:
    """robomimic / ALOHA: keys present, lengths and dims consistent, finite numbers, text on every frame
    (with ``text_key``), decodable images (of ``cameras``, or every camera when empty). A file without
    the HDF5 signature raises :class:`DatasetFormatError`: it is no dataset of the format."""
    if not Path(path).exists():
        return [Problem("missing_file", str(path), None, "dataset not found")]
    try:
        reader = HDF5Reader(path, layout, state_key, action_key, text_key)
    except UnknownFeatureError:
        raise  # a key naming no dataset: the caller's typo, not the data's problem
    except (ValueError, OSError, KeyError) as err:
        if isinstance(err, DatasetFormatError) and Path(path).is_file() and not h5py.is_hdf5(path):
            raise  # no HDF5 signature: no HDF5 dataset at all (as LeRobot without meta/info.json), not a damaged one
        return [Problem("unreadable", str(path), None, str(err))]
    problems: list[Problem] = []
    dims: tuple[int, int] | None = None  # (state, action) dims of the first sound episode
    for ep in reader.episodes():
        found = _hdf5_structure(reader, ep.index, ep.length)
        if not found:
            arrays = reader.numeric(ep.index)
            dims = dims or (arrays.state.shape[1], arrays.action.shape[1])
            found = _hdf5_contents(reader, ep.index, ep.length, arrays, dims, decode, cameras)
        problems += found
    return problems


def check_rlds(
    path: str | Path, decode: str = "ends", opened: RLDSReader | None = None, cameras: Sequence[str] = (), **kwargs: Any
) -> list[Problem]:
    """RLDS: every episode's record passes its checksum and parses with its features' declared sizes,
    dims as the first sound episode's, finite numbers, text on every frame (with ``text_key``),
    decodable frames. ``kwargs``: the reader's
    (state_key, fps, ...). ``opened``: the reader training already opened on ``path`` (opening reads
    every record once)."""
    if opened is not None:
        return _rlds_problems(opened, decode, cameras)
    if not Path(path).exists():
        return [Problem("missing_file", str(path), None, "dataset not found")]
    version_dir(Path(path))  # no dataset_info.json: no RLDS dataset, raised (DatasetFormatError), not a problem of one
    try:
        reader = RLDSReader(path, **kwargs)
    except UnknownFeatureError:
        raise  # a key naming no feature: the caller's typo, not the data's problem
    except (ValueError, OSError) as err:
        return [Problem("unreadable", str(path), None, str(err))]
    return _rlds_problems(reader, decode, cameras)


def _rlds_problems(reader: RLDSReader, decode: str, cameras: Sequence[str]) -> list[Problem]:
    problems: list[Problem] = []
    dims: tuple[int, int] | None = None
    for ep in reader.episodes():
        where = reader.location(ep.index)
        damaged = reader.checksum_error(ep.index)
        if damaged is not None:  # what the record holds cannot be trusted: its other findings would mislead
            problems.append(Problem("unreadable", where, ep.index, damaged))
            continue
        if ep.index in reader.unreadable:
            problems.append(
                Problem("unreadable", where, ep.index, reader.unreadable[ep.index].removeprefix(f"{where}: "))
            )
            continue
        arrays = reader.numeric(ep.index)
        dims = dims or (arrays.state.shape[1], arrays.action.shape[1])
        for name, values, dim in (("state", arrays.state, dims[0]), ("action", arrays.action, dims[1])):
            if values.shape[1] != dim:
                msg = f"{name} has {values.shape[1]} dims, the first sound episode {dim}"
                problems.append(Problem("bad_feature", where, ep.index, msg))
            problems += non_finite(values, name, where, ep.index)
        if reader.text_key:
            problems += missing_text(arrays.text, reader.text_key.removeprefix("steps/"), where, ep.index)
        for camera in checked_cameras(reader.cameras, cameras):
            frames = lambda idx, cam=camera, e=ep.index: reader.frames(e, cam, idx)  # noqa: E731
            shape = reader.camera_shapes[camera]
            problems += decode_checks(frames, ep.length, shape, decode, where, ep.index, camera)
    return problems


def _hdf5_structure(reader: HDF5Reader, episode: int, length: int) -> list[Problem]:
    """An episode's file opens, its datasets exist, and every state (and text) dataset has one row per action."""
    if episode in reader.unreadable:
        return [Problem("unreadable", reader.location(episode), episode, reader.unreadable[episode])]
    where, group = reader.location(episode), reader.group(episode)
    per_frame = [*reader.state_keys, *([reader.text_key] if reader.text_key else [])]
    missing = [k for k in [*per_frame, reader.action_key] if k not in group]
    if missing:
        return [Problem("bad_feature", where, episode, f"missing dataset(s) {missing}")]
    return [
        Problem("index_gap", where, episode, f"{key} has {len(group[key])} rows, actions {length}")
        for key in per_frame
        if len(group[key]) != length
    ]


def _hdf5_contents(
    reader: HDF5Reader,
    episode: int,
    length: int,
    arrays: EpisodeArrays,
    dims: tuple[int, int],
    decode: str,
    cameras: Sequence[str],
) -> list[Problem]:
    """Dims as the first sound episode's, finite numbers, camera datasets present and decodable."""
    where, group = reader.location(episode), reader.group(episode)
    problems = []
    for name, values, dim in (("state", arrays.state, dims[0]), ("action", arrays.action, dims[1])):
        if values.shape[1] != dim:
            msg = f"{name} has {values.shape[1]} dims, the first sound episode {dim}"
            problems.append(Problem("bad_feature", where, episode, msg))
        problems += non_finite(values, name, where, episode)
    if reader.text_key:
        problems += missing_text(arrays.text, reader.text_key, where, episode)
    for camera in checked_cameras(reader.cameras, cameras):
        key = reader.camera_keys[camera]
        data = group.get(key)
        if data is None:
            problems.append(Problem("missing_file", where, episode, f"camera {camera}: dataset {key} missing"))
            continue
        if not (data.ndim == 4 and data.shape[-1] == 3 or data.ndim == 2) or data.dtype != np.uint8:
            msg = f"camera {camera}: {data.shape} {data.dtype}, expected (T, H, W, 3) uint8 or (T, L) encoded uint8"
            problems.append(Problem("bad_feature", where, episode, msg))
            continue
        if len(data) < length:
            msg = f"camera {camera}: {len(data)} frames, shorter than the episode ({length})"
            problems.append(Problem("video_short", where, episode, msg))
            continue
        frames = lambda idx, cam=camera: reader.frames(episode, cam, idx)  # noqa: E731
        problems += decode_checks(frames, length, None, decode, where, episode, camera)
    return problems


def check_dataset(
    path: str | Path,
    format: str,
    decode: str = "ends",
    offsets: Mapping[str, int] | None = None,
    opened: Reader | None = None,
    cameras: Sequence[str] = (),
    **kwargs: Any,
) -> list[Problem]:
    """All problems of a dataset. ``kwargs`` are the reader's (state_key, action_key, layout, ...);
    ``offsets``: of the reader already open on a robomimic directory (see :func:`check_mixture`);
    ``opened``: an RLDS reader already open on ``path``, checked instead of opening another;
    ``cameras``: the cameras training reads (``data.cameras``; empty: all), the only ones checked.

    A key naming nothing in the dataset raises :class:`UnknownFeatureError` instead of a problem, and a
    path without the format's metadata (LeRobot's meta/info.json, RLDS's dataset_info.json, a directory
    without .hdf5 files) raises :class:`DatasetFormatError`: it is no dataset of ``format``.
    """
    from robot_data.check_lerobot import check_lerobot

    if decode not in DECODE_MODES:
        raise ValueError(f"decode: unknown '{decode}'; valid: {', '.join(DECODE_MODES)}")
    checks = {"lerobot": check_lerobot, "hdf5": check_hdf5, "rlds": check_rlds, "synthetic": lambda *a, **k: []}
    if format not in checks:
        raise ValueError(f"data.format: unknown reader '{format}'; valid: {', '.join(checks)}")
    if is_robomimic_dir(format, {**kwargs, "path": path}):
        files = {f.stem: f for f in robomimic_files(path)}
        return check_mixture(files, format, decode, offsets, cameras=cameras, **kwargs)
    if format == "rlds":
        rlds = opened if isinstance(opened, RLDSReader) else None
        return check_rlds(path, decode=decode, opened=rlds, cameras=cameras, **kwargs)
    return checks[format](path, decode=decode, cameras=cameras, **kwargs)


def check_mixture(
    paths: Mapping[str, str | Path],
    format: str,
    decode: str = "ends",
    offsets: Mapping[str, int] | None = None,
    opened: Mapping[str, Reader] | None = None,
    cameras: Sequence[str] = (),
    **kwargs: Any,
) -> list[Problem]:
    """Every source's problems, each episode numbered as :class:`~robot_data.mixture.MixtureReader`
    numbers it (its source's offset plus its own id): ``offsets`` of the reader when one is open,
    else each source is opened here to number its episodes. ``opened``: its sources' readers."""
    opened = opened or {}
    found = {
        name: check_dataset(path, format, decode, opened=opened.get(name), cameras=cameras, **kwargs)
        for name, path in paths.items()
    }
    if offsets is None:
        offsets = next_offsets({name: _episode_ids(format, path, kwargs) for name, path in paths.items()})
    return [
        p if p.episode is None else replace(p, episode=p.episode + offsets[name])
        for name, problems in found.items()
        for p in problems
    ]


def _episode_ids(format: str, path: str | Path, kwargs: dict[str, Any]) -> list[int]:
    """A dataset's episode ids; none when it cannot be read (its whole-dataset problem says why)."""
    try:
        return [e.index for e in build_reader(format, path=path, **kwargs).episodes()]
    except (ValueError, OSError):
        return []
