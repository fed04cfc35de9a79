"""Train/validation split by episode (never by frame: neighbouring frames are near-duplicates)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def split_episodes(
    episode_indices: Sequence[int], val_ratio: float = 0.1, val_episodes: Sequence[int] = (), seed: int = 0
) -> tuple[list[int], list[int]]:
    """Split episodes into (train, val), both sorted.

    ``val_episodes`` (explicit ids) overrides ``val_ratio``. Otherwise round(n * val_ratio)
    episodes, at least 1 when the ratio is positive, are drawn by a permutation seeded with
    ``seed``, so the split is the same in every process. At least one episode stays in train.
    """
    episodes = sorted({int(e) for e in episode_indices})
    if not episodes:
        raise ValueError("split_episodes: the dataset has no episodes")
    if val_episodes:
        unknown = sorted(set(val_episodes) - set(episodes))
        if unknown:
            raise ValueError(f"val_episodes: unknown episode(s) {unknown}; the dataset has {_describe(episodes)}")
        val = sorted({int(e) for e in val_episodes})
    else:
        if not 0.0 <= val_ratio < 1.0:
            raise ValueError(f"val_ratio: must be in [0, 1), got {val_ratio}")
        n_val = max(1, round(len(episodes) * val_ratio)) if val_ratio > 0 else 0
        n_val = min(n_val, len(episodes) - 1)
        order = np.random.default_rng(seed).permutation(len(episodes))
        val = sorted(episodes[i] for i in order[:n_val])
    val_set = set(val)
    train = [e for e in episodes if e not in val_set]
    if not train:
        raise ValueError(f"val_episodes: all {len(episodes)} episodes are in validation; keep one for training")
    return train, val


def _describe(episodes: list[int]) -> str:
    if episodes == list(range(episodes[0], episodes[-1] + 1)):
        return f"episodes {episodes[0]}..{episodes[-1]}"
    return f"{len(episodes)} episodes: {episodes[:10]}{' ...' if len(episodes) > 10 else ''}"
