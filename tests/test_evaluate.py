"""``vla-ft eval``: metrics of a fixed tiny checkpoint against a hand computation from the raw data.

The checkpoint's heads are overwritten so the policy predicts one known action everywhere (a
constant normalised action, gripper always closed); every expected number below is then computed
from the synthetic episodes' raw actions and the checkpoint's norm_stats.json with plain numpy.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import QUICKSTART, TINY
from safetensors.torch import load_file, save_file

from robot_data import Normalizer, PerSourceNormalizer, SyntheticReader, split_episodes
from vla_ft import train
from vla_ft.cli import main as cli
from vla_ft.config import GripperLossConfig, RecipeError, load_recipe, save_recipe
from vla_ft.evaluate import (
    check_compatible,
    eval_recipe,
    evaluate_checkpoint,
    keep_other_evaluation,
    read_report,
    select_episodes,
)
from vla_ft.metrics import ActionMetrics

HEAD_OUTPUT = np.array([0.5, -1.0, 0.3])  # normalised; dim 2 (gripper) is replaced by the gripper head
CHUNK, THRESHOLD = 3, 0.5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A 2-step tiny run whose heads are then fixed: constant action, gripper logit +2 (closed)."""
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    recipe = load_recipe(
        QUICKSTART,
        [
            *TINY,
            "train.steps=2",
            "train.val_every=2",
            "checkpoint.every=2",
            "logging.tensorboard=false",
            f"output_dir={run_dir}",
        ],
    )
    train.main(recipe)
    ckpt = run_dir / "checkpoints" / "step_000002"
    weights = load_file(str(ckpt / "model.safetensors"))
    for head, bias in (("action_head", HEAD_OUTPUT), ("gripper_head", [2.0])):
        weights[f"{head}.2.weight"].zero_()
        weights[f"{head}.2.bias"].copy_(weights[f"{head}.2.bias"].new_tensor(bias))
    save_file(weights, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    return ckpt


def expected_metrics(ckpt: Path, episodes: list[int]) -> dict[str, float]:
    """Every metric by hand from the raw actions: for each frame t and chunk step h, the target is the
    raw action at t + h, valid while t + h is inside the episode."""
    stats = json.loads((ckpt / "norm_stats.json").read_text())["stats"]["action"]
    mean, std, top = (np.array(stats[k], np.float64) for k in ("mean", "std", "max"))
    pred = HEAD_OUTPUT * std + mean  # mean_std de-normalisation of dims 0 and 1
    pred[2] = top[2]  # gripper closed -> the dataset's closed (max) value
    reader = SyntheticReader(episodes=6, episode_length=10, image_size=64, seed=0)
    err, base, by_h, grip, trans = [], [], {h: [] for h in range(CHUNK)}, [], []
    for e in episodes:
        actions = reader.numeric(e).action.astype(np.float64)
        length = len(actions)
        for t in range(length):
            for h in range(CHUNK):
                if t + h >= length:
                    continue
                true = actions[t + h]
                err.append(pred - true)
                base.append(mean - true)
                by_h[h].append(np.abs(pred - true)[:2].mean())
                grip.append(true[2] > THRESHOLD)
                if h > 0 and (actions[t + h - 1][2] > THRESHOLD) != (true[2] > THRESHOLD):
                    trans.append(true[2] > THRESHOLD)  # predicted closed: right iff it is closed now
    err, base, grip = np.array(err), np.array(base), np.array(grip)
    tp, fp = grip.sum(), (~grip).sum()
    out = {
        "action_l1": np.abs(err[:, :2]).mean(),
        "action_mse": np.square(err[:, :2]).mean(),
        "baseline_l1": np.abs(base[:, :2]).mean(),
        "gripper_acc": grip.mean(),
        "gripper_f1": 2 * tp / (2 * tp + fp),
        "gripper_transition_acc": np.mean(trans) if trans else np.nan,
    }
    for d in range(3):
        out[f"action_l1/dim{d}"] = np.abs(err[:, d]).mean()
        out[f"action_mse/dim{d}"] = np.square(err[:, d]).mean()
    out.update({f"action_l1/h{h}": np.mean(v) for h, v in by_h.items()})
    return out


def test_eval_metrics_match_a_hand_computation(checkpoint, tmp_path):
    result = evaluate_checkpoint(checkpoint, out=tmp_path / "eval", plot_episodes=2)
    _, held_out = split_episodes(range(6), 0.34, seed=0)
    assert result["episodes"] == held_out and result["samples"] == 10 * len(held_out) and result["step"] == 2

    expected = expected_metrics(checkpoint, held_out)
    assert 0 < expected["gripper_acc"] < 1 and expected["gripper_transition_acc"] == 1.0  # not degenerate
    got = result["metrics"]
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key

    # Token accuracy depends on the LM only (the heads were replaced): equal to training's validation.
    rows = [json.loads(line) for line in (checkpoint.parents[1] / "metrics.jsonl").read_text().splitlines()]
    assert got["token_acc"] == pytest.approx([r for r in rows if "val/token_acc" in r][-1]["val/token_acc"])

    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["metrics"]["action_l1"] == pytest.approx(expected["action_l1"], rel=1e-5)
    assert (tmp_path / "eval" / "trajectories.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    reader = SyntheticReader(episodes=6, episode_length=10, image_size=64, seed=0)
    first = held_out[0]
    traj = result["trajectories"][first]
    assert sorted(result["trajectories"]) == held_out[:2] and traj["frames"].tolist() == list(range(10))
    np.testing.assert_allclose(traj["true"], reader.numeric(first).action, rtol=1e-5, atol=1e-6)
    assert np.ptp(traj["pred"], axis=0).max() < 1e-5  # the constant policy


def _strict(text: str) -> object:
    """``text`` parsed as strict JSON: Python's NaN/Infinity/-Infinity tokens are refused."""

    def refuse(token: str) -> None:
        raise ValueError(f"not strict JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def test_an_infinite_metric_survives_evals_json_round_trip(checkpoint, tmp_path, monkeypatch):
    """A perplexity that overflowed is inf, not undefined: eval/metrics.json keeps +-inf apart from NaN
    (as metrics.jsonl does) in strict JSON, and read_report gives the metrics as they were computed."""
    compute = ActionMetrics.compute
    extreme = {"perplexity": math.inf, "action_l1/h9": -math.inf, "gripper_transition_acc": math.nan}
    monkeypatch.setattr(ActionMetrics, "compute", lambda self, prefix="": {**compute(self, prefix), **extreme})
    result = evaluate_checkpoint(checkpoint, out=tmp_path, plot_episodes=0)
    text = (tmp_path / "metrics.json").read_text()
    assert _strict(text)["metrics"]["perplexity"] == "Infinity"  # what a non-Python reader sees
    saved = read_report(tmp_path / "metrics.json")
    assert saved["metrics"].keys() == result["metrics"].keys()
    for key, value in result["metrics"].items():  # the in-memory report the file was written from
        assert saved["metrics"][key] == value or (math.isnan(value) and math.isnan(saved["metrics"][key])), key
    assert saved["metrics"]["perplexity"] == math.inf and saved["metrics"]["action_l1/h9"] == -math.inf
    assert {k: saved[k] for k in result if k not in ("metrics", "trajectories", "out")} == {
        k: v for k, v in result.items() if k not in ("metrics", "trajectories", "out")
    }


def test_an_eval_file_written_with_null_for_every_non_finite_metric_still_reads(checkpoint, tmp_path):
    """eval/metrics.json files written before the infinities were spelled out hold null for NaN and
    inf alike: they read as NaN (undefined), the other metrics as written, and the same evaluation
    run again still recognises the file as its own."""
    out = tmp_path / "eval"
    result = evaluate_checkpoint(checkpoint, out=out, plot_episodes=0)
    old = {k: v for k, v in result.items() if k not in ("trajectories", "out")}
    old["metrics"] = {**result["metrics"], "perplexity": math.inf, "gripper_transition_acc": math.nan}
    # the old writer, plainly: every non-finite float -> None
    old["metrics"] = {
        k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in old["metrics"].items()
    }
    (out / "metrics.json").write_text(json.dumps(old, indent=1))
    saved = read_report(out / "metrics.json")
    assert math.isnan(saved["metrics"]["perplexity"]) and math.isnan(saved["metrics"]["gripper_transition_acc"])
    finite = {k: v for k, v in old["metrics"].items() if v is not None}
    assert {k: saved["metrics"][k] for k in finite} == finite and saved["step"] == result["step"]
    keep_other_evaluation(out, [], "val")  # the same evaluation: may be rewritten
    with pytest.raises(RecipeError, match="holds another evaluation"):
        keep_other_evaluation(out, ["data.val_episodes=[1]"], "val")


@pytest.mark.parametrize("per_source", [False, True])
@pytest.mark.parametrize("closed_is_high", [True, False])
def test_action_metrics_match_a_loop_over_valid_steps(closed_is_high, per_source):
    """ActionMetrics on two batches against plain loops: de-normalised errors over valid steps only,
    a missing step inside a chunk (not only padding at its end), gripper F1 with misses (the eval
    policy above always predicts closed, so it never has one), transitions across a missing step
    left out. ``per_source``: rows of two mixture sources with their own statistics
    (``data.normalize_per_source``), each row de-normalised and given open/closed values with its own."""
    axes = [
        {"mean": [1.0, -2.0, 0.4], "std": [2.0, 0.5, 0.3], "min": [-5.0, -4.0, 0.0], "max": [6.0, 1.0, 1.0]},
        {"mean": [-3.0, 0.5, 20.0], "std": [0.2, 4.0, 10.0], "min": [-9.0, -8.0, 0.0], "max": [2.0, 9.0, 20.0]},
    ][: 2 if per_source else 1]
    if per_source:  # grippers 0/10 and 0/20, both across the threshold of 5
        axes[0]["max"][2] = 10.0
    norms = [Normalizer({"state": a, "action": a}, "mean_std", raw_action_dims=[2]) for a in axes]
    norm = PerSourceNormalizer({"left": norms[0], "right": norms[1]}) if per_source else norms[0]
    gripper = GripperLossConfig(dims=[2], threshold=0.5 if not per_source else 5.0, closed_is_high=closed_is_high)
    metrics = ActionMetrics(norm, 3, 4, [2], gripper, gripper_head=True)
    rng = np.random.default_rng(0)
    t, f = True, False  # step 1 of the first batch's second row is missing; the others are padding
    masks = [[[t, t, t, f], [t, f, t, t]], [[t, t, t, t], [t, t, f, f]]]
    sources = [[0, 1], [1, 1]] if per_source else [[0, 0], [0, 0]]
    errs, base, by_h, labels, preds, trans = [], [], {h: [] for h in range(4)}, [], [], []
    for mask, source in zip(masks, sources, strict=True):
        pred_norm = rng.normal(size=(2, 4, 3))
        logits = rng.normal(size=(2, 4, 1))
        target = rng.normal(size=(2, 4, 3))
        target[..., 2] = rng.choice([0.0, 1.0], size=(2, 4))  # raw gripper values
        if per_source:
            target[..., 2] *= np.where(np.array(source) == 1, 20.0, 10.0)[:, None]
        for b in range(2):
            mean, std, lo, hi = (np.array(axes[source[b]][k]) for k in ("mean", "std", "min", "max"))
            for c in range(4):
                if not mask[b][c]:
                    continue
                pred = pred_norm[b, c] * std + mean
                closed, opened = (hi[2], lo[2]) if closed_is_high else (lo[2], hi[2])
                pred[2] = closed if logits[b, c, 0] > 0 else opened  # the dataset's closed/open value
                true = target[b, c] * std + mean
                true[2] = target[b, c, 2]
                errs.append(pred - true)
                base.append(mean - true)
                by_h[c].append(np.abs(pred - true)[:2].mean())
                labels.append((true[2] > gripper.threshold) == closed_is_high)  # label 1 = closed
                preds.append((pred[2] > gripper.threshold) == closed_is_high)
                if c > 0 and mask[b][c - 1] and target[b, c - 1, 2] != target[b, c, 2]:
                    trans.append(preds[-1] == labels[-1])
        outputs = {"actions": torch.tensor(pred_norm), "gripper_logits": torch.tensor(logits)}
        batch = {"actions": torch.tensor(target), "action_mask": torch.tensor(mask), "source": torch.tensor(source)}
        metrics.update(outputs, batch)
    err, base, labels, preds = np.array(errs), np.array(base), np.array(labels), np.array(preds)
    tp, fp, fn = (preds & labels).sum(), (preds & ~labels).sum(), (~preds & labels).sum()
    assert fn > 0 and fp > 0 and len(trans) > 0  # not degenerate
    expected = {
        "action_l1": np.abs(err[:, :2]).mean(),
        "action_mse": np.square(err[:, :2]).mean(),
        "baseline_l1": np.abs(base[:, :2]).mean(),
        "gripper_acc": (preds == labels).mean(),
        "gripper_f1": 2 * tp / (2 * tp + fp + fn),
        "gripper_transition_acc": np.mean(trans),
        **{f"action_l1/dim{d}": np.abs(err[:, d]).mean() for d in range(3)},
        **{f"action_mse/dim{d}": np.square(err[:, d]).mean() for d in range(3)},
        **{f"action_l1/h{h}": np.mean(v) for h, v in by_h.items()},
    }
    got = metrics.compute("")
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-6), key


def _gripper_only_metrics() -> ActionMetrics:
    """One regressed dim and gripper dim 1 (raw 0 = open, 1 = closed, threshold 0.5)."""
    stats = {"mean": [0.0, 0.5], "std": [1.0, 0.5], "min": [-1.0, 0.0], "max": [1.0, 1.0]}
    norm = Normalizer({"state": stats, "action": stats}, "mean_std", raw_action_dims=[1])
    return ActionMetrics(norm, 2, 4, [1], GripperLossConfig(dims=[1], threshold=0.5), gripper_head=True)


def test_a_nan_gripper_prediction_is_counted_and_not_scored_as_open_or_closed():
    """A NaN logit is no open command: it used to count as 'open' (NaN > 0 is false), a right
    answer wherever the gripper was open. Here the scored steps are the non-NaN ones only."""
    metrics = _gripper_only_metrics()
    nan = float("nan")
    logits = torch.tensor([[[2.0], [nan], [-1.0], [nan]], [[-3.0], [1.0], [nan], [4.0]]])
    closed = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])  # raw gripper targets
    mask = torch.tensor([[True, True, True, True], [True, True, True, False]])
    batch = {"actions": torch.stack([torch.zeros(2, 4), closed], -1), "action_mask": mask, "source": torch.zeros(2)}
    metrics.update({"actions": torch.zeros(2, 4, 2), "gripper_logits": logits}, batch)
    got = metrics.compute("val/")
    # Valid, non-NaN steps as (predicted closed, truly closed): row 0 steps 0, 2; row 1 steps 0, 1.
    scored = [(True, False), (False, True), (False, False), (True, False)]
    correct = sum(p == t for p, t in scored)
    tp = sum(p and t for p, t in scored)
    fp = sum(p and not t for p, t in scored)
    fn = sum(t and not p for p, t in scored)
    assert got["val/gripper_acc"] == pytest.approx(correct / len(scored))  # 1/4; NaN-as-open gave 2/7
    assert got["val/gripper_f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert got["val/gripper_nan"] == 3  # row 0 steps 1 and 3, row 1 step 2 (step 3 is padding)
    # Transitions (label 0 -> 1 at step 2 of both rows): row 0 predicts open there (wrong), row 1 NaN (left out).
    assert got["val/gripper_transition_acc"] == 0.0

    all_nan = _gripper_only_metrics()
    all_nan.update({"actions": torch.zeros(2, 4, 2), "gripper_logits": torch.full((2, 4, 1), nan)}, batch)
    got = all_nan.compute("val/")
    assert got["val/gripper_nan"] == 7
    assert all(np.isnan(got[f"val/gripper_{k}"]) for k in ("acc", "f1", "transition_acc"))  # not 1.0, not 0.0


def _language_batches() -> list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """Two batches of LM logits at supervised positions, with 5 and 2 real tokens (-100 ignored)."""
    g = torch.Generator().manual_seed(3)
    out = []
    for labels in ([4, 0, -100, 2, 6, 1], [-100, 3, 5, -100]):
        logits = torch.randn(len(labels), 7, generator=g) * 3
        outputs = {"actions": torch.zeros(1, 4, 2), "lm_logits": logits, "lm_labels": torch.tensor(labels)}
        batch = {"actions": torch.zeros(1, 4, 2), "action_mask": torch.ones(1, 4, dtype=torch.bool)}
        out.append((outputs, {**batch, "source": torch.zeros(1)}))
    return out


def _reference_perplexity(batches) -> float:
    """exp of the mean over every supervised token of -log softmax(logits)[label], written plainly."""
    nll = []
    for outputs, _ in batches:
        for row, label in zip(outputs["lm_logits"].double().tolist(), outputs["lm_labels"].tolist(), strict=True):
            if label != -100:
                nll.append(math.log(sum(math.exp(v) for v in row)) - row[label])
    assert len(nll) == 7
    return math.exp(sum(nll) / len(nll))


def test_validation_perplexity_is_exp_of_the_token_weighted_cross_entropy():
    """Token-weighted over batches (a mean of per-batch perplexities would weigh 2 tokens like 5)."""
    batches = _language_batches()
    metrics = _gripper_only_metrics()
    for outputs, batch in batches:
        metrics.update(outputs, batch)
    assert metrics.compute("val/")["val/perplexity"] == pytest.approx(_reference_perplexity(batches), rel=1e-6)


def test_a_horizon_step_never_measured_is_nan_not_a_perfect_zero():
    """Chunk steps without a valid sample (chunks always cut short by the episode end, an all-padding
    batch) are undefined, as the headline metrics are, never 0.0 (a best_metric would pick them)."""
    stats = {"mean": [0.0, 0.0], "std": [1.0, 1.0], "min": [-1.0, -1.0], "max": [1.0, 1.0]}
    norm = Normalizer({"state": stats, "action": stats}, "mean_std")
    gripper = GripperLossConfig(dims=[], threshold=0.5, closed_is_high=True)
    for mask, measured in (([[True, True, False]], [True, True, False]), ([[False, False, False]], [False] * 3)):
        metrics = ActionMetrics(norm, 2, 3, [], gripper, gripper_head=False)
        outputs = {"actions": torch.ones(1, 3, 2)}
        metrics.update(
            outputs, {"actions": torch.zeros(1, 3, 2), "action_mask": torch.tensor(mask), "source": torch.zeros(1)}
        )
        got = metrics.compute("")
        assert [not np.isnan(got[f"action_l1/h{h}"]) for h in range(3)] == measured
        assert all(got[f"action_l1/h{h}"] == 1.0 for h in range(3) if measured[h])


def test_eval_cli_with_data_overrides_and_refusals(checkpoint, tmp_path, capsys):
    assert cli(["eval", str(checkpoint.parents[1]), "data.val_episodes=[0,1]", "--out", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "2 episodes, 20 samples" in out and "gripper_acc" in out and "horizon" in out
    assert "warning: episode(s) [0, 1] of this validation set trained the checkpoint" in err
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["episodes"] == [0, 1] and saved["overrides"] == ["data.val_episodes=[0,1]"]
    assert saved["trained_episodes"] == [0, 1]  # the checkpoint held out 2 and 3
    assert saved["metrics"]["action_l1"] == pytest.approx(expected_metrics(checkpoint, [0, 1])["action_l1"], rel=1e-5)

    assert cli(["eval", str(checkpoint), "model.lora.enabled=true"]) == 2
    assert "refused model.lora.enabled: the checkpoint fixes it" in capsys.readouterr().err
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    assert cli(["eval", str(checkpoint), "--out", str(notes / "eval")]) == 2  # was a bare "[Errno 20] Not a directory"
    assert f"--out: {notes} is a file, not a directory; choose another --out" in capsys.readouterr().err
    assert notes.read_text() == "keep me"


def test_eval_plot_episodes_is_a_count(tmp_path, capsys):
    """--plot-episodes -1 was accepted (and plotted all but the last episode)."""
    with pytest.raises(SystemExit) as info:
        cli(["eval", str(tmp_path), "--plot-episodes", "-1"])
    assert info.value.code == 2 and "argument --plot-episodes: must be an integer >= 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="plot_episodes: a count of episodes, >= 0, got -1"):  # from Python too
        evaluate_checkpoint(tmp_path, plot_episodes=-1)


def test_eval_refuses_a_data_path_the_synthetic_format_would_ignore(checkpoint, tmp_path, capsys):
    """``vla-ft eval CKPT data.path=/data/other`` of a synthetic-task checkpoint evaluated the
    synthetic task again, and printed its metrics as those of the other data."""
    assert cli(["eval", str(checkpoint), f"data.path={tmp_path / 'other'}", "--out", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err
    assert "data.path: " in err and "is not read with data.format=synthetic" in err and "Traceback" not in err
    assert not (tmp_path / "eval" / "metrics.json").exists()


@pytest.mark.parametrize(
    ("override", "why"),
    [
        ("data.normalize=min_max", "data.normalize: the checkpoint's norm_stats.json sets the normalisation"),
        ("data.delta_action_dims=[0]", "data.delta_action_dims: the checkpoint's norm_stats.json sets which"),
        ("data.prompt_template={instruction}", "data.prompt_template: the model was trained on the checkpoint's"),
        ("data.language_target=none", "data.language_target: token accuracy is measured on the target"),
        ("data.chunk=1", "data.chunk: the model predicts the chunk it was trained with"),
        ("data.augment.enabled=true", "data.augment.enabled: evaluation never augments images"),
        ("data.pth=/data", "data.pth: not a recipe key (did you mean 'data.path'?)"),
        ("data.promt_template=x", "data.promt_template: not a recipe key (did you mean 'data.prompt_template'?)"),
    ],
)
def test_eval_refuses_overrides_that_change_what_is_measured(checkpoint, capsys, override, why):
    """Only where the data is, which episodes and how to run may change: the rest would be
    ignored (normalisation comes from norm_stats.json) or measure another thing (the prompt)."""
    assert cli(["eval", str(checkpoint), "data.val_episodes=[0]", override]) == 2
    err = capsys.readouterr().err
    assert "eval overrides may change where the data is" in err and f"refused {why}" in err
    assert "data.val_episodes" not in err.split("refused", 1)[1]  # allowed, so not listed as refused


def test_eval_of_an_export(checkpoint, tmp_path, capsys):
    """An export carries the recipe eval reads; its metrics are the checkpoint's (same weights)."""
    from vla_ft.export import export_policy

    _, held_out = split_episodes(range(6), 0.34, seed=0)
    expected = expected_metrics(checkpoint, held_out)
    export = export_policy(checkpoint, tmp_path / "export")
    result = evaluate_checkpoint(export, out=tmp_path / "eval-export")
    assert result["checkpoint"] == str(export) and result["step"] is None and result["episodes"] == held_out
    for key, value in expected.items():
        assert result["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert cli(["eval", str(export), "data.val_episodes=[0,1]"]) == 0
    out = capsys.readouterr().out
    assert "2 episodes, 20 samples" in out
    assert f"checkpoint {export} (an export: trained step not recorded)" in out  # it said "(step None)"


def test_cameras_must_keep_the_checkpoints_order():
    meta = {"state_dim": 3, "action_dim": 7, "cameras": ["top", "wrist"], "chunk": 4, "history": 1}
    check_compatible(meta, 3, 7, ["top", "wrist"], 4, 1)
    check_compatible(meta, 3, 7, ["cam_high", "cam_wrist"], 4, 1)  # another dataset's names: by position
    with pytest.raises(RecipeError, match=r"data.cameras: \['wrist', 'top'\], the checkpoint was trained on"):
        check_compatible(meta, 3, 7, ["wrist", "top"], 4, 1)


def test_episode_selection():
    assert select_episodes("val", [0, 2, 3], [1, 4]) == [1, 4]
    assert select_episodes("all", [0, 2, 3], [1, 4]) == [0, 1, 2, 3, 4]
    assert select_episodes("4,0", [0, 2, 3], [1, 4]) == [0, 4]
    # --episodes comes from the command line: its errors say so (they said "recipe:")
    with pytest.raises(RecipeError, match=r"^command line: --episodes: unknown episode"):
        select_episodes("9", [0], [1])
    with pytest.raises(RecipeError, match=r"^command line: --episodes val: the recipe holds out no episodes"):
        select_episodes("val", [0, 1], [])
    with pytest.raises(RecipeError, match=r"^command line: --episodes: expected val, all or comma-separated ids"):
        select_episodes("x", [0, 1], [])


def test_eval_of_the_best_checkpoint(checkpoint, tmp_path):
    assert (checkpoint.parent / "best").read_text() == checkpoint.name  # written by the run
    assert cli(["eval", str(checkpoint.parent / "best"), "--out", str(tmp_path / "best")]) == 0
    saved = json.loads((tmp_path / "best" / "metrics.json").read_text())
    assert saved["checkpoint"] == str(checkpoint) and saved["step"] == 2


def test_eval_refuses_an_incomplete_or_damaged_checkpoint(checkpoint, tmp_path, capsys):
    copy = Path(shutil.copytree(checkpoint, tmp_path / "run" / "checkpoints" / "step_000002"))
    stats = json.loads((copy / "norm_stats.json").read_text())
    del stats["stats"]
    (copy / "norm_stats.json").write_text(json.dumps(stats))
    assert cli(["eval", str(copy)]) == 2
    err = capsys.readouterr().err
    assert f"{copy}/norm_stats.json: unreadable (KeyError: 'stats')" in err and "damaged or incomplete" in err
    (copy / "COMPLETE").unlink()
    assert cli(["eval", str(copy)]) == 2
    assert f"{copy} is an incomplete checkpoint" in capsys.readouterr().err


# Recipe sections a checkpoint may have trained with before a training-only rule refused them: each
# breaks one rule about how the run trains (train.steps is 2), none changes what eval reads.
TRAINED_BEFORE_A_RULE = {
    "a ramp that never moves, an unfreeze past the run, early stopping without validations": {
        "loss": {
            "strategy": "scheduled",
            "schedule": {
                "gripper": {"start_step": 50, "end_step": 100, "start": 0.0, "end": 1.0},
                "action": {"start_step": -3, "end_step": 100, "start": 1.0, "end": 1.0},
            },
        },
        "freeze": {"vision_encoder": True},
        "unfreeze": {"vision_encoder": {"at_step": 50, "warmup_steps": 10}},
        "train": {"early_stopping": {"patience": 5}},
    },
    "no loss term ever computed": {
        "loss": {
            "strategy": "scheduled",
            "schedule": {"action": {"start_step": 0, "end_step": 10, "start": 0.0, "end": 0.0}},
            "weights": {"gripper": 0.0, "language": 0.0},
        }
    },
}


def _merge(raw: dict, edits: dict) -> None:
    for key, value in edits.items():
        if isinstance(value, dict) and key != "schedule" and isinstance(raw.get(key), dict):
            _merge(raw[key], value)
        else:
            raw[key] = value


@pytest.mark.parametrize("edits", TRAINED_BEFORE_A_RULE.values(), ids=TRAINED_BEFORE_A_RULE.keys())
def test_eval_reads_a_checkpoint_whose_recipe_breaks_a_training_rule_added_since(checkpoint, tmp_path, edits):
    """Eval re-validates the checkpoint's config.yaml: a checkpoint trained before a rule about how
    training runs (a ramp that never moves, no loss term, an unfreeze past train.steps, ...) could no
    longer be evaluated. Its metrics are the hand computation's, as for the unedited checkpoint; the
    overrides are judged in full as before."""
    import yaml

    from vla_ft.config.loader import RecipeDumper, read_yaml

    old = Path(
        shutil.copytree(checkpoint, tmp_path / "run" / "checkpoints" / "step_000002", ignore=lambda *_: ["eval"])
    )
    raw = read_yaml(old / "config.yaml")
    _merge(raw, edits)
    (old / "config.yaml").write_text(yaml.dump(raw, Dumper=RecipeDumper, sort_keys=False))
    with pytest.raises(RecipeError):  # the edit does break a rule: training this recipe is refused
        load_recipe(old / "config.yaml")

    result = evaluate_checkpoint(old, out=tmp_path / "eval", plot_episodes=0)
    _, held_out = split_episodes(range(6), 0.34, seed=0)
    assert result["episodes"] == held_out
    for key, value in expected_metrics(checkpoint, held_out).items():
        assert result["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert eval_recipe(old, ["data.val_ratio=0"]).data.val_ratio == 0  # --episodes all: no split needed
    with pytest.raises(RecipeError, match=re.escape("data.val_ratio: must be in [0, 1), got 1.5")):
        eval_recipe(old, ["data.val_ratio=1.5"])
    with pytest.raises(RecipeError, match="refused loss.strategy: the checkpoint fixes it"):
        eval_recipe(old, ["loss.strategy=static"])


def test_eval_keeps_an_evaluation_of_other_data_in_the_default_directory(checkpoint, capsys):
    """CHECKPOINT/eval is rewritten by the same evaluation, never by one of other episodes or data."""
    shutil.rmtree(checkpoint / "eval", ignore_errors=True)  # what other tests evaluated
    out = checkpoint / "eval" / "metrics.json"
    assert cli(["eval", str(checkpoint), "data.val_episodes=[0]"]) == 0
    first = out.read_text()
    assert cli(["eval", str(checkpoint), "data.val_episodes=[0]"]) == 0  # the same again: rewritten
    assert cli(["eval", str(checkpoint), "data.val_episodes=[1]"]) == 2
    err = capsys.readouterr().err
    assert f"--out: {checkpoint / 'eval'} holds another evaluation (overrides ['data.val_episodes=[0]']" in err
    assert "pass --out DIR to keep both" in err
    assert cli(["eval", str(checkpoint), "data.val_episodes=[0]", "--episodes", "all"]) == 2
    assert out.read_text() == first
    shutil.rmtree(checkpoint / "eval")


def test_eval_reports_token_accuracy_only_for_a_run_that_trained_language(tmp_path):
    """Language weight 0: validation logged no token accuracy, and neither does eval."""
    run_dir = tmp_path / "run"
    overrides = [*TINY, "loss.weights.language=0", "train.steps=2", "train.val_every=2", "checkpoint.every=2"]
    train.main(load_recipe(QUICKSTART, [*overrides, "logging.tensorboard=false", f"output_dir={run_dir}"]))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("val/action_l1" in r for r in rows) and not any("val/token_acc" in r for r in rows)
    got = evaluate_checkpoint(run_dir, out=tmp_path / "eval", plot_episodes=0)["metrics"]
    assert "action_l1" in got and "token_acc" not in got


def test_eval_on_another_format_drops_the_trained_formats_own_keys(tmp_path):
    """An RLDS run (data.fps required) evaluated on its LeRobot copy, or a feature-cache run (a cache
    directory without the cache, in eval): validation refused the saved keys as unread, and eval may
    not override data.fps or train.feature_cache_dir."""
    rlds = ["data.format=rlds", "data.path=x", "data.fps=10", "data.text_key=narration"]
    save_recipe(load_recipe(QUICKSTART, rlds), tmp_path / "config.yaml")
    data = eval_recipe(tmp_path, ["data.format=lerobot", "data.path=y"]).data
    assert (data.format, data.fps) == ("lerobot", None)
    assert eval_recipe(tmp_path, ["data.path=z"]).data.fps == 10  # the same format: kept
    trunk = ("vision_encoder", "projector", "proprio_encoder", "language_model", "action_queries")
    cached = ["train.cache_features=true", "train.feature_cache_dir=cache", "loss.weights.language=0"]
    save_recipe(load_recipe(QUICKSTART, [*cached, *(f"freeze.{m}=true" for m in trunk)]), tmp_path / "config.yaml")
    assert eval_recipe(tmp_path, []).train.feature_cache_dir is None


def test_eval_on_a_format_that_needs_data_fps_takes_it_or_names_it(tmp_path):
    """A LeRobot run (its dataset records its fps) evaluated on an RLDS copy: RLDS needs data.fps,
    and eval refused the override ("the checkpoint fixes it"), so no cross-format eval could run.
    Without data.fps the error names the key; another format's saved rate is never carried over
    (an RLDS run's data.fps evaluated on HDF5 files overrode the files' own rate)."""
    lerobot = ["data.format=lerobot", "data.path=x", "data.text_key=narration"]
    save_recipe(load_recipe(QUICKSTART, lerobot), tmp_path / "config.yaml")
    rlds = ["data.format=rlds", "data.path=y"]
    assert eval_recipe(tmp_path, [*rlds, "data.fps=20"]).data.fps == 20
    with pytest.raises(RecipeError, match=r"data\.fps: required to evaluate on data\.format=rlds .*add data\.fps="):
        eval_recipe(tmp_path, rlds)
    with pytest.raises(RecipeError, match=r"data\.fps: data\.format=lerobot never reads it"):
        eval_recipe(tmp_path, ["data.path=z", "data.fps=20"])  # the same format: still refused as unread
    rlds_run = ["data.format=rlds", "data.path=x", "data.fps=10", "data.text_key=narration"]
    save_recipe(load_recipe(QUICKSTART, rlds_run), tmp_path / "config.yaml")
    assert eval_recipe(tmp_path, ["data.format=hdf5", "data.path=y"]).data.fps is None  # the files' own rate
    assert eval_recipe(tmp_path, ["data.path=z", "data.fps=5"]).data.fps == 5  # another RLDS dataset's rate


@pytest.fixture(scope="module")
def lerobot_run(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(LeRobot dataset, its RLDS copy, a run trained 2 steps on the LeRobot one)."""
    from robot_data.lerobot_writer import write_lerobot
    from robot_data.rlds_writer import write_rlds

    root = tmp_path_factory.mktemp("lerobot_run")
    source = SyntheticReader(episodes=6, episode_length=10, image_size=32, seed=0)
    lerobot = write_lerobot(source, root / "lerobot", video=False)
    rlds = write_rlds(source, root / "rlds" / "1.0.0")
    run_dir = root / "run"
    data = ["data.format=lerobot", f"data.path={lerobot}", "data.text_key=narration"]
    train.main(load_recipe(QUICKSTART, [*TINY, *data, "train.steps=2", "checkpoint.every=2", f"output_dir={run_dir}"]))
    return Path(lerobot), Path(rlds), run_dir


def test_a_lerobot_checkpoint_evaluated_on_its_rlds_copy_scores_the_same(lerobot_run, tmp_path, capsys):
    """The same episodes in two formats are the same samples: the metrics of the RLDS copy (given
    data.fps) equal those of the LeRobot dataset the checkpoint trained on, number for number."""
    _, rlds, run_dir = lerobot_run
    on_lerobot = evaluate_checkpoint(run_dir, out=tmp_path / "eval-lerobot", plot_episodes=0)
    other = ["data.format=rlds", f"data.path={rlds}"]
    assert cli(["eval", str(run_dir), *other, "--out", str(tmp_path / "eval-rlds")]) == 2
    err = capsys.readouterr().err
    assert "data.fps: required to evaluate on data.format=rlds" in err and "Traceback" not in err, err
    on_rlds = evaluate_checkpoint(run_dir, [*other, "data.fps=10"], out=tmp_path / "eval-rlds", plot_episodes=0)
    assert on_rlds["episodes"] == on_lerobot["episodes"] and on_rlds["samples"] == on_lerobot["samples"]
    assert on_rlds["metrics"].keys() == on_lerobot["metrics"].keys()
    for key, value in on_lerobot["metrics"].items():
        assert on_rlds["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-7, nan_ok=True), key


def test_eval_at_another_control_rate_than_trained_is_refused_unless_allowed(lerobot_run, tmp_path, capsys):
    """A checkpoint did not record its data's rate: evaluated on a copy read at another fps, each
    predicted chunk (chunk / fps seconds) was scored against frames of another time, silently.
    model_meta.json now holds the rate of the data trained on (here the LeRobot dataset's own,
    meta/info.json); eval refuses another one naming data.fps and both rates, unless
    --allow-fps-mismatch; a checkpoint written before the rate was recorded is evaluated as before."""
    lerobot, rlds, trained_run = lerobot_run
    run_dir = shutil.copytree(trained_run, tmp_path / "run")  # its model_meta.json is edited below
    trained = json.loads((lerobot / "meta" / "info.json").read_text())["fps"]
    meta_path = run_dir / "checkpoints" / "step_000002" / "model_meta.json"
    meta = json.loads(meta_path.read_text())
    assert meta["fps"] == trained
    other = trained * 2
    argv = ["eval", str(run_dir), "data.format=rlds", f"data.path={rlds}", "--out", str(tmp_path / "eval")]
    assert cli([*argv, f"data.fps={trained:g}"]) == 0  # the trained rate: evaluated
    capsys.readouterr()
    assert cli([*argv, f"data.fps={other:g}"]) == 2
    err = capsys.readouterr().err
    assert "data.fps:" in err and f"{other:g} Hz" in err and f"{trained:g} Hz" in err and "--allow-fps-mismatch" in err
    assert "Traceback" not in err, err
    with pytest.warns(UserWarning, match=r"^data.fps: .*evaluating anyway \(--allow-fps-mismatch\)") as caught:
        assert cli([*argv, f"data.fps={other:g}", "--allow-fps-mismatch"]) == 0
    from vla_ft.cli import plain_warnings  # as the CLI prints it: one line, like its errors

    with plain_warnings("eval"):
        w = caught[0]
        assert warnings.formatwarning(w.message, w.category, w.filename, w.lineno).startswith(
            "vla-ft eval: warning: data.fps:"
        )
    # An HDF5 file that records no rate is read at its layout's usual one (robomimic: 20 Hz), a guess
    # that is no ground for a refusal; the same file with its fps attribute is judged by it.
    import h5py

    from robot_data.hdf5_writer import write_robomimic

    faster = SyntheticReader(episodes=6, episode_length=10, image_size=32, seed=0)
    faster.fps = other
    hdf5 = write_robomimic(faster, tmp_path / "r.hdf5")
    on_hdf5 = ["eval", str(run_dir), "data.format=hdf5", f"data.path={hdf5}", "data.state_key=state"]
    assert cli([*on_hdf5, "--out", str(tmp_path / "eval_h1")]) == 2
    assert f"runs at {other:g} Hz" in capsys.readouterr().err
    with h5py.File(hdf5, "a") as f:
        del f["data"].attrs["fps"]
    assert cli([*on_hdf5, "--out", str(tmp_path / "eval_h2")]) == 0
    assert "data.fps" not in capsys.readouterr().err
    del meta["fps"]  # a checkpoint written before the rate was recorded
    meta_path.write_text(json.dumps(meta))
    assert cli([*argv, f"data.fps={other:g}"]) == 0
    assert "data.fps" not in capsys.readouterr().err
