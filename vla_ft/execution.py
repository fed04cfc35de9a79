"""Running a chunk policy on a robot: one action per control step from predicted action chunks.

``VLAPolicy.predict_action`` returns the next ``chunk`` actions. A control loop sends one action
per step, and there are two standard ways to get it from the chunks:

- **receding horizon** (``execute=k``): predict a chunk, send its first k actions, predict again
  (LeRobot's ``n_action_steps``; openpi's ``action_horizon``);
- **temporal ensembling** (``ensemble=m``, ACT, Zhao et al. 2023): predict a chunk at every step;
  the action of step t is the weighted mean of what every chunk still covering t predicted for it,
  with weight ``exp(-m i)`` for the i-th oldest (i = 0: the oldest), which smooths the switch from
  one chunk to the next.

Gripper dims hold the dataset's open or closed value; after ensembling they are set to the nearer
of the two, since a mean of "open" and "closed" is a command the gripper never saw.

::

    runner = ChunkRunner(VLAPolicy.from_pretrained("runs/aloha"), ensemble=0.01)
    for _ in range(steps):
        robot.send(runner.act(camera.read(), "insert the peg", robot.state()))
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import numpy as np


class PolicyShape:
    """What a control loop reads of a policy, from its ``meta``: a local :class:`vla_ft.policy.VLAPolicy` or a
    served one (:class:`vla_ft.serve.PolicyClient`)."""

    meta: dict[str, Any]

    @property
    def cameras(self) -> list[str]:
        return list(self.meta["cameras"])

    @property
    def chunk(self) -> int:
        return int(self.meta["chunk"])

    @property
    def action_dim(self) -> int:
        return int(self.meta["action_dim"])

    @property
    def fps(self) -> float | None:
        """The control rate (Hz) the policy trained at: send one action every ``1 / fps`` s, so a
        chunk spans ``chunk / fps`` s. None where the checkpoint records none (one written before
        the rate was recorded, or trained on data of no known rate: see
        :func:`vla_ft.model_files.known_fps`), or the server is older than ``fps`` in ``/info``."""
        fps = self.meta.get("fps")
        return None if fps is None else float(fps)


class ChunkRunner:
    """One action per :meth:`act` from ``policy`` (a :class:`vla_ft.VLAPolicy`); give exactly one of
    ``execute`` (1 .. chunk actions sent per prediction) or ``ensemble`` (m >= 0: predict every step)."""

    def __init__(self, policy: Any, execute: int | None = None, ensemble: float | None = None):
        if (execute is None) == (ensemble is None):
            raise ValueError("ChunkRunner: give execute (receding horizon) or ensemble (temporal ensembling), not both")
        if execute is not None and not 1 <= execute <= policy.chunk:
            raise ValueError(f"execute: {execute} actions per prediction, the policy predicts chunks of {policy.chunk}")
        if ensemble is not None and not 0 <= ensemble < math.inf:
            raise ValueError(f"ensemble: the weights' decay m must be finite and >= 0, got {ensemble}")
        self.policy, self.execute, self.ensemble = policy, execute, ensemble
        self._gripper = policy.gripper_range()  # (dims, min, max): the open/closed values per gripper dim
        self.reset()

    def reset(self) -> None:
        """Forget the chunks in flight (a new episode)."""
        self.t = 0
        self._queue: deque[np.ndarray] = deque()  # receding horizon: actions still to send
        self._chunks: deque[tuple[int, np.ndarray]] = deque()  # ensembling: (step predicted at, chunk)

    def act(self, images: Any, instruction: str, state: Any) -> np.ndarray:
        """The action for this control step, ``(action_dim,)`` float32 in the dataset's units."""
        return self.step(self.policy.predict_action(images, instruction, state) if self.needs_chunk() else None)

    def needs_chunk(self) -> bool:
        """Whether this control step needs a new prediction (then :meth:`step` must get one)."""
        return self.ensemble is not None or not self._queue

    def step(self, chunk: np.ndarray | None) -> np.ndarray:
        """The action for this control step given this step's prediction ``chunk`` ``(chunk, action_dim)``,
        None when :meth:`needs_chunk` is false: how a caller batches the predictions of several runners."""
        if self.needs_chunk() != (chunk is not None):
            raise ValueError(f"ChunkRunner.step: this control step needs {'a' if self.needs_chunk() else 'no'} chunk")
        if self.execute is not None:
            if chunk is not None:
                self._queue.extend(chunk[: self.execute])
            action = self._queue.popleft()
        else:
            self._chunks.append((self.t, chunk))
            while self._chunks[0][0] + len(self._chunks[0][1]) <= self.t:  # no longer covers this step
                self._chunks.popleft()
            predictions = np.stack([c[self.t - start] for start, c in self._chunks])  # oldest first
            weights = np.exp(-self.ensemble * np.arange(len(predictions)))
            action = self._snap_gripper((weights @ predictions) / weights.sum())
        self.t += 1
        return action.astype(np.float32)

    def _snap_gripper(self, action: np.ndarray) -> np.ndarray:
        dims, low, high = self._gripper
        if dims:
            value = action[dims]
            action[dims] = np.where(np.abs(value - low) <= np.abs(value - high), low, high)
        return action
