"""Plots are valid PNG files holding the expected series, built from a hand-written metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from vla_ft import plots
from vla_ft.cli import main as cli

ROWS = [
    {"step": 1, "loss": 2.0, "loss/action": 1.0, "loss/gripper": 0.8, "metric/gripper_acc": 0.5, "lr/action_head": 0.1},
    {"step": 2, "loss": 1.6, "loss/action": 0.9, "loss/gripper": 0.6, "metric/gripper_acc": 0.6, "lr/action_head": 0.1},
    {
        "step": 2,
        "val/loss/action": 0.95,
        "val/action_l1": 0.4,
        "val/baseline_l1": 0.5,
        "val/gripper_acc": 0.55,
        "val/action_l1/dim0": 0.3,
        "val/action_l1/h0": 0.2,
    },
    {"step": 3, "loss": 1.4, "loss/action": 0.7, "loss/gripper": 0.5, "metric/gripper_acc": 0.7, "lr/action_head": 0.1},
    {"step": 4, "loss": 1.2, "loss/action": 0.6, "loss/gripper": 0.4, "metric/gripper_acc": 0.8, "lr/action_head": 0.1},
    {
        "step": 4,
        "val/loss/action": 0.7,
        "val/action_l1": 0.3,
        "val/baseline_l1": 0.5,
        "val/gripper_acc": 0.75,
        "val/action_l1/dim0": 0.25,
        "val/action_l1/h0": 0.1,
        "val/mix/hammer/action_l1": 0.35,  # mixture sources whose names start like a breakdown's
        "val/mix/dimsum/action_l1": 0.45,
    },
]


def _is_png(path: Path) -> bool:
    with Image.open(path) as img:
        img.verify()
        return img.format == "PNG" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _lines(ax) -> dict[str, tuple[list[float], list[float]]]:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def test_run_curves_each_term_train_and_val(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    figures = plots.plot_run(tmp_path)
    assert _is_png(tmp_path / "plots" / "losses.png") and _is_png(tmp_path / "plots" / "metrics.png")

    losses = {ax.get_title(): _lines(ax) for ax in figures["losses"].axes if ax.get_visible()}
    assert set(losses) == {"loss (weighted total)", "loss/action", "loss/gripper"}
    assert set(losses["loss (weighted total)"]) == {"train"}  # no validation total is logged
    assert losses["loss/action"] == {"train": ([1, 2, 3, 4], [1.0, 0.9, 0.7, 0.6]), "val": ([2, 4], [0.95, 0.7])}
    assert set(losses["loss/gripper"]) == {"train"}

    metrics = {ax.get_title(): _lines(ax) for ax in figures["metrics"].axes if ax.get_visible()}
    # breakdowns (/dim0, /h0) and LRs stay out; sources named hammer and dimsum stay in
    assert set(metrics) == {"gripper_acc", "action_l1", "mix/hammer/action_l1", "mix/dimsum/action_l1"}
    assert metrics["mix/hammer/action_l1"] == {"val": ([4], [0.35])}
    assert metrics["gripper_acc"]["val"] == ([2, 4], [0.55, 0.75])
    assert metrics["action_l1"] == {"val": ([2, 4], [0.4, 0.3]), "mean-action baseline": ([2, 4], [0.5, 0.5])}


def test_plot_command_writes_into_out(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert cli(["plot", str(tmp_path), "--out", str(tmp_path / "pics")]) == 0
    assert _is_png(tmp_path / "pics" / "losses.png") and "metrics.png" in capsys.readouterr().out
    assert cli(["plot", str(tmp_path / "nothing")]) == 2  # a clear error, no traceback


def test_ablation_overlay_and_bars(tmp_path):
    curves = {"a": ([2.0, 4.0], [0.5, 0.4]), "b": ([2.0, 4.0], [0.6, 0.3]), "c": ([2.0], [0.7])}
    fig = plots.plot_overlay(curves, "val/action_l1", tmp_path / "curves.png")
    (ax,) = [a for a in fig.axes if a.get_visible()]
    assert _lines(ax) == {k: (list(x), list(y)) for k, (x, y) in curves.items()}
    # the summary table's choice: b is lower but halted early, c failed without a value
    values = {"a": 0.4, "b": 0.3, "c": float("nan"), "d": 0.7}
    fig = plots.plot_bars(values, "best val/action_l1", "min", tmp_path / "bars.png", "a", ["b", "c"])
    (ax,) = fig.axes
    assert [p.get_height() for p in ax.patches] == [0.4, 0.3, 0.0, 0.7]
    colors = [p.get_facecolor() for p in ax.patches]
    assert colors[0] != colors[3] != colors[1] == colors[2]  # best, finished, not finished
    assert [bool(p.get_hatch()) for p in ax.patches] == [False, True, True, False]
    assert [t.get_text() for t in ax.texts] == ["0.4", "0.3 (b)", "no value (c)", "0.7"]
    assert _is_png(tmp_path / "curves.png") and _is_png(tmp_path / "bars.png")


def test_trajectories_one_subplot_per_episode_and_dim(tmp_path):
    frames = np.arange(5)
    episodes = {e: {"frames": frames, "pred": np.full((5, 3), float(e)), "true": np.ones((5, 3)) * -e} for e in (3, 8)}
    fig = plots.plot_trajectories(episodes, tmp_path / "t.png")
    axes = [a for a in fig.axes if a.get_visible()]
    assert len(axes) == 2 * 3 and all(len(a.get_lines()) == 2 for a in axes)
    assert axes[4].get_title() == "episode 8, dim 1"
    assert list(_lines(axes[4])["predicted"][1]) == [8.0] * 5
    assert _is_png(tmp_path / "t.png")


def _pixels_of(path: Path, hex_color: str, tolerance: int = 40) -> int:
    """How many pixels of the PNG at ``path`` are within ``tolerance`` of ``hex_color`` on each channel."""
    rgb = np.asarray(Image.open(path).convert("RGB"), np.int16)
    want = np.array([int(hex_color[i : i + 2], 16) for i in (1, 3, 5)], np.int16)
    return int((np.abs(rgb - want) <= tolerance).all(axis=-1).sum())


def test_the_overlay_png_holds_a_line_of_each_variants_colour(tmp_path):
    """The figure's Line2D objects say what was meant to be drawn; the saved file is what a reader
    sees: each variant's colour must be in its pixels (a long curve without markers included), and
    the pixel count tells a drawn colour from one not drawn (two variants leave the third unused)."""
    steps = [float(s) for s in range(1, 41)]
    curves = {"a": (steps, [1.0 / s for s in steps]), "b": ([2.0, 4.0], [0.9, 0.2])}
    plots.plot_overlay(curves, "val/action_l1", tmp_path / "two.png")
    blue, orange, green = "#1f77b4", "#ff7f0e", "#2ca02c"  # matplotlib's first three line colours
    assert _pixels_of(tmp_path / "two.png", blue) > 200 and _pixels_of(tmp_path / "two.png", orange) > 50
    plots.plot_overlay({"a": curves["a"]}, "val/action_l1", tmp_path / "one.png")
    assert _pixels_of(tmp_path / "one.png", orange) == 0 and _pixels_of(tmp_path / "two.png", green) == 0
