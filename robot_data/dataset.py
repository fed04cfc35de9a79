"""RobotDataset: any reader -> samples in the format of :mod:`robot_data.sample`.

One sample per frame t of the chosen episodes. Numeric arrays of an episode are normalised once
and cached (small); frames are decoded per sample through ``reader.frames``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from robot_data import images
from robot_data.language import PromptTokenizer
from robot_data.normalize import Normalizer, PerSourceNormalizer
from robot_data.reader import Episode, Reader, did_you_mean

AUGMENT_KEYS = ("enabled", "crop_scale", "color_jitter")


@dataclass
class _Prepared:
    """Numeric arrays of one episode. state: (T, S) normalised float32 (NaN -> 0); raw_state (T, S)
    and raw_action (T, A) in dataset units, as read: a sample's actions are encoded from them
    (:meth:`Normalizer.encode_actions`: delta dims are offsets from the state at its frame)."""

    state: np.ndarray
    raw_state: np.ndarray
    raw_action: np.ndarray
    text: list[str | None] | None  # a frame's None: no narration there, so no language target
    tasks: list[str] | None  # per-frame instructions, when they change within the episode
    source: int  # index of the episode's statistics in normalizer.sources (0: one set)
    norm: Normalizer  # those statistics


def _check_augment(augment: dict[str, Any] | None) -> dict[str, Any] | None:
    if augment is None or not augment.get("enabled", True):
        return None
    unknown = sorted(set(augment) - set(AUGMENT_KEYS))
    if unknown:
        raise ValueError(f"augment: unknown key(s) {unknown}; valid: {', '.join(AUGMENT_KEYS)}")
    scale = tuple(float(v) for v in augment.get("crop_scale", (0.8, 1.0)))
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"augment.crop_scale: need [lo, hi] with 0 < lo <= hi <= 1, got {list(scale)}")
    return {"crop_scale": scale, "color_jitter": float(augment.get("color_jitter", 0.0))}


class RobotDataset(Dataset):
    """Samples of ``reader`` restricted to ``episodes`` (episode ids of the source dataset).

    ``augment`` ({crop_scale, color_jitter}, optional ``enabled``) applies only when ``train``;
    each sample draws from a Generator seeded with (seed, epoch, index), so augmentation does not
    depend on DataLoader worker count or order. Call :meth:`set_epoch` at each epoch.
    """

    def __init__(
        self,
        reader: Reader,
        episodes: Sequence[int],
        chunk: int,
        history: int,
        normalizer: Normalizer | PerSourceNormalizer,
        image_size: int,
        prompt_tokenizer: PromptTokenizer | None,
        cameras: Sequence[str] | None = None,
        augment: dict[str, Any] | None = None,
        seed: int = 0,
        train: bool = False,
    ):
        if chunk < 1 or history < 1:
            raise ValueError(f"chunk and history must be >= 1, got chunk={chunk}, history={history}")
        self.reader, self.chunk, self.history = reader, chunk, history
        self.normalizer, self.image_size, self.prompt_tokenizer = normalizer, image_size, prompt_tokenizer
        if not reader.cameras:  # a low-dim dataset: every sample would fail to stack its images
            source = getattr(reader, "path", type(reader).__name__)
            raise ValueError(f"cameras: {source} has no camera (no image or video feature); a VLA needs one")
        self.cameras = list(cameras) if cameras else list(reader.cameras)
        unknown = [c for c in self.cameras if c not in reader.cameras]
        if unknown:
            hint = did_you_mean(unknown[0], reader.cameras)
            raise ValueError(f"cameras: unknown camera(s) {unknown}{hint}; valid: {', '.join(reader.cameras)}")
        if normalizer.sources and not hasattr(reader, "source_name"):
            raise ValueError(f"normalize: statistics per source ({', '.join(normalizer.sources)}) need a mixture")
        self.augment = _check_augment(augment) if train else None
        self.seed, self.train, self.epoch, self.draw = seed, train, 0, 0
        self.episodes = self._select(reader.episodes(), episodes)
        lengths = np.array([e.length for e in self.episodes], np.int64)
        self._starts = np.concatenate([[0], np.cumsum(lengths)])  # sample offset of each episode
        self._cache: dict[int, _Prepared] = {}
        self._wants_text = prompt_tokenizer is not None and prompt_tokenizer.target == "text"
        if self._wants_text and self.episodes:
            self._prepared(self.episodes[0].index)  # fail at construction, not in a worker minutes later

    @staticmethod
    def _select(all_episodes: list[Episode], wanted: Sequence[int]) -> list[Episode]:
        by_index = {e.index: e for e in all_episodes}
        missing = [i for i in wanted if i not in by_index]
        if missing:
            raise ValueError(f"episodes: unknown episode(s) {missing[:10]}; the dataset has {len(by_index)} episodes")
        return [by_index[i] for i in wanted]

    def set_epoch(self, epoch: int, draw: int = 0) -> None:
        """What seeds the next samples' augmentation: the epoch, and ``draw``, how many times the
        sample was already drawn this epoch (a weighted mixture draws with replacement)."""
        self.epoch, self.draw = epoch, draw

    def __len__(self) -> int:
        return int(self._starts[-1])

    def locate(self, index: int) -> tuple[Episode, int]:
        """Sample index -> (episode, frame index t)."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range [0, {len(self)})")
        pos = int(np.searchsorted(self._starts, index, side="right")) - 1
        return self.episodes[pos], index - int(self._starts[pos])

    def _prepared(self, episode_index: int) -> _Prepared:
        if episode_index not in self._cache:
            raw = self.reader.numeric(episode_index)
            if self._wants_text and raw.text is None:
                raise ValueError(
                    f"language_target=text but episode {episode_index} has no per-frame text (set data.text_key)"
                )
            name = self.reader.source_name(episode_index) if self.normalizer.sources else None
            norm, source = self.normalizer.for_source(name), self.normalizer.sources.index(name) if name else 0
            state = np.nan_to_num(norm.normalize("state", raw.state), nan=0.0, posinf=0.0, neginf=0.0)
            self._cache[episode_index] = _Prepared(state, raw.state, raw.action, raw.text, raw.tasks, source, norm)
        return self._cache[episode_index]

    def _images(self, episode: Episode, t: int, rng: np.random.Generator | None) -> np.ndarray:
        """(n_cam, 3, image_size, image_size) uint8."""
        out = []
        for camera in self.cameras:
            frame = self.reader.frames(episode.index, camera, [t])[0]
            if rng is not None and self.augment is not None:
                aug = self.augment
                out.append(images.augment(frame, self.image_size, rng, aug["crop_scale"], aug["color_jitter"]))
            else:
                out.append(images.to_chw(images.resize(frame, self.image_size)))
        return np.stack(out)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        episode, t = self.locate(index)
        prep = self._prepared(episode.index)
        last = len(prep.raw_action) - 1
        steps = np.arange(t, t + self.chunk)
        rows = np.minimum(steps, last)  # past the end: repeat the last action, masked out
        actions = prep.norm.encode_actions(prep.raw_action[rows], prep.raw_state[t])
        mask = (steps <= last) & np.isfinite(actions).all(axis=1)  # a NaN action (or delta state): missing
        actions = np.nan_to_num(actions, nan=0.0, posinf=0.0, neginf=0.0)
        state = prep.state[np.maximum(np.arange(t - self.history + 1, t + 1), 0)]  # clamped at the start
        key = [self.seed, self.epoch, index] + ([self.draw] if self.draw else [])  # the first draw: as ever
        rng = np.random.default_rng(key) if self.augment is not None else None
        if self.prompt_tokenizer is None:
            prompt, target = np.zeros(0, np.int64), np.zeros(0, np.int64)
        else:
            text = prep.text[t] if prep.text is not None else None
            task = prep.tasks[t] if prep.tasks is not None else episode.task
            prompt, target = self.prompt_tokenizer(task, text, actions, mask)
        return {
            "images": torch.from_numpy(self._images(episode, t, rng)),
            "state": torch.from_numpy(np.ascontiguousarray(state, np.float32)),
            "actions": torch.from_numpy(np.ascontiguousarray(actions, np.float32)),
            "action_mask": torch.from_numpy(mask),
            "prompt_ids": torch.from_numpy(prompt),
            "target_ids": torch.from_numpy(target),
            "episode_index": torch.tensor(episode.index, dtype=torch.int64),
            "frame_index": torch.tensor(t, dtype=torch.int64),
            "index": torch.tensor(index, dtype=torch.int64),
            "source": torch.tensor(prep.source, dtype=torch.int64),
        }
