"""Dataset statistics and the state/action normaliser saved into checkpoints.

Stats layout (also what :meth:`Normalizer.to_dict` stores): ``{key: {stat: (D,) float32}}`` for
key in ("state", "action") and stat in ("mean", "std", "min", "max", "q01", "q99", "count").
With delta actions (:mod:`robot_data.delta_actions`) the action stats of the delta dims are those
of the offsets every sample's chunk holds; the normaliser records which dims they are.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any, TypeVar

import numpy as np
import torch

from robot_data.delta_actions import DeltaActions
from robot_data.reader import Reader

NORM_KEYS = ("state", "action")
MODES = ("mean_std", "min_max", "q01_q99", "none")
MODE_STATS = {"mean_std": ("mean", "std"), "min_max": ("min", "max"), "q01_q99": ("q01", "q99"), "none": ()}
EPS = 1e-6
"""A std or half-range below EPS marks a constant dim: its scale becomes 1 instead of EPS, since
dividing by a tiny number would turn any deviation at inference time into a huge input."""
QUANTILE_ROWS = 1_000_000
"""Quantiles are exact up to this many frames, then estimated from a uniform reservoir sample
(Algorithm R, seeded: the same data gives the same sample)."""

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


class _Accumulator:
    """Streaming per-dim count/mean/M2/min/max (float64, NaN/inf skipped) plus a reservoir for quantiles."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.seen = 0
        self.sums: dict[str, np.ndarray] = {}
        self.reservoir = np.empty((0, 0))  # (capacity, D); rows [:fill] hold the sample
        self.fill = 0

    def add(self, x: np.ndarray) -> None:
        """x: (T, D) float; rows are frames."""
        x = np.asarray(x, np.float64)
        finite = np.isfinite(x)
        count = finite.sum(0).astype(np.float64)
        zeroed = np.where(finite, x, 0.0)
        mean = zeroed.sum(0) / np.maximum(count, 1)
        part = {
            "count": count,
            "mean": mean,
            "m2": (np.where(finite, x - mean, 0.0) ** 2).sum(0),
            "min": np.where(finite, x, np.inf).min(0, initial=np.inf),
            "max": np.where(finite, x, -np.inf).max(0, initial=-np.inf),
        }
        self.sums = part if not self.sums else self._merge(self.sums, part)
        self._sample(np.where(finite, x, np.nan))

    @staticmethod
    def _merge(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Chan et al. pairwise update: stable where sum-of-squares would cancel (large offset, small spread).
        n = a["count"] + b["count"]
        safe = np.maximum(n, 1)
        delta = b["mean"] - a["mean"]
        return {
            "count": n,
            "mean": a["mean"] + delta * b["count"] / safe,
            "m2": a["m2"] + b["m2"] + delta**2 * a["count"] * b["count"] / safe,
            "min": np.minimum(a["min"], b["min"]),
            "max": np.maximum(a["max"], b["max"]),
        }

    def _sample(self, x: np.ndarray) -> None:
        # Algorithm R, vectorised; fancy assignment keeps the last duplicate, as the sequential loop would.
        n_new = len(x)
        room = min(n_new, QUANTILE_ROWS - self.fill)
        if room > 0:
            self._reserve(self.fill + room, x.shape[1])
            self.reservoir[self.fill : self.fill + room] = x[:room]
            self.fill += room
        if n_new > room:
            positions = np.arange(self.seen + room, self.seen + n_new)
            slots = self.rng.integers(0, positions + 1)
            keep = slots < QUANTILE_ROWS
            self.reservoir[slots[keep]] = x[room:][keep]
        self.seen += n_new

    def _reserve(self, rows: int, dim: int) -> None:
        # Capacity doubles up to QUANTILE_ROWS: growing by one episode at a time would copy the
        # whole sample per episode, quadratic in the dataset's frames.
        if rows <= len(self.reservoir):
            return
        grown = np.empty((min(QUANTILE_ROWS, max(rows, 2 * len(self.reservoir))), dim))
        if self.fill:
            grown[: self.fill] = self.reservoir[: self.fill]
        self.reservoir = grown

    def finish(self) -> dict[str, np.ndarray]:
        s = self.sums
        empty = s["count"] == 0
        var = s["m2"] / np.maximum(s["count"], 1)
        if empty.all():
            q01 = q99 = np.zeros_like(s["mean"])
        else:
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN dims; zeroed below
                q01, q99 = np.nanquantile(self.reservoir[: self.fill], [0.01, 0.99], axis=0)
            # A dim with values, none of them sampled (past QUANTILE_ROWS, a sensor that reported
            # briefly): its range stands in for the quantiles.
            unsampled = np.isnan(q01) & ~empty
            q01, q99 = np.where(unsampled, s["min"], q01), np.where(unsampled, s["max"], q99)
        out = {"mean": s["mean"], "std": np.sqrt(var), "min": s["min"], "max": s["max"], "q01": q01, "q99": q99}
        out = {k: np.where(empty, 0.0, v) for k, v in out.items()}  # all-NaN dims get neutral stats
        out["count"] = s["count"]
        return {k: v.astype(np.float32) for k, v in out.items()}


def compute_stats(
    reader: Reader, episode_indices: Iterable[int], delta: DeltaActions | None = None, chunk: int = 1
) -> dict[str, dict[str, np.ndarray]]:
    """Per-dim stats of state and action over the given episodes, in one pass over ``numeric()``.

    NaN/inf entries are skipped per dim (``count`` says how many values each dim had). std is the
    population std (ddof=0); q01/q99 use linear interpolation like ``np.quantile``. With ``delta``,
    the delta action dims hold the stats of the offsets of ``chunk``-step samples
    (:meth:`DeltaActions.chunk_offsets`; ``count`` is theirs), the other dims those of the frames.
    """
    return _compute_stats(reader, [list(episode_indices)], delta, chunk)[0]


def _compute_stats(
    reader: Reader, episode_sets: list[list[int]], delta: DeltaActions | None = None, chunk: int = 1
) -> list[dict[str, dict[str, np.ndarray]]]:
    """:func:`compute_stats` of each episode set, reading every episode once; ``delta`` applies to
    the first set only (the others describe the data as stored, for :func:`compare_stats`).

    Episodes are read in the first set's order, then the others' new ones: the first set's stats are
    bit-identical to :func:`compute_stats` of it alone; another set's may differ from that in float
    rounding and, past ``QUANTILE_ROWS`` frames, in which frames the quantile sample holds.
    """
    if not all(episode_sets):
        raise ValueError("compute_stats: no episodes given")
    accs = [{key: _Accumulator() for key in NORM_KEYS} for _ in episode_sets]
    offsets = _Accumulator()
    members = [set(episodes) for episodes in episode_sets]
    for ep in dict.fromkeys(ep for episodes in episode_sets for ep in episodes):
        arrays = reader.numeric(ep)
        for acc, member in zip(accs, members, strict=True):
            if ep in member:
                acc["state"].add(arrays.state)
                acc["action"].add(arrays.action)
        if delta is not None and ep in members[0]:
            offsets.add(delta.chunk_offsets(arrays.action, arrays.state, chunk))
    out = [{key: a.finish() for key, a in acc.items()} for acc in accs]
    if delta is not None:
        for stat, values in offsets.finish().items():
            out[0]["action"][stat][list(delta.action_dims)] = values
    return out


def _scale(stats: dict[str, np.ndarray], mode: str, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(centre, scale) with x_norm = (x - centre) / scale; both (dim,) float32, fresh arrays.

    Fresh, never views of ``stats``: the caller zeroes raw dims in them, which must not rewrite
    the statistics themselves (mean_std's centre *is* ``stats["mean"]``)."""
    if mode == "none":
        return np.zeros(dim, np.float32), np.ones(dim, np.float32)
    if mode == "mean_std":
        centre, scale = stats["mean"], stats["std"]
    else:
        lo, hi = (stats["min"], stats["max"]) if mode == "min_max" else (stats["q01"], stats["q99"])
        centre, scale = (hi + lo) / 2, (hi - lo) / 2  # maps [lo, hi] onto [-1, 1]
    # Constant or unknown (NaN in a shipped file) dims pass through unscaled, never as NaN.
    scale = np.where(scale >= EPS, scale, 1.0)
    centre = np.where(np.isfinite(centre), centre, 0.0)
    return np.array(centre, np.float32), np.array(scale, np.float32)


class Normalizer:
    """Normalises state and action per dim; ``raw_*_dims`` pass through untouched.

    normalize/unnormalize take numpy arrays or torch tensors of shape (..., D) and return the
    same kind (torch: same dtype and device). The ``source`` arguments are those of
    :class:`PerSourceNormalizer`; with one set of statistics they are ignored.
    """

    def __init__(
        self,
        stats: dict[str, dict[str, Any]],
        mode: str = "mean_std",
        raw_action_dims: list[int] | None = None,
        raw_state_dims: list[int] | None = None,
        delta: DeltaActions | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"normalize: unknown mode '{mode}'; valid: {', '.join(MODES)}")
        self.mode = mode
        self.stats = {k: {s: np.asarray(v, np.float32).reshape(-1) for s, v in stats[k].items()} for k in NORM_KEYS}
        self.raw_dims = {"action": sorted(raw_action_dims or []), "state": sorted(raw_state_dims or [])}
        self.delta = delta  # the stats' delta action dims are offsets from the state
        self.sources: list[str] = []  # one set of statistics for every sample (sample["source"] is 0)
        self._affine: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for key in NORM_KEYS:
            missing = [s for s in MODE_STATS[mode] if s not in self.stats[key]]
            if missing:
                have = ", ".join(self.stats[key]) or "none"
                raise ValueError(f"normalize={mode} needs {key} stats {', '.join(missing)}; the stats have {have}")
            dim = len(next(iter(self.stats[key].values())))
            bad = [d for d in self.raw_dims[key] if not 0 <= d < dim]
            if bad:
                raise ValueError(f"normalize: raw {key} dims {bad} out of range for {dim} {key} dims")
            centre, scale = _scale(self.stats[key], mode, dim)
            centre[self.raw_dims[key]], scale[self.raw_dims[key]] = 0.0, 1.0  # (x - 0) / 1 == x exactly
            self._affine[key] = centre, scale
        widths = {key: len(centre) for key, (centre, _) in self._affine.items()}
        bad = [] if delta is None else delta.range_problems(widths["action"], widths["state"])
        if bad:
            raise ValueError(f"normalize: {'; '.join(bad)}")

    def _params(self, key: str, x: ArrayT) -> tuple[Any, Any]:
        if key not in self._affine:
            raise KeyError(f"normalize: unknown key '{key}'; valid: {', '.join(NORM_KEYS)}")
        centre, scale = self._affine[key]
        if x.shape[-1] != len(centre):
            raise ValueError(f"normalize: {key} has {len(centre)} dims in the stats, got shape {tuple(x.shape)}")
        if isinstance(x, torch.Tensor):
            return (
                torch.as_tensor(centre, device=x.device, dtype=x.dtype),
                torch.as_tensor(scale, device=x.device, dtype=x.dtype),
            )
        return centre, scale

    def normalize(self, key: str, x: ArrayT, source: Any = None) -> ArrayT:
        """x: (..., D) in dataset units -> normalised."""
        centre, scale = self._params(key, x)
        out = (x - centre) / scale
        return out.astype(np.float32, copy=False) if isinstance(out, np.ndarray) else out

    def unnormalize(self, key: str, x: ArrayT, source: Any = None) -> ArrayT:
        """x: (..., D) normalised -> dataset units."""
        centre, scale = self._params(key, x)
        out = x * scale + centre
        return out.astype(np.float32, copy=False) if isinstance(out, np.ndarray) else out

    def encode_actions(self, actions: ArrayT, state: ArrayT) -> ArrayT:
        """What the model learns: actions (..., C, A) and the state (..., S) at the sample's frame,
        both in dataset units -> normalised, with offsets on the delta dims."""
        return self.normalize("action", actions if self.delta is None else self.delta.to_delta(actions, state))

    def absolute_actions(self, actions: ArrayT, state: ArrayT) -> ArrayT:
        """Dataset-unit actions (..., C, A) as the model predicts them (offsets on the delta dims)
        plus the state (..., S) they start from -> the absolute actions a robot is sent."""
        return actions if self.delta is None else self.delta.to_absolute(actions, state)

    def stat(self, key: str, name: str, source: Any = None) -> np.ndarray:
        """Statistic ``name`` ("mean", "min", ...) of ``key``: (D,) float32."""
        return self.stats[key][name]

    def for_source(self, source: str | None) -> Normalizer:
        """This normaliser: it has no per-source statistics to choose from."""
        if source is not None:
            raise ValueError(f"source: '{source}' given, but these statistics are one set for every source")
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict; float32 -> Python float -> float32 is exact, so from_dict round-trips."""
        return {
            "mode": self.mode,
            "raw_action_dims": list(self.raw_dims["action"]),
            "raw_state_dims": list(self.raw_dims["state"]),
            "delta_actions": None if self.delta is None else self.delta.to_dict(),
            "stats": {k: {s: [float(v) for v in arr] for s, arr in self.stats[k].items()} for k in NORM_KEYS},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Normalizer:
        """From :meth:`to_dict` (files written before delta actions existed have none)."""
        delta = DeltaActions.from_dict(data.get("delta_actions"))
        return cls(data["stats"], data["mode"], data["raw_action_dims"], data["raw_state_dims"], delta)


class PerSourceNormalizer:
    """One :class:`Normalizer` per source of a dataset mixture (``data.normalize_per_source``).

    Robots that share an action space seldom share its ranges (OpenVLA normalises each Open X
    dataset with its own statistics for that reason): a workspace 30 cm wide and one 80 cm wide
    would otherwise both be squeezed into one scale. Each sample is normalised with its source's
    statistics and carries the source's index in :attr:`sources`; the batch-wide methods take
    ``source``: an int for all rows, or one index per row ((B,) for x of shape (B, ..., D)). A policy
    drives one robot: :meth:`for_source` is its :class:`Normalizer`. Mode, raw dims and delta dims
    are the recipe's, so equal for every source.
    """

    def __init__(self, by_source: dict[str, Normalizer]):
        if not by_source:
            raise ValueError("normalize: per-source statistics of no source")
        self.by_source = dict(by_source)
        self.sources = list(by_source)
        first = next(iter(by_source.values()))
        self.mode, self.raw_dims, self.delta = first.mode, first.raw_dims, first.delta
        for name, norm in by_source.items():
            same = (norm.mode, norm.raw_dims, norm.to_dict()["delta_actions"]) == (
                first.mode,
                first.raw_dims,
                first.to_dict()["delta_actions"],
            )
            widths = {k: len(norm._affine[k][0]) for k in NORM_KEYS}
            if not same or widths != {k: len(first._affine[k][0]) for k in NORM_KEYS}:
                raise ValueError(f"normalize: source '{name}' differs from '{self.sources[0]}' in mode, dims or widths")
        self._table = {
            key: tuple(np.stack([n._affine[key][i] for n in by_source.values()]) for i in (0, 1)) for key in NORM_KEYS
        }  # key -> (centre (S, D), scale (S, D))

    def _rows(self, table: np.ndarray, x: ArrayT, source: Any) -> Any:
        """``table`` (S, D) at ``source`` (int, or (B,) for x (B, ..., D)), shaped to broadcast with x."""
        self._need(source)
        if isinstance(x, torch.Tensor):
            table = torch.as_tensor(table, device=x.device, dtype=x.dtype)
            index = torch.as_tensor(source, device=x.device, dtype=torch.long)
        else:
            index = np.asarray(source, np.int64)
        if index.ndim == 0:
            return table[index]
        if index.ndim != 1 or x.ndim < 2 or index.shape[0] != x.shape[0]:
            raise ValueError(f"normalize: one source per row, got {tuple(index.shape)} for shape {tuple(x.shape)}")
        return table[index].reshape(index.shape[0], *[1] * (x.ndim - 2), table.shape[-1])

    def _need(self, source: Any) -> None:
        if source is None:
            raise ValueError(f"normalize: statistics per source ({', '.join(self.sources)}); say which source")

    def _params(self, key: str, x: ArrayT, source: Any) -> tuple[Any, Any]:
        self.by_source[self.sources[0]]._params(key, x)  # the key and width checks
        centre, scale = self._table[key]
        return self._rows(centre, x, source), self._rows(scale, x, source)

    def normalize(self, key: str, x: ArrayT, source: Any = None) -> ArrayT:
        """x: (..., D) in dataset units -> normalised with ``source``'s statistics."""
        centre, scale = self._params(key, x, source)
        out = (x - centre) / scale
        return out.astype(np.float32, copy=False) if isinstance(out, np.ndarray) else out

    def unnormalize(self, key: str, x: ArrayT, source: Any = None) -> ArrayT:
        """x: (..., D) normalised -> dataset units, with ``source``'s statistics."""
        centre, scale = self._params(key, x, source)
        out = x * scale + centre
        return out.astype(np.float32, copy=False) if isinstance(out, np.ndarray) else out

    def absolute_actions(self, actions: ArrayT, state: ArrayT) -> ArrayT:
        """As :meth:`Normalizer.absolute_actions` (the delta dims are every source's)."""
        return actions if self.delta is None else self.delta.to_absolute(actions, state)

    def stat(self, key: str, name: str, source: Any = None) -> np.ndarray:
        """Statistic ``name`` of ``key`` at ``source``: (D,) for an int, (B, D) for (B,) indices."""
        self._need(source)
        return np.stack([self.by_source[s].stats[key][name] for s in self.sources])[np.asarray(source, np.int64)]

    def for_source(self, source: str | None) -> Normalizer:
        """The statistics of the robot ``source`` (a policy drives one)."""
        if source not in self.by_source:
            given = "no source given" if source is None else f"unknown source '{source}'"
            raise ValueError(
                f"source: {given}; these statistics are per source (data.normalize_per_source): "
                f"{', '.join(self.sources)}"
            )
        return self.by_source[source]

    def to_dict(self) -> dict[str, Any]:
        """``{"per_source": {name: Normalizer.to_dict()}}``, in source order."""
        return {"per_source": {name: norm.to_dict() for name, norm in self.by_source.items()}}


def load_normalizer(data: dict[str, Any]) -> Normalizer | PerSourceNormalizer:
    """The normaliser a ``norm_stats.json`` (``to_dict`` of either kind) describes."""
    if "per_source" in data:
        return PerSourceNormalizer({name: Normalizer.from_dict(d) for name, d in data["per_source"].items()})
    return Normalizer.from_dict(data)


def compare_stats(
    shipped: dict[str, dict[str, np.ndarray]], fresh: dict[str, dict[str, np.ndarray]], tolerance: float = 0.05
) -> list[str]:
    """Where shipped stats disagree with freshly computed ones, one line per (key, stat, dim).

    A difference counts when it exceeds ``tolerance`` times the fresh std of that dim (floored
    at EPS), i.e. disagreements are measured in units of the data's own spread. NaN compares
    false with everything, so it is handled apart: NaN on one side only is a disagreement (a
    stats file with a hole, or a dim the data never fills), NaN on both agrees, and a NaN std
    counts as the floor.
    """
    lines = []
    for key in NORM_KEYS:
        spread = np.fmax(np.asarray(fresh[key]["std"], np.float64).reshape(-1), EPS)  # fmax: NaN -> EPS
        for stat in ("mean", "std", "min", "max", "q01", "q99"):
            if stat not in shipped.get(key, {}) or stat not in fresh[key]:
                continue
            a = np.asarray(shipped[key][stat], np.float64).reshape(-1)
            b = np.asarray(fresh[key][stat], np.float64).reshape(-1)
            if a.shape != b.shape:
                lines.append(f"{key}.{stat}: shipped has {a.size} dims, the data has {b.size}")
                continue
            differ = (np.abs(a - b) > tolerance * spread) | (np.isnan(a) != np.isnan(b))
            for d in np.flatnonzero(differ):
                lines.append(f"{key}.{stat}[{d}]: shipped {a[d]:.6g}, computed {b[d]:.6g}")
    return lines


def resolve_stats(
    reader: Reader,
    train_episodes: Iterable[int],
    tolerance: float = 0.05,
    usable_episodes: Iterable[int] | None = None,
    delta: DeltaActions | None = None,
    chunk: int = 1,
) -> tuple[dict[str, dict[str, np.ndarray]], list[str]]:
    """The stats to normalise with, computed over ``train_episodes`` only, plus a report of
    where a stats file shipped with the dataset disagrees with the data.

    A shipped file (``reader.stats()``) describes every episode, validation ones included, so it
    is never normalised with: one outlier validation episode would move min/max/q01/q99. It is
    compared with stats computed over ``usable_episodes`` (default: every episode; what the file
    claims to describe, less episodes a run skips as unreadable), in the same pass over the data;
    each disagreement is a line of the report (:func:`compare_stats`). ``delta`` and ``chunk``: as in
    :func:`compute_stats`, for the stats to normalise with; the comparison is of absolute actions.
    """
    train = list(train_episodes)
    shipped = reader.stats()
    if shipped is None:
        return compute_stats(reader, train, delta, chunk), []
    usable = [e.index for e in reader.episodes()] if usable_episodes is None else list(usable_episodes)
    fresh, described = _compute_stats(reader, [train, usable], delta, chunk)
    return fresh, compare_stats(shipped, described, tolerance)
