"""``train.ema_decay``: the average follows the trained weights step by step (skipped steps left
out), leaves training untouched, is what validation measures, and is what inference loads."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_recipe
from train_helpers import metric_rows, poison, tiny_run, weights

from vla_ft import VLAPolicy
from vla_ft import checkpoint as ck
from vla_ft.config import RecipeError
from vla_ft.ema import EMA_FILE
from vla_ft.master_weights import optimized
from vla_ft.model_files import load_model
from vla_ft.run_setup import setup
from vla_ft.train import fit
from vla_ft.train import main as train

DECAY = 0.5  # large steps: an average one update behind would show
TIED = {"language_model.model.embed_tokens.weight": "language_model.lm_head.weight"}  # saved once, as the head


BF16 = ["train.precision=bf16", "train.param_dtype=bf16"]  # bf16 weights, fp32 masters in the optimizer
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@pytest.mark.parametrize(
    "setting",
    [
        ["optim.name=adamw"],  # the fused update, queued with the finite flag unread
        ["optim.name=sgd"],  # the plain step: the host reads the flag first
        ["optim.name=adamw", *BF16],  # the average of the fp32 masters
        pytest.param(["optim.name=adamw", "train.device=cuda", *BF16], marks=GPU),  # MasterAdamW's kernel
        ["train.ema_warmup=false"],  # ema_decay from the first update
    ],
    ids=["fused", "plain", "masters", "cuda", "no-warmup"],
)
def test_the_average_follows_the_saved_weights_step_by_step(tmp_path, setting):
    run = tiny_run(
        tmp_path / "run",
        *setting,
        f"train.ema_decay={DECAY}",
        "train.steps=5",
        "checkpoint.every=1",
        "checkpoint.keep_last=10",
    )
    # step 0: the initial weights (the fp32 masters where the model computes in bf16)
    average = {n: optimized(run.model, p).detach().double().cpu() for n, p in run.model.named_parameters()}
    poison(run, {2})  # the third attempt is skipped: 6 attempts for 5 updates
    fit(run)
    assert run.state.skipped == 1
    warmup = run.recipe.train.ema_warmup
    for step in range(1, 6):
        ckpt = tmp_path / "run" / "checkpoints" / ck.step_dir_name(step)
        trained, saved = weights(ckpt), load_file(str(ckpt / EMA_FILE))
        assert set(saved) == set(average) and {TIED.get(n, n) for n in saved} == set(trained)
        decay = min(DECAY, step / (9 + step)) if warmup else DECAY  # update step - 1: (1 + t) / (10 + t)
        for name in saved:
            average[name] += (1 - decay) * (trained[TIED.get(name, name)].double() - average[name])
            torch.testing.assert_close(saved[name].double(), average[name], rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict[str, Path]:
    """The same 6 steps with and without the average, validated at steps 3 and 6."""
    tmp = tmp_path_factory.mktemp("ema")
    torch.set_num_threads(1)
    runs = {}
    for name, extra in (("plain", []), ("ema", [f"train.ema_decay={DECAY}"])):
        train(tiny_recipe(tmp / name, *extra))
        runs[name] = tmp / name / "run"
    return runs


def _val(run: Path, step: int) -> dict[str, float]:
    return next(r for r in metric_rows(run) if r["step"] == step and "val/action_l1" in r)


def test_the_average_leaves_training_untouched(pair):
    """Validating with the average swapped in, then out, trains on bit for bit as without it."""
    for step in (3, 6):
        name = ck.step_dir_name(step)
        a, b = weights(pair["plain"] / "checkpoints" / name), weights(pair["ema"] / "checkpoints" / name)
        assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()
    plain = [r for r in metric_rows(pair["plain"]) if "loss" in r]
    ema = [r for r in metric_rows(pair["ema"]) if "loss" in r]
    assert [r["loss"] for r in plain] == [r["loss"] for r in ema]


def test_validation_measures_the_average_and_eval_loads_it(pair, tmp_path):
    from vla_ft.evaluate import evaluate_checkpoint

    ckpt = pair["ema"] / "checkpoints" / ck.step_dir_name(6)
    logged = _val(pair["ema"], 6)
    assert logged["val/action_l1"] != _val(pair["plain"], 6)["val/action_l1"]  # another model was measured
    evaluated = evaluate_checkpoint(ckpt, [], "val", tmp_path / "eval", plot_episodes=0)["metrics"]
    for key in ("action_l1", "action_mse", "gripper_acc"):
        assert evaluated[key] == pytest.approx(logged[f"val/{key}"], rel=1e-6)


def test_inference_loads_the_average_unless_asked_not_to(pair, tmp_path):
    from vla_ft.export import export_policy

    ckpt = pair["ema"] / "checkpoints" / ck.step_dir_name(6)
    averages, trained = load_file(str(ckpt / EMA_FILE)), weights(ckpt)
    name = "action_head.2.weight" if "action_head.2.weight" in averages else sorted(averages)[-1]
    policy = dict(VLAPolicy.from_pretrained(ckpt).model.named_parameters())
    raw = dict(VLAPolicy.from_pretrained(ckpt, ema=False).model.named_parameters())
    assert all(torch.equal(policy[n].detach(), a) for n, a in averages.items())
    assert torch.equal(raw[name].detach(), trained[name]) and not torch.equal(trained[name], averages[name])
    export_policy(ckpt, tmp_path / "export")
    exported, _ = load_model(tmp_path / "export")
    assert torch.equal(dict(exported.named_parameters())[name].detach(), averages[name])


def test_a_checkpoint_without_the_average_is_refused_on_resume(pair, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(pair["ema"], run_dir)
    latest = ck.latest_checkpoint(run_dir / "checkpoints")
    (latest / EMA_FILE).unlink()
    with pytest.raises(ck.CheckpointError, match=re.escape(f"{latest}: no {EMA_FILE}, though train.ema_decay")):
        tiny_run(run_dir, f"train.ema_decay={DECAY}", "train.resume=true", "train.steps=8")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.ema_decay=1.0"], "train.ema_decay: must be in [0, 1), got 1.0"),
        (["train.ema_decay=-0.1"], "train.ema_decay: must be in [0, 1), got -0.1"),
        (
            ["train.ema_decay=0.99", "distributed.strategy=fsdp"],
            "train.ema_decay: the weight average is kept and saved whole, not as FSDP shards; use ddp",
        ),
    ],
)
def test_decays_that_cannot_work_are_refused_on_load(tmp_path, overrides, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        tiny_recipe(tmp_path, *overrides)


def test_the_average_is_named_in_the_checkpoint_tree(pair):
    ckpt = pair["ema"] / "checkpoints" / ck.step_dir_name(6)
    meta = json.loads((ckpt / "trainer_state.json").read_text())
    assert meta["state"]["step"] == 6 and (ckpt / EMA_FILE).is_file()
    assert not (pair["plain"] / "checkpoints" / ck.step_dir_name(6) / EMA_FILE).exists()


def test_the_disk_estimate_of_a_save_counts_the_average(tmp_path):
    """A full disk is reported with the space a save needs: the average is part of it."""
    from vla_ft.run_state import checkpoint_bytes

    run = tiny_run(tmp_path / "run", f"train.ema_decay={DECAY}", "train.steps=1")
    fit(run)
    ckpt = ck.latest_checkpoint(tmp_path / "run" / "checkpoints")
    files = sum((ckpt / name).stat().st_size for name in ("model.safetensors", EMA_FILE, "optimizer.pt"))
    assert 0.9 * files <= checkpoint_bytes(run) <= 1.1 * files


def test_a_relaunch_of_a_finished_run_reports_the_average(pair, tmp_path):
    """Relaunched at its last step, the run has nothing to train: the values it returns (and
    prints) are the last validation's, of the average, not of the trained weights."""
    shutil.copytree(pair["ema"], tmp_path / "run")
    run = setup(tiny_recipe(tmp_path, f"train.ema_decay={DECAY}", "train.resume=true"))
    try:
        final = fit(run)
    finally:
        run.logger.close()
    assert final["val/action_l1"] == pytest.approx(_val(pair["ema"], 6)["val/action_l1"], rel=1e-6)
