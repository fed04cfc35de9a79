"""Several datasets of one robot (or of robots sharing an action space) read as one dataset.

A LIBERO suite ships one robomimic file per task; a robot's recordings often live in several
LeRobot datasets (one per session or operator). :class:`MixtureReader` reads such sources as one
:class:`~robot_data.reader.Reader`: episodes are numbered source after source, source ``k``'s
episode ``i`` becoming ``offsets[k] + i`` with ``offsets[k]`` one past the previous source's
largest id, so ids inside a source keep their order and gaps. The sources must mean the same
thing by a sample: one control rate (a chunk of 8 actions must span one duration) and, when
known, the same gripper dims; the cameras are those every source has. State and action widths
are the trainer's to compare (:meth:`MixtureReader.widths`): reading them costs an episode per
source. Robots whose ranges differ are normalised source by source
(:class:`~robot_data.normalize.PerSourceNormalizer`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from robot_data.reader import DatasetFormatError, Episode, EpisodeArrays, Reader


def next_offsets(episode_ids: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """Source name -> the offset added to its episode ids: one past the previous source's largest."""
    offsets, start = {}, 0
    for name, ids in episode_ids.items():
        offsets[name] = start
        start += max(ids, default=-1) + 1
    return offsets


class MixtureReader(Reader):
    """Named sources (``{name: reader}``, in order) as one reader; see the module docstring."""

    def __init__(self, sources: Mapping[str, Reader]):
        if not sources:
            raise ValueError("mixture: no source")
        self.sources = dict(sources)
        self.decodes_video = any(r.decodes_video for r in self.sources.values())
        local = {name: reader.episodes() for name, reader in self.sources.items()}
        self.offsets = next_offsets({name: [e.index for e in eps] for name, eps in local.items()})
        self._episodes: list[Episode] = []
        self._owner: dict[int, str] = {}  # mixture episode id -> source name
        for name, eps in local.items():
            for e in eps:
                self._episodes.append(Episode(self.offsets[name] + e.index, e.length, e.task))
                self._owner[self.offsets[name] + e.index] = name
        (first_name, first), *others = self.sources.items()
        self.fps = first.fps
        self.gripper_dims = list(first.gripper_dims)
        for name, reader in others:
            if reader.fps != first.fps:
                raise DatasetFormatError(
                    f"{name}: {reader.fps:g} fps, but {first_name} has {first.fps:g}: one action chunk would "
                    "span different durations (resample one of them)"
                )
            if reader.gripper_dims and self.gripper_dims and reader.gripper_dims != self.gripper_dims:
                raise DatasetFormatError(
                    f"{name}: gripper at action dim(s) {reader.gripper_dims}, {first_name} at {self.gripper_dims}"
                )
            self.gripper_dims = self.gripper_dims or list(reader.gripper_dims)
        self.cameras = [c for c in first.cameras if all(c in r.cameras for r in self.sources.values())]
        self.missing_cameras = {
            name: sorted({c for r in self.sources.values() for c in r.cameras} - set(r.cameras))
            for name, r in self.sources.items()
        }

    def source_name(self, episode_index: int) -> str:
        """The name of the source holding mixture episode ``episode_index``."""
        if episode_index not in self._owner:
            raise IndexError(f"mixture: no episode {episode_index}")
        return self._owner[episode_index]

    def split(self, episode_index: int) -> tuple[Reader, int]:
        """Mixture episode -> (its source's reader, its id in that source)."""
        name = self.source_name(episode_index)
        return self.sources[name], episode_index - self.offsets[name]

    def location(self, episode_index: int) -> str:
        """'<source>: <where the source says it lives>', for messages."""
        reader, local = self.split(episode_index)
        where = reader.location(local) if hasattr(reader, "location") else f"episode {local}"
        return f"{self.source_name(episode_index)}: {where}"

    def episodes(self) -> list[Episode]:
        return list(self._episodes)

    def numeric(self, episode_index: int) -> EpisodeArrays:
        reader, local = self.split(episode_index)
        return reader.numeric(local)

    def frames(self, episode_index: int, camera: str, frame_indices: Sequence[int]) -> np.ndarray:
        reader, local = self.split(episode_index)
        return reader.frames(local, camera, frame_indices)

    def episode_filters(self) -> dict[str, list[int]]:
        """Each source's filter keys, its ids offset; a key several sources have holds all their episodes."""
        merged: dict[str, list[int]] = {}
        for name, reader in self.sources.items():
            for key, ids in reader.episode_filters().items():
                merged.setdefault(key, []).extend(self.offsets[name] + i for i in ids)
        return {key: sorted(ids) for key, ids in merged.items()}

    def source_episodes(self, episodes: Sequence[int]) -> dict[str, list[int]]:
        """Mixture episode ids grouped by source name (every source present, in order)."""
        out: dict[str, list[int]] = {name: [] for name in self.sources}
        for index in episodes:
            out[self.source_name(index)].append(index)
        return out

    def widths(self, episodes: Sequence[int]) -> dict[str, tuple[int, int]]:
        """(state dim, action dim) of each source that has one of ``episodes``, read from its first."""
        widths = {}
        for name, ids in self.source_episodes(episodes).items():
            if ids:
                arrays = self.numeric(ids[0])
                widths[name] = (arrays.state.shape[1], arrays.action.shape[1])
        return widths

    def describe(self) -> list[str]:
        """One line per source: its name, its episodes' ids in the mixture and its frame count."""
        lines, lengths = [], {e.index: e.length for e in self._episodes}
        for name, ids in self.source_episodes(list(lengths)).items():
            frames = sum(lengths[i] for i in ids)
            span = f"episodes {ids[0]}..{ids[-1]}" if ids else "no episode"
            lines.append(f"{name}: {span} ({len(ids)} episodes, {frames} frames)")
        return lines


def robomimic_files(path: str | Path) -> list[Path]:
    """The robomimic files of a directory (a LIBERO suite: one file per task), sorted by name."""
    files = sorted(Path(path).glob("*.hdf5"))
    if not files:
        raise DatasetFormatError(f"{path}: a directory without .hdf5 files, so not a robomimic dataset")
    return files
