"""The sample format at the robot_data boundary, and the collate function.

Every reader (synthetic, LeRobot, HDF5) is wrapped by :class:`robot_data.dataset.RobotDataset`,
whose ``__getitem__`` returns one *sample*: a dict with exactly these keys.

=================  ========  ==================  ================================================
key                dtype     shape               meaning
=================  ========  ==================  ================================================
images             uint8     (n_cam, 3, H, W)    camera frames at time t, resized, augmented
                                                 (training only); uint8 until the GPU side
state              float32   (n_hist, S)         normalised robot state, frames t-n_hist+1 .. t
                                                 (clamped at the episode start)
actions            float32   (chunk, A)          actions t .. t+chunk-1, normalised except the
                                                 raw dims (grippers stay in dataset units);
                                                 delta dims are offsets from the state at t
action_mask        bool      (chunk,)            False for steps past the episode end (padded
                                                 by repeating the last action) or missing (NaN,
                                                 also in the state a delta is taken from)
prompt_ids         int64     (Lp,)               tokenised prompt (template + instruction)
target_ids         int64     (Lt,)               language target (narration / action tokens,
                                                 + eos); may be empty
episode_index      int64     ()                  episode id in the source dataset
frame_index        int64     ()                  frame id t inside the episode
index              int64     ()                  sample id inside this dataset (feature cache)
source             int64     ()                  the statistics the sample is normalised with:
                                                 its mixture source's index in the normaliser's
                                                 ``sources`` (per-source statistics), else 0
=================  ========  ==================  ================================================

:func:`collate` stacks samples into a batch: prompts are *left*-padded and targets
*right*-padded so that the action query tokens, placed between them, sit at the same
sequence position for the whole batch.
"""

from __future__ import annotations

from typing import Any

import torch

SAMPLE_KEYS = (
    "images",
    "state",
    "actions",
    "action_mask",
    "prompt_ids",
    "target_ids",
    "episode_index",
    "frame_index",
    "index",
    "source",
)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple if multiple > 1 else n


def collate(samples: list[dict[str, Any]], pad_id: int = 0, pad_to_multiple: int = 1) -> dict[str, torch.Tensor]:
    """Stack samples into a batch.

    Returns the stacked fixed-size keys plus
      prompt_ids (B, Lp) left-padded with ``pad_id``, prompt_mask (B, Lp) bool,
      target_ids (B, Lt) right-padded with ``pad_id``, target_mask (B, Lt) bool.
    ``pad_to_multiple`` rounds Lp and Lt up so compiled graphs see few shapes.
    """
    batch: dict[str, torch.Tensor] = {}
    for key in ("images", "state", "actions", "action_mask", "episode_index", "frame_index", "index", "source"):
        batch[key] = torch.stack([torch.as_tensor(s[key]) for s in samples])
    for key, left in (("prompt", True), ("target", False)):
        seqs = [torch.as_tensor(s[f"{key}_ids"], dtype=torch.long) for s in samples]
        width = _round_up(max(1, max(len(q) for q in seqs)), pad_to_multiple)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.bool)
        for row, q in enumerate(seqs):
            n = len(q)
            if n == 0:
                continue
            sl = slice(width - n, width) if left else slice(0, n)
            ids[row, sl] = q
            mask[row, sl] = True
        batch[f"{key}_ids"], batch[f"{key}_mask"] = ids, mask
    return batch
