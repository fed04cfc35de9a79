"""Shared fixtures: a tiny, fast version of the quickstart recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"

# Shrinks the quickstart to a few seconds on 2 cores while keeping every part in play. On CPU
# wherever the tests run: their exact comparisons hold for CPU kernels (the *_cuda tests add
# train.device=cuda after these).
TINY = [
    "train.device=cpu",
    "model.vision.kwargs.depth=1",
    "model.vision.kwargs.embed_dim=32",
    "model.vision.kwargs.num_heads=2",
    "model.vision.kwargs.patch_size=16",
    "model.language.config.hidden_size=32",
    "model.language.config.intermediate_size=64",
    "model.language.config.num_hidden_layers=1",
    "model.language.config.num_attention_heads=2",
    "model.language.config.num_key_value_heads=1",
    "model.action_head_hidden=32",
    "data.synthetic.episodes=6",
    "data.synthetic.episode_length=10",
    "data.val_ratio=0.34",
    "data.chunk=3",
    "train.batch_size=4",
    "train.steps=6",
    "train.val_every=3",
    "train.threads=1",
    "checkpoint.every=3",
    "logging.every=1",
    "logging.progress=none",
    "optim.warmup_steps=2",
]

# 4-bit LMs: bitsandbytes' AVX512 CPU kernels (>= 0.48) decode a row shorter than its 64-weight block
# wrongly (a 32-wide q_proj dequantised with 4x the NF4 rounding error), so the tiny LM of the 4-bit
# tests is 64 wide: real LMs' rows are multiples of 64.
WIDE_LM = ["model.language.config.hidden_size=64", "model.language.config.intermediate_size=128"]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield


@pytest.fixture
def tiny_overrides(tmp_path: Path) -> list[str]:
    return [*TINY, f"output_dir={tmp_path / 'run'}"]


def lerobot_with_a_null_narration(root: Path):
    """A 2-episode LeRobot dataset whose narration cell of episode 0, frame 1 is null (no text there),
    opened with ``text_key="narration"``: the source for round trips of a frame without text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from robot_data import SyntheticReader
    from robot_data.lerobot import LeRobotReader
    from robot_data.lerobot_writer import write_lerobot

    lerobot = write_lerobot(SyntheticReader(episodes=2, episode_length=4, image_size=16), root, video=False)
    data = next(lerobot.glob("data/**/*.parquet"))
    table = pq.read_table(data)
    cells = table["narration"].to_pylist()
    cells[1] = None  # episode 0, frame 1
    column = pa.array(cells, pa.string())
    pq.write_table(table.set_column(table.column_names.index("narration"), "narration", column), data)
    return LeRobotReader(lerobot, text_key="narration")
