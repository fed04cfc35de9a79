"""The synthetic pick task as a closed-loop environment, to score a policy by success rate.

Offline metrics (action L1 on held-out frames) say how well a policy imitates; only running it,
its own actions deciding what it sees next, says whether it finishes the task. This environment
has the dynamics the synthetic dataset was recorded with (:func:`robot_data.synthetic.rollout`):

- the end effector (EE) moves by the action's ``(dx, dy)``, each clipped to ``MAX_STEP``, and
  stays inside the unit square;
- closing the gripper (command > 0.5 after open) within ``GRASP_TOL`` of a block grasps the
  nearest such block, which then moves with the EE (held at its centre, as in the data);
- opening it releases the block where the EE is. **Success**: the instructed block released within
  ``BIN_TOL`` of the bin; the episode then ends.

It speaks gymnasium's API (``reset(seed=)`` -> ``(obs, info)``, ``step(action)`` -> ``(obs,
reward, terminated, truncated, info)``) with LeRobot's gym observation layout
(``{"pixels": {camera: (H, W, 3) uint8}, "agent_pos": (3,) float32}``, ``info["is_success"]``),
so a rollout loop written for it runs gymnasium environments unchanged. ``reset(seed=i)`` lays
out the scene of episode ``i`` (:func:`~robot_data.synthetic.make_scene`): seeds past a dataset's
episode count are scenes no training sample showed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from robot_data.synthetic import BIN, CAMERA, FPS, MAX_STEP, Scene, make_scene, render

GRASP_TOL = 1 / 16  # half a block's width (blocks are 1/8 wide)
BIN_TOL = 1 / 8  # half the bin ring's width
PIXELS_KEY = CAMERA.rsplit(".", 1)[-1]  # "top": LeRobot's gym envs name cameras without the prefix


class SyntheticPickEnv:
    """Closed-loop synthetic pick task (see the module docstring). ``seed`` is the task's
    (``data.synthetic.seed``), ``image_size`` its rendering size, ``max_steps`` the time limit."""

    metadata = {"render_fps": FPS}

    def __init__(self, image_size: int = 64, seed: int = 0, max_steps: int = 80):
        if image_size < 8 or max_steps < 1:
            raise ValueError(f"need image_size >= 8 and max_steps >= 1, got {image_size}, {max_steps}")
        self.image_size, self.seed, self.max_steps = image_size, seed, max_steps
        self.reset(seed=0)

    @property
    def task(self) -> str:
        """The instruction of the current episode."""
        return self.scene.instruction

    def reset(self, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict, dict]:
        """Start episode ``seed`` (its scene); None repeats the current one."""
        if seed is not None:
            self.scene: Scene = make_scene(self.seed, int(seed))
        self.ee = self.scene.ee_start.astype(np.float64)
        self.grip, self.held, self.t = 0.0, None, 0
        self.blocks = self.scene.blocks.astype(np.float64)
        return self._obs(), {"task": self.task, "is_success": False}

    def step(self, action: Any) -> tuple[dict, float, bool, bool, dict]:
        """``action``: ``(3,)`` [dx, dy, gripper command], the dataset's action in its units."""
        a = np.asarray(action, np.float64).reshape(-1)
        if a.shape != (3,) or not np.isfinite(a).all():
            raise ValueError(f"action: expected 3 finite values [dx, dy, gripper], got {np.asarray(action)!r}")
        command = 1.0 if a[2] > 0.5 else 0.0
        self.ee = np.clip(self.ee + np.clip(a[:2], -MAX_STEP, MAX_STEP), 0.0, 1.0)
        if self.held is not None:
            self.blocks[self.held] = self.ee
        success = False
        if command and not self.grip:
            gaps = np.abs(self.blocks - self.ee).max(axis=1)
            if gaps.min() <= GRASP_TOL:
                self.held = int(gaps.argmin())
                self.blocks[self.held] = self.ee
        elif self.grip and not command and self.held is not None:
            success = self.held == self.scene.target and np.abs(self.ee - BIN).max() <= BIN_TOL
            self.held = None
        self.grip, self.t = command, self.t + 1
        truncated = not success and self.t >= self.max_steps
        return self._obs(), float(success), success, truncated, {"task": self.task, "is_success": success}

    def render(self) -> np.ndarray:
        """The current frame, ``(image_size, image_size, 3)`` uint8."""
        return render(self.scene, self.blocks.astype(np.float32), self.state, self.image_size)  # as recorded

    @property
    def state(self) -> np.ndarray:
        """[ee_x, ee_y, gripper], float32, as the dataset records it."""
        return np.array([self.ee[0], self.ee[1], self.grip], np.float32)

    def _obs(self) -> dict[str, Any]:
        return {"pixels": {PIXELS_KEY: self.render()}, "agent_pos": self.state}
