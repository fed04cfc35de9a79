"""Can the quickstart's vision encoder, trained from random init, locate things? A probe per position init.

    python benchmarks/vision_grounding.py                      # 600 steps per row, 1.5-2 min per row on 2 cores
    python benchmarks/vision_grounding.py --steps 20 --episodes 20

The encoder is the one ``recipes/quickstart.yaml`` builds (``vla_ft.backbones.create_backbone``: a 3-block
ViT, 8x8 patches of a 64x64 frame), trained end to end with one attention read-out over its patch tokens
and a linear layer that regresses an (x, y) in [0, 1]:

- ``arm``: the end effector, read by one learned query;
- ``named block``: the block the instruction names, read by a query embedded from the instruction's
  colour (the colour-conditioned retrieval a policy does before it can reach).

Rows differ only in ``model.vision.position_init``. Frames of the first 90% of episodes train, the
rest are held out; the table gives held-out L1 at each report step and the mean-position baseline.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from robot_data import SyntheticReader
from robot_data.synthetic import COLOUR_NAMES, make_scene, rollout
from vla_ft.backbones import create_backbone
from vla_ft.config import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def probe_data(episodes: int, length: int, size: int) -> dict[str, torch.Tensor]:
    """frames (N, 3, size, size) in [-1, 1]; arm, block (N, 2) xy; colour (N,) index of the named colour."""
    reader = SyntheticReader(episodes=episodes, episode_length=length, image_size=size)
    frames, arm, block, colour = [], [], [], []
    for e in range(episodes):
        scene = make_scene(reader.seed, e)
        traj = rollout(scene, length)
        frames.append(reader.frames(e, reader.cameras[0], range(length)))
        arm.append(traj.state[:, :2])
        block.append(traj.blocks[:, scene.target])
        colour.append(np.full(length, COLOUR_NAMES.index(scene.colours[scene.target])))
    pixels = torch.from_numpy(np.concatenate(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1
    arrays = {"arm": arm, "block": block, "colour": colour}
    return {"frames": pixels} | {k: torch.from_numpy(np.concatenate(v)) for k, v in arrays.items()}


class Probe(nn.Module):
    """Encoder + one attention read-out: a (B, 3, H, W) frame and a (B,) query index -> (B, 2) xy."""

    def __init__(self, encoder: nn.Module, n_queries: int):
        super().__init__()
        self.encoder = encoder
        width = encoder.num_features
        self.queries = nn.Embedding(n_queries, width)
        self.read = nn.MultiheadAttention(width, num_heads=3, batch_first=True)
        self.out = nn.Linear(width, 2)

    def forward(self, frames: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder.forward_features(frames)[:, self.encoder.num_prefix_tokens :]  # (B, h * w, D)
        read, _ = self.read(self.queries(query)[:, None], tokens, tokens)
        return self.out(read[:, 0])


def run_row(position_init: str, target: str, data: dict, steps: int, report: list[int], seed: int) -> list[float]:
    """Train one probe; held-out L1 at each report step."""
    torch.manual_seed(seed)
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", [f"model.vision.position_init={position_init}"])
    probe = Probe(create_backbone(recipe.model), n_queries=len(COLOUR_NAMES))
    opt = torch.optim.AdamW(probe.parameters(), lr=1e-3, weight_decay=0.01)
    y = data[target]
    query = data["colour"] if target == "block" else torch.zeros_like(data["colour"])
    n_train = int(0.9 * len(y))
    held = slice(n_train, None)
    gen = torch.Generator().manual_seed(seed)
    errors = []
    for step in range(1, steps + 1):
        idx = torch.randint(0, n_train, (64,), generator=gen)
        loss = (probe(data["frames"][idx], query[idx]) - y[idx]).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step in report:
            with torch.no_grad():
                errors.append((probe(data["frames"][held], query[held]) - y[held]).abs().mean().item())
    return errors


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = probe_data(args.episodes, length=32, size=64)
    n_train = int(0.9 * len(data["arm"]))
    report = sorted({max(1, args.steps // 3), max(1, 2 * args.steps // 3), args.steps})
    print(f"{len(data['arm'])} frames ({n_train} train), batch 64, AdamW lr 1e-3; held-out L1 at steps {report}")
    print(f"| target | position_init | {' | '.join(f'step {s}' for s in report)} | baseline | s |")
    print("|---|---|" + "---|" * (len(report) + 2))
    rows = []
    for target in ("arm", "block"):
        y = data[target]
        baseline = (y[n_train:] - y[:n_train].mean(0)).abs().mean().item()
        for init in ("sincos", "timm"):
            t0 = time.perf_counter()
            errors = run_row(init, target, data, args.steps, report, args.seed)
            rows.append({"target": target, "position_init": init, "errors": errors, "baseline": baseline})
            cells = " | ".join(f"{e:.4f}" for e in errors)
            name = "named block" if target == "block" else "arm"
            print(f"| {name} | {init} | {cells} | {baseline:.4f} | {time.perf_counter() - t0:.0f} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
