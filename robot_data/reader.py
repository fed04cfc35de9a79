"""The reader interface that every dataset format implements.

A reader exposes a dataset as episodes of numeric arrays plus camera frames decoded on demand.
Numbers and pixels are separate calls on purpose: statistics, splits and validation touch only
the cheap numeric path, and the training dataset decodes just the frames a sample needs.

The name -> class registry (``READERS``, ``build_reader``) lives in :mod:`robot_data.registry`
so that format modules can import this interface without an import cycle; it is re-exported
here for convenience.
"""

from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


def did_you_mean(name: str, names: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest of ``names``, or ''."""
    close = difflib.get_close_matches(name, list(names), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


class DatasetFormatError(ValueError):
    """The dataset cannot be read at all; the message names the file."""


class UnknownFeatureError(DatasetFormatError):
    """A reader key (``state_key``, ``action_key``, ``text_key``) names nothing in the dataset.

    Shared by every format so the trainer and ``vla-ft data check`` turn it into one line. The
    message names the key, the closest name and all of them: a typo in a recipe is then fixed
    from the one line, without opening the dataset. ``kind`` is the format's word for a name
    (LeRobot: feature, HDF5: key).
    """

    def __init__(self, role: str, key: str, path: str | Path, features: list[str], kind: str = "feature"):
        self.role, self.key, self.features = role, key, list(features)
        self.detail = f"'{key}' is not a {kind} of {path}{did_you_mean(key, features)}; {kind}s: {', '.join(features)}"
        super().__init__(f"data.{role}: {self.detail}")


@dataclass(frozen=True)
class Episode:
    """One episode: ``index`` is its id in the source dataset, ``task`` its instruction."""

    index: int
    length: int
    task: str


@dataclass
class EpisodeArrays:
    """Numeric content of one episode of length T.

    state: (T, S) float32, action: (T, A) float32 (may hold NaN for missing steps),
    timestamp: (T,) float64 seconds from the episode start (0 at its first frame, whatever clock
    the source stores: a format's own times, which locate its frames, stay its reader's business),
    text: T per-frame strings or None
    (a frame's None: no text for that frame, e.g. a null cell, so no language target there),
    tasks: T per-frame instructions when the instruction changes within the episode (LeRobot's
    per-frame ``task_index``), else None (the episode's ``task`` holds for every frame).
    """

    state: np.ndarray
    action: np.ndarray
    timestamp: np.ndarray
    text: list[str | None] | None = None
    tasks: list[str] | None = None


class Reader(ABC):
    """A dataset format. Subclasses set ``cameras``, ``fps`` and ``gripper_dims`` in ``__init__``.

    ``gripper_dims`` lists the action dims that hold a gripper command, when the format knows
    them, so a converted dataset keeps their names; it is empty when unknown. (Training takes its
    gripper dims from the recipe's ``loss.gripper.dims`` and refuses a gripper head on other dims
    than these, when known.)
    Readers must stay picklable (DataLoader workers): open file handles lazily, per process.
    """

    cameras: list[str]
    fps: float
    gripper_dims: list[int]
    decodes_video: bool = False
    """True where frames come from a video decoder (FFmpeg): a DataLoader worker forked from a
    process that decoded may hang in its first decode (seen on a GPU host), so loaders start such
    workers from a clean process (``forkserver``)."""

    @abstractmethod
    def episodes(self) -> list[Episode]:
        """All episodes, in dataset order."""

    @abstractmethod
    def numeric(self, episode_index: int) -> EpisodeArrays:
        """State, action, timestamps and text of one episode; never decodes images."""

    @abstractmethod
    def frames(self, episode_index: int, camera: str, frame_indices: Sequence[int]) -> np.ndarray:
        """Decoded frames ``(n, H, W, 3)`` uint8 of one camera, in the order asked."""

    def stats(self) -> dict[str, dict[str, np.ndarray]] | None:
        """Statistics shipped with the dataset ({key: {stat: array}}), or None."""
        return None

    def episode_filters(self) -> dict[str, list[int]]:
        """Named episode subsets shipped with the dataset (robomimic's filter keys), or {}."""
        return {}


def __getattr__(name: str) -> Any:
    # Lazy re-export: registry imports every format module, which import this one.
    if name in ("READERS", "build_reader"):
        from robot_data import registry

        return getattr(registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
