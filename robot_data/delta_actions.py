"""Delta actions: action dims trained as offsets from the robot state at the sample's frame.

Joint-position datasets (ALOHA, most arms commanded by position) store absolute targets, so the
model must output the arm's current pose plus the step it takes; openpi trains such dims as
``action[t + k] - state[t]`` instead, which leaves the model only the motion to predict. With
``DeltaActions``, action dim ``action_dims[i]`` becomes an offset from state dim
``state_dims[i]`` at frame t, for every step k of the chunk (one reference state per sample, not
a chain of per-step differences). Normalisation statistics of those dims are then those of the
offsets (:func:`chunk_offsets`), and a policy adds the state back (:meth:`to_absolute`).

Grippers stay absolute: their BCE labels are read from the raw command.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


@dataclass(frozen=True)
class DeltaActions:
    """``action_dims[i]`` is taken relative to ``state_dims[i]`` (the same index when not given)."""

    action_dims: tuple[int, ...]
    state_dims: tuple[int, ...]

    @classmethod
    def build(cls, action_dims: Sequence[int], state_dims: Sequence[int] | None = None) -> DeltaActions | None:
        """None when ``action_dims`` is empty (every action absolute); else a checked instance."""
        problems = cls.problems(action_dims, state_dims)
        if problems:
            raise ValueError("; ".join(problems))
        if not action_dims:
            return None
        state = action_dims if state_dims is None else state_dims
        return cls(tuple(int(d) for d in action_dims), tuple(int(d) for d in state))

    @staticmethod
    def problems(action_dims: Sequence[int], state_dims: Sequence[int] | None = None) -> list[str]:
        """What :meth:`build` refuses, one line per key (a list: a line may itself hold "; ")."""
        if not action_dims:
            return [f"delta_state_dims: {list(state_dims)} given without delta_action_dims"] if state_dims else []
        state = list(action_dims) if state_dims is None else list(state_dims)
        problems = []
        if len(state) != len(action_dims):
            problems.append(
                f"delta_state_dims: {len(state)} dims {state} for {len(action_dims)} delta_action_dims "
                f"{list(action_dims)}; give one state dim per action dim"
            )
        for key, dims in (("delta_action_dims", list(action_dims)), ("delta_state_dims", state)):
            if any(d < 0 for d in dims):
                problems.append(f"{key}: {dims} has a negative index")
            if len(set(dims)) != len(dims):
                problems.append(f"{key}: {dims} repeats a dim")
        return problems

    def range_problems(self, action_dim: int, state_dim: int) -> list[str]:
        """Indices past the data's widths, one line per key (checked once the data is open)."""
        out = []
        for key, dims, width, what in (
            ("delta_action_dims", self.action_dims, action_dim, "action"),
            ("delta_state_dims", self.state_dims, state_dim, "state"),
        ):
            bad = [d for d in dims if d >= width]
            if bad:
                out.append(f"{key}: {bad} out of range for the data's {width} {what} dims")
        return out

    def to_delta(self, actions: ArrayT, state: ArrayT) -> ArrayT:
        """actions (..., C, A) absolute, state (..., S) at frame t -> actions with offsets on the delta dims."""
        return self._shift(actions, state, -1.0)

    def to_absolute(self, actions: ArrayT, state: ArrayT) -> ArrayT:
        """Inverse of :meth:`to_delta`: actions (..., C, A) with offsets, state (..., S) -> absolute."""
        return self._shift(actions, state, 1.0)

    def _shift(self, actions: ArrayT, state: ArrayT, sign: float) -> ArrayT:
        a, s = list(self.action_dims), list(self.state_dims)
        out = actions.clone() if isinstance(actions, torch.Tensor) else np.array(actions, copy=True)
        out[..., a] = actions[..., a] + sign * state[..., None, s]
        return out

    def chunk_offsets(self, action: np.ndarray, state: np.ndarray, chunk: int) -> np.ndarray:
        """Every offset a sample of an episode holds: ``action[t + k, a] - state[t, s]`` for each
        frame t and chunk step k < ``chunk`` inside the episode (steps past its end are padding,
        masked in training). action (T, A), state (T, S) -> (N, len(action_dims)) float64."""
        a = np.asarray(action, np.float64)[:, list(self.action_dims)]
        s = np.asarray(state, np.float64)[:, list(self.state_dims)]
        n = len(a)
        return np.concatenate([a[k:] - s[: n - k] for k in range(min(chunk, n))] or [a[:0]])

    def to_dict(self) -> dict[str, list[int]]:
        return {"action_dims": list(self.action_dims), "state_dims": list(self.state_dims)}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> DeltaActions | None:
        return None if not data else cls.build(data["action_dims"], data["state_dims"])
