"""A deterministic synthetic pick task, small enough to train on a laptop CPU.

The right action depends on all three inputs, so a policy that ignores one cannot solve it:
the *image* shows where the blocks are, the *instruction* says which colour to pick, and the
*state* says where the end effector (EE) is and whether the gripper is closed.

Coordinates are normalised to [0, 1]: x grows to the right, y grows *downwards* (image rows),
so "up" means smaller y; the bin where blocks are released sits at ``BIN`` (top centre).
Every episode is a pure function of ``(seed, episode_index)`` through a numpy Generator, so it
is identical in every process, worker and run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from robot_data.reader import Episode, EpisodeArrays, Reader

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 220),
    "yellow": (230, 200, 40),
    "purple": (150, 60, 190),
}
COLOUR_NAMES = tuple(COLOURS)
TABLE_RGB = (110, 95, 80)
EE_OPEN_RGB = (255, 255, 255)
EE_CLOSED_RGB = (30, 30, 30)
N_BLOCKS = 3
WORKSPACE = (0.15, 0.85)  # block centres
EE_START = (0.1, 0.9)  # EE start range, per axis
MIN_BLOCK_GAP = 0.2  # centre distance (inf-norm) > block width 1/8, so blocks never overlap
MAX_STEP = 0.035  # per-axis EE displacement per frame
BIN = np.array([0.5, 0.06])  # where blocks are carried and released (top centre)
BIN_RGB = (70, 60, 50)
FPS = 10.0
CAMERA = "observation.images.top"
DEFAULT_TEMPLATE = "what should the robot do to {instruction} ?"

_MOVE_WORDS = ["move", "left", "right", "up", "down"]
_PHRASE_WORDS = ["pick", "up", "the", "block", "close", "gripper", "carry", "release", "done"]
_TEMPLATE_WORDS = DEFAULT_TEMPLATE.replace("{instruction}", "").split()
SYNTHETIC_VOCAB: list[str] = list(dict.fromkeys(_PHRASE_WORDS + list(COLOUR_NAMES) + _MOVE_WORDS + _TEMPLATE_WORDS))
"""Every whitespace-separated word of instructions, narrations and the default prompt template."""


@dataclass(frozen=True)
class Scene:
    """The static layout of one episode. blocks: (N_BLOCKS, 2) xy; ee_start: (2,) xy."""

    colours: tuple[str, ...]
    blocks: np.ndarray
    target: int
    ee_start: np.ndarray

    @property
    def instruction(self) -> str:
        return f"pick up the {self.colours[self.target]} block"


@dataclass
class Trajectory:
    """A rolled-out episode of length T.

    state: (T, 3) float32 [ee_x, ee_y, gripper]; action: (T, 3) float32 [dx, dy, gripper_cmd];
    blocks: (T, N_BLOCKS, 2) float32 block positions at each frame; text: T narrations.
    """

    state: np.ndarray
    action: np.ndarray
    blocks: np.ndarray
    text: list[str]


def make_scene(seed: int, episode_index: int) -> Scene:
    """Colours, non-overlapping block positions, target and EE start of one episode."""
    rng = np.random.default_rng([seed, episode_index])
    colours = tuple(COLOUR_NAMES[i] for i in rng.choice(len(COLOUR_NAMES), N_BLOCKS, replace=False))
    blocks = np.empty((N_BLOCKS, 2))
    placed = 0
    while placed < N_BLOCKS:  # rejection sampling: the workspace easily fits 3 blocks
        xy = rng.uniform(*WORKSPACE, size=2)
        if all(np.abs(xy - blocks[j]).max() > MIN_BLOCK_GAP for j in range(placed)):
            blocks[placed] = xy
            placed += 1
    target = int(rng.integers(N_BLOCKS))
    return Scene(colours, blocks, target, rng.uniform(*EE_START, size=2))


def _move_phrase(delta: np.ndarray) -> str:
    words = ["move"]
    words += ["left"] if delta[0] < -1e-3 else ["right"] if delta[0] > 1e-3 else []
    words += ["up"] if delta[1] < -1e-3 else ["down"] if delta[1] > 1e-3 else []
    return " ".join(words)


def expert_step(scene: Scene, ee: np.ndarray, phase: str) -> tuple[np.ndarray, float, str]:
    """The scripted policy for one frame: (move (2,), gripper_cmd, narration).

    ``phase`` is "reach" (gripper open, heading for the named block), "carry" (block grasped,
    heading for the bin) or "done" (block released in the bin). The gripper closes on the
    step that lands on the block and opens on the step that lands on the bin, so every
    episode has both kinds of gripper transition.
    """
    colour = scene.colours[scene.target]
    if phase == "done":
        return np.zeros(2), 0.0, "done"
    goal = BIN if phase == "carry" else scene.blocks[scene.target]
    delta = goal - ee
    move = np.clip(delta, -MAX_STEP, MAX_STEP)
    arrives = np.abs(delta).max() <= MAX_STEP
    if phase == "carry":
        return move, (0.0 if arrives else 1.0), (f"release {colour} block" if arrives else f"carry {colour} block")
    return move, (1.0 if arrives else 0.0), ("close gripper" if arrives else _move_phrase(delta))


def rollout(scene: Scene, length: int) -> Trajectory:
    """Run the expert for ``length`` frames: reach, grasp, carry to the bin, release."""
    state = np.zeros((length, 3), np.float32)
    action = np.zeros((length, 3), np.float32)
    blocks_t = np.zeros((length, N_BLOCKS, 2), np.float32)
    text: list[str] = []
    ee, grip, phase = scene.ee_start.astype(np.float64), 0.0, "reach"
    blocks = scene.blocks.astype(np.float64)
    for t in range(length):
        state[t] = (ee[0], ee[1], grip)
        blocks_t[t] = blocks
        move, cmd, phrase = expert_step(scene, ee, phase)
        action[t] = (move[0], move[1], cmd)
        text.append(phrase)
        ee = ee + move
        if phase != "done" and cmd != grip:  # a gripper transition ends the phase
            phase = "carry" if phase == "reach" else "done"
        grip = cmd
        if phase == "carry" or (phase == "done" and phrase.startswith("release")):
            blocks[scene.target] = ee  # the closing step moved the EE exactly onto the block
    return Trajectory(state, action, blocks_t, text)


def _to_px(v: float, size: int) -> int:
    return min(size - 1, max(0, int(v * size)))


def _square(img: np.ndarray, cx: int, cy: int, half: int, rgb: tuple[int, int, int]) -> None:
    img[max(0, cy - half) : cy + half, max(0, cx - half) : cx + half] = rgb


def _ring(img: np.ndarray, cx: int, cy: int, half: int, width: int, rgb: tuple[int, int, int]) -> None:
    y0, y1, x0, x1 = max(0, cy - half), cy + half, max(0, cx - half), cx + half
    img[y0:y1, x0 : x0 + width] = rgb
    img[y0:y1, max(x0, x1 - width) : x1] = rgb
    img[y0 : y0 + width, x0:x1] = rgb
    img[max(y0, y1 - width) : y1, x0:x1] = rgb


def render(scene: Scene, blocks: np.ndarray, state: np.ndarray, size: int) -> np.ndarray:
    """One top-down frame (size, size, 3) uint8. blocks: (N_BLOCKS, 2); state: (3,).

    The EE is a white ring when open and a tight dark ring when closed, so the gripper state is
    visible; the target is drawn last so a grasped block is never hidden under another one.
    """
    img = np.empty((size, size, 3), np.uint8)
    img[:] = TABLE_RGB
    half = max(1, size // 16)  # block width = size / 8
    _ring(img, _to_px(BIN[0], size), _to_px(BIN[1], size), 2 * half, max(1, size // 64), BIN_RGB)
    order = [i for i in range(N_BLOCKS) if i != scene.target] + [scene.target]
    for i in order:
        _square(img, _to_px(blocks[i, 0], size), _to_px(blocks[i, 1], size), half, COLOURS[scene.colours[i]])
    cx, cy = _to_px(state[0], size), _to_px(state[1], size)
    width = max(1, size // 64)
    if state[2] > 0.5:
        _ring(img, cx, cy, half + width, width, EE_CLOSED_RGB)
    else:
        _ring(img, cx, cy, half + 3 * width, width, EE_OPEN_RGB)
    return img


class SyntheticReader(Reader):
    """The synthetic task as a dataset: one camera, fps 10, narration as per-frame text."""

    def __init__(self, episodes: int = 64, episode_length: int = 32, image_size: int = 64, seed: int = 0):
        if episodes < 1 or episode_length < 1 or image_size < 8:
            raise ValueError("synthetic: need episodes >= 1, episode_length >= 1, image_size >= 8")
        self.n_episodes, self.episode_length, self.image_size, self.seed = episodes, episode_length, image_size, seed
        self.cameras = [CAMERA]
        self.fps = FPS
        self.gripper_dims = [2]
        self._cache: dict[int, tuple[Scene, Trajectory]] = {}

    def _episode(self, episode_index: int) -> tuple[Scene, Trajectory]:
        if not 0 <= episode_index < self.n_episodes:
            raise IndexError(f"synthetic: episode {episode_index} out of range [0, {self.n_episodes})")
        if episode_index not in self._cache:
            scene = make_scene(self.seed, episode_index)
            self._cache[episode_index] = scene, rollout(scene, self.episode_length)
        return self._cache[episode_index]

    def episodes(self) -> list[Episode]:
        return [Episode(i, self.episode_length, make_scene(self.seed, i).instruction) for i in range(self.n_episodes)]

    def numeric(self, episode_index: int) -> EpisodeArrays:
        _, traj = self._episode(episode_index)
        timestamp = np.arange(self.episode_length, dtype=np.float64) / self.fps
        return EpisodeArrays(traj.state.copy(), traj.action.copy(), timestamp, list(traj.text))

    def frames(self, episode_index: int, camera: str, frame_indices: Sequence[int]) -> np.ndarray:
        if camera != CAMERA:
            raise KeyError(f"synthetic: unknown camera '{camera}'; valid: {CAMERA}")
        scene, traj = self._episode(episode_index)
        out = np.empty((len(frame_indices), self.image_size, self.image_size, 3), np.uint8)
        for k, t in enumerate(frame_indices):
            if not 0 <= t < self.episode_length:
                raise IndexError(f"synthetic: frame {t} out of range in episode {episode_index}")
            out[k] = render(scene, traj.blocks[t], traj.state[t], self.image_size)
        return out
