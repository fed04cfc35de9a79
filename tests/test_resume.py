"""Exact resume: N steps straight == k steps + resume in a new process + N - k steps, bitwise on
CPU, for every parameter and every logged per-step value; and the recipe check on resume.

One configuration exercises everything at once: shuffled epochs, image augmentation, DataLoader
workers, gradient accumulation with a final partial group, and a staged unfreeze in the middle.
The straight run saves a checkpoint after every step; each resume starts a new process from
its checkpoint k and must reproduce the rest of the straight run exactly.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import warnings
from pathlib import Path

import pytest
import torch
from conftest import QUICKSTART, TINY
from train_helpers import assert_same_weights, deterministic, metric_rows, run_forked, run_fresh, train_argv, weights

from vla_ft import checkpoint as ck
from vla_ft.config import RecipeError, load_recipe
from vla_ft.run_setup import setup
from vla_ft.train import fit

N = 7
MATRIX = [
    *TINY,
    "data.augment.enabled=true",
    "data.num_workers=2",
    "model.language.config.attention_dropout=0.1",  # draws from the torch RNG every training step
    # 40 training samples / batch 4 = 10 micro-batches per epoch -> 3 steps of 3; the 10th is left over
    "optim.accumulation=3",
    "freeze.vision_encoder=true",
    "unfreeze.vision_encoder.at_step=3",  # trains from the 4th update on, with its own 2-step warmup
    "unfreeze.vision_encoder.warmup_steps=2",
    f"train.steps={N}",
    "train.val_every=3",
    "checkpoint.every=1",
    "checkpoint.keep_last=0",
    "logging.tensorboard=false",
    "logging.progress=plain",
]


def ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / ck.step_dir_name(step)


def trainer_state(run_dir: Path, step: int) -> dict:
    return json.loads((ckpt(run_dir, step) / "trainer_state.json").read_text())


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("straight")
    run_dir = root / "run"
    code = run_forked(train_argv(run_dir, MATRIX), root / "log.txt")
    assert code == 0, (root / "log.txt").read_text()[-3000:]
    return run_dir


def copy_at(straight: Path, k: int, dst: Path) -> Path:
    """The straight run's directory as a run interrupted right after checkpoint k."""
    shutil.copytree(straight, dst)
    for path in (dst / "checkpoints").glob("step_*"):
        if int(path.name.split("_")[1]) > k:
            shutil.rmtree(path)
    ck.write_pointer(dst / "checkpoints", "latest", ck.step_dir_name(k))
    return dst


def as_text(rows: list[dict]) -> list[str]:
    # JSON text compares NaN (e.g. a transition accuracy without transitions) as equal to itself
    return [json.dumps(deterministic(r), sort_keys=True) for r in rows]


def test_the_straight_run_exercises_the_matrix(straight: Path):
    rows = [r for r in metric_rows(straight) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, N + 1))
    # vision encoder frozen for updates 1-3 (LR 0), then warming up over 2 updates
    assert [r["lr/vision_encoder"] > 0 for r in rows] == [False, False, False, True, True, True, True]
    assert rows[3]["lr/vision_encoder"] < rows[4]["lr/vision_encoder"]
    # data position: k=2 mid-epoch, k=3 at the leftover micro-batch that ends epoch 0 (dropped),
    # k=4 and 5 in epoch 1: every step is one batch of 12
    position = {
        k: (trainer_state(straight, k)["state"]["epoch"], trainer_state(straight, k)["state"]["consumed"])
        for k in (2, 3, 4, 5)
    }
    assert position == {2: (0, 24), 3: (0, 36), 4: (1, 12), 5: (1, 24)}
    assert trainer_state(straight, 2)["frozen"] == ["vision_encoder"]
    assert trainer_state(straight, 4)["frozen"] == []


@pytest.mark.parametrize(
    ("k", "how"),
    [(2, "fork"), (3, "fork"), (5, "fresh")],
    ids=["k2-mid-epoch-before-unfreeze", "k3-before-a-leftover-micro-batch", "k5-mid-epoch-new-interpreter"],
)
def test_resume_reproduces_the_straight_run(straight: Path, tmp_path: Path, k: int, how: str):
    resumed = copy_at(straight, k, tmp_path / "run")
    argv = train_argv(resumed, [*MATRIX, "train.resume=true"])
    if how == "fresh":
        proc = run_fresh(argv)
        code, log = proc.returncode, proc.stdout + proc.stderr
    else:
        code = run_forked(argv, tmp_path / "log.txt")
        log = (tmp_path / "log.txt").read_text()
    assert code == 0, log[-3000:]
    assert f"resumed from {ckpt(resumed, k)} at step {k}" in log

    assert as_text(metric_rows(resumed)) == as_text(metric_rows(straight))
    assert_same_weights(ckpt(straight, N), ckpt(resumed, N))
    assert trainer_state(resumed, N)["state"] == trainer_state(straight, N)["state"]


def test_a_breaking_recipe_change_is_refused(straight: Path, tmp_path: Path):
    resumed = copy_at(straight, 4, tmp_path / "run")
    for change, key in (
        ("model.action_head_hidden=16", "model.action_head_hidden"),
        ("data.normalize=min_max", "data.normalize"),
        ("data.delta_action_dims=[0]", "data.delta_action_dims"),  # other targets, other stats
        ("unfreeze.vision_encoder.at_step=5", "unfreeze.vision_encoder.at_step"),
        # the prompt, the language targets' column and the gripper labels define the inputs and
        # labels of the steps already trained: changing them mid-run is another experiment
        ("data.prompt_template='pick: {instruction}'", "data.prompt_template"),
        ("data.text_key=instruction", "data.text_key"),
        ("loss.gripper.threshold=0.2", "loss.gripper.threshold"),
        ("loss.gripper.closed_is_high=false", "loss.gripper.closed_is_high"),
        ("train.seed=7", "train.seed"),  # another batch stream from the resumed position on
        ("train.ema_decay=0.9", "train.ema_decay"),  # the checkpoint holds no average to continue
    ):
        recipe = load_recipe(QUICKSTART, [*MATRIX, change, "train.resume=true", f"output_dir={resumed}"])
        with pytest.raises(RecipeError, match=f"break equivalence: {key}"):
            setup(recipe)


def test_the_global_batch_counts_the_processes_that_saved_the_checkpoint(tmp_path: Path):
    """A checkpoint of 2 processes resumed on 1 with the same train.batch_size would halve the
    global batch: refused, naming the batch_size that keeps it; doubled, it resumes."""
    from vla_ft.config import to_dict
    from vla_ft.run_state import check_resume_compatible

    saved = load_recipe(QUICKSTART, list(TINY))
    (tmp_path / "trainer_state.json").write_text(json.dumps({"world_size": 2}))
    b, a = saved.train.batch_size, saved.optim.accumulation
    with pytest.raises(RecipeError, match=rf"x 2 = {2 * b * a} -> .* x 1 = {b * a} \(train.batch_size={2 * b} keeps"):
        check_resume_compatible(to_dict(saved), saved, tmp_path, world_size=1)
    doubled = load_recipe(QUICKSTART, [*TINY, f"train.batch_size={2 * b}"])
    with pytest.warns(UserWarning, match="changed keys: train.batch_size"):
        check_resume_compatible(to_dict(saved), doubled, tmp_path, world_size=1)


def test_keys_added_after_a_checkpoint_was_written_read_as_their_defaults(tmp_path: Path):
    """A checkpoint's config.yaml written before data.delta_* and train.ema_* existed trained as
    their defaults do: it resumes; a recipe that turns one of them on is refused."""
    from vla_ft.config import to_dict
    from vla_ft.run_state import check_resume_compatible

    recipe = load_recipe(QUICKSTART, list(TINY))
    saved = to_dict(recipe)
    for section, key in (("data", "delta_action_dims"), ("data", "delta_state_dims"), ("train", "ema_decay")):
        del saved[section][key]
    del saved["train"]["ema_warmup"]
    (tmp_path / "trainer_state.json").write_text(json.dumps({"world_size": 1}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even a changed key
        check_resume_compatible(saved, recipe, tmp_path, world_size=1)
    averaged = load_recipe(QUICKSTART, [*TINY, "train.ema_decay=0.9"])
    with pytest.raises(RecipeError, match=r"break equivalence: train.ema_decay: 0.0 -> 0.9$"):
        check_resume_compatible(saved, averaged, tmp_path, world_size=1)


def test_a_changed_best_metric_or_mode_is_refused(straight: Path, tmp_path: Path):
    """The saved best value is of the old metric: the new one would be compared with it."""
    resumed = copy_at(straight, 4, tmp_path / "run")
    change = ["train.best_metric=val/gripper_acc", "train.best_mode=max"]
    recipe = load_recipe(QUICKSTART, [*MATRIX, *change, "train.resume=true", f"output_dir={resumed}"])
    with pytest.raises(RecipeError) as err:
        setup(recipe)
    assert "train.best_metric: 'val/action_l1' -> 'val/gripper_acc'" in str(err.value)
    assert "train.best_mode: 'min' -> 'max'" in str(err.value)


def test_a_hand_rollback_points_best_at_the_restored_best(straight: Path, tmp_path: Path):
    """Checkpoints after 4 deleted by hand, the best pointer left naming the deleted step 6: on
    resume it names the restored state's best (step 3); with that checkpoint gone too, it goes."""
    resumed = copy_at(straight, 4, tmp_path / "run")
    root = resumed / "checkpoints"
    ck.write_pointer(root, "best", ck.step_dir_name(6))
    assert trainer_state(resumed, 4)["state"]["best_step"] == 3
    recipe = load_recipe(QUICKSTART, [*MATRIX, "train.resume=true", f"output_dir={resumed}"])
    setup(recipe).logger.close()
    assert (root / "best").read_text() == ck.step_dir_name(3)

    shutil.rmtree(ckpt(resumed, 3))
    with pytest.warns(UserWarning, match=r"step_000003 is gone: it held the best val/action_l1 \("):
        run = setup(recipe)
    run.logger.close()
    assert not (root / "best").exists()


def test_a_harmless_change_warns_and_rotation_keeps_best_and_resumed(straight: Path, tmp_path: Path):
    resumed = copy_at(straight, 2, tmp_path / "run")
    overrides = [*MATRIX, "logging.every=2", "checkpoint.keep_last=1", "data.num_workers=0", "train.resume=true"]
    recipe = load_recipe(QUICKSTART, [*overrides, f"output_dir={resumed}"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = setup(recipe)
    assert any("changed keys" in str(w.message) and "logging.every" in str(w.message) for w in caught)
    fit(run)
    run.logger.close()

    best = run.state.best_step
    assert best in (3, 6, N)  # validations at 3, 6 and the last step
    kept = {int(p.name.split("_")[1]) for p in (resumed / "checkpoints").glob("step_*")}
    assert kept == {2, best, N}  # newest 1, plus the one resumed from and the best
    assert ck.latest_checkpoint(resumed / "checkpoints") == ckpt(resumed, N)
    assert ck.read_pointer(resumed / "checkpoints", "best") == ckpt(resumed, best)
    assert_same_weights(ckpt(straight, N), ckpt(resumed, N))  # workers and log interval change nothing


def test_a_stop_on_a_skipped_step_resumes_exactly_under_dwa(tmp_path: Path):
    """SIGTERM arrives while update 4 is skipped (non-finite loss): the checkpoint repeats step 3,
    and the resumed run must not open a second DWA window for the retried step."""
    overrides = [*TINY, "train.steps=6", "checkpoint.every=0", "train.val_every=0", "logging.tensorboard=false"]
    overrides += ["loss.strategy=dwa", "loss.dwa_window=2"]

    def train(run_dir: Path, poison_at: int | None = None, stop: bool = False, resume: bool = False) -> None:
        run = setup(load_recipe(QUICKSTART, [*overrides, f"output_dir={run_dir}", f"train.resume={resume}"]))
        if poison_at is not None:
            forward, calls = run.loss_fn.forward, []

            def poisoned(outputs, batch, share=None):
                total, parts = forward(outputs, batch, share)
                calls.append(1)
                if len(calls) != poison_at:
                    return total, parts
                if stop:
                    os.kill(os.getpid(), signal.SIGTERM)  # handled at the end of this step
                return total * float("nan"), parts

            run.loss_fn.forward = poisoned
        fit(run)
        run.logger.close()

    train(tmp_path / "straight", poison_at=4)
    train(tmp_path / "split", poison_at=4, stop=True)
    assert ck.latest_checkpoint(tmp_path / "split" / "checkpoints") == ckpt(tmp_path / "split", 3)
    train(tmp_path / "split", resume=True)
    assert_same_weights(ckpt(tmp_path / "straight", 6), ckpt(tmp_path / "split", 6))


def test_an_early_stopped_run_relaunched_does_not_train_on(tmp_path: Path):
    overrides = [*TINY, "train.steps=10", "train.val_every=1", "checkpoint.every=0", "logging.tensorboard=false"]
    overrides += ["train.early_stopping.patience=1", "train.early_stopping.min_delta=1000", f"output_dir={tmp_path}"]
    fit(setup(load_recipe(QUICKSTART, overrides)))
    assert ck.latest_checkpoint(tmp_path / "checkpoints") == ckpt(tmp_path, 2)
    run = setup(load_recipe(QUICKSTART, [*overrides, "train.resume=true"]))
    fit(run)
    assert run.state.step == 2 and run.early_stop
    assert ck.latest_checkpoint(tmp_path / "checkpoints") == ckpt(tmp_path, 2)


def test_a_finished_run_relaunched_trains_no_more_and_returns_its_validation(tmp_path: Path):
    overrides = [*TINY, "train.steps=2", "train.val_every=0", "checkpoint.every=0", "logging.tensorboard=false"]
    overrides += [f"output_dir={tmp_path}"]
    fit(setup(load_recipe(QUICKSTART, overrides)))
    run = setup(load_recipe(QUICKSTART, [*overrides, "train.resume=true"]))
    final = fit(run)
    assert run.state.step == 2 and math.isfinite(final["val/action_l1"])  # what main's summary line reads
    assert ck.complete_checkpoints(tmp_path / "checkpoints") == [ckpt(tmp_path, 2)]


def test_switching_a_learned_terms_weight_off_is_refused(tmp_path: Path):
    overrides = [*TINY, "train.steps=1", "train.val_every=0", "logging.tensorboard=false", f"output_dir={tmp_path}"]
    fit(setup(load_recipe(QUICKSTART, [*overrides, "loss.strategy=uncertainty"])))
    changed = [*overrides, "loss.strategy=uncertainty", "loss.weights.language=0", "train.resume=true"]
    with pytest.raises(RecipeError, match=r"loss.weights: terms with a non-zero weight \['action', 'gripper', 'lang"):
        setup(load_recipe(QUICKSTART, changed))


def test_the_best_value_stays_comparable_with_what_validation_measures(tmp_path: Path):
    """The saved best value was measured on the samples train.val_batches chose: a resume on another
    number of processes (train.batch_size changed, the global batch kept) evaluates the same
    samples; another train.val_batches, or with a val/loss best metric another loss formula, is
    refused (a rollout's best metric measures neither)."""
    overrides = [*TINY, "train.steps=1", "train.val_every=0", "logging.tensorboard=false", f"output_dir={tmp_path}"]
    overrides += ["train.val_batches=1", "train.batch_size=2", "optim.accumulation=2"]
    run = setup(load_recipe(QUICKSTART, overrides))
    assert len(run.val_loader.sampler) == 2 and run.val_samples == 2
    fit(run)
    assert trainer_state(tmp_path, 1)["val_samples"] == 2
    resume = [*overrides, "train.resume=true"]
    with pytest.warns(UserWarning, match="changed keys: optim.accumulation, train.batch_size"):
        run = setup(load_recipe(QUICKSTART, [*resume, "train.batch_size=4", "optim.accumulation=1"]))
    assert len(run.val_loader.sampler) == 2  # not 1 batch of 4
    with pytest.raises(RecipeError, match=r"train.val_batches: 1 -> 0 \(the saved best val/action_l1 was measured"):
        setup(load_recipe(QUICKSTART, [*resume, "train.val_batches=0"]))
    with pytest.warns(UserWarning, match="changed keys: loss.action.type"):  # not what val/action_l1 measures
        setup(load_recipe(QUICKSTART, [*resume, "loss.action.type=mse"]))
    loss_best = [*overrides, "train.best_metric=val/loss/action", f"output_dir={tmp_path / 'loss'}"]
    fit(setup(load_recipe(QUICKSTART, loss_best)))
    with pytest.raises(RecipeError, match=r"loss.action.type: 'l1' -> 'mse' \(the saved best val/loss/action"):
        setup(load_recipe(QUICKSTART, [*loss_best, "train.resume=true", "loss.action.type=mse"]))


def test_a_dataset_that_changed_since_the_checkpoint_is_refused(tmp_path: Path):
    """Episodes added to the dataset re-draw the seeded split: resuming would validate on episodes
    already trained on. The split is saved with each checkpoint and compared."""
    from robot_data import SyntheticReader
    from robot_data.lerobot_writer import write_lerobot

    data = tmp_path / "data"
    write_lerobot(SyntheticReader(episodes=8, episode_length=10, image_size=64), data, video=False)
    lerobot = ["data.format=lerobot", f"data.path={data}", "data.text_key=null", "data.language_target=none"]
    overrides = [*TINY, *lerobot, "data.val_ratio=0.25", "train.steps=1", "train.val_every=0"]
    overrides += ["logging.tensorboard=false", f"output_dir={tmp_path / 'run'}"]
    fit(setup(load_recipe(QUICKSTART, overrides)))
    assert trainer_state(tmp_path / "run", 1)["episodes"] == {"train": [0, 1, 3, 5, 6, 7], "val": [2, 4]}
    shutil.rmtree(data)
    write_lerobot(SyntheticReader(episodes=12, episode_length=10, image_size=64), data, video=False)
    with pytest.raises(RecipeError, match=r"the split of data.path changed \(6 training / 2 validation episodes then"):
        setup(load_recipe(QUICKSTART, [*overrides, "train.steps=2", "train.resume=true"]))


def test_a_lora_run_resumes_exactly_and_may_switch_to_peft_forward(tmp_path: Path):
    """Adapters, their AdamW state and the schedule come back bitwise; model.lora.fused is how the
    adapters compute, not what they are, so a resume may switch it (same numbers to rounding)."""
    overrides = [*TINY, "model.lora.enabled=true", "model.lora.target_modules=[all-linear]", "train.steps=4"]
    overrides += ["checkpoint.every=1", "checkpoint.keep_last=0", "train.val_every=0", "logging.tensorboard=false"]

    def train(run_dir: Path, *extra: str) -> None:
        run = setup(load_recipe(QUICKSTART, [*overrides, *extra, f"output_dir={run_dir}"]))
        fit(run)
        run.logger.close()

    straight = tmp_path / "straight"
    train(straight)
    train(copy_at(straight, 2, tmp_path / "fused"), "train.resume=true")
    assert_same_weights(ckpt(straight, 4), ckpt(tmp_path / "fused", 4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(copy_at(straight, 2, tmp_path / "peft"), "train.resume=true", "model.lora.fused=false")
    assert any("model.lora.fused" in str(w.message) for w in caught)
    want, got = weights(ckpt(straight, 4)), weights(ckpt(tmp_path / "peft", 4))
    assert want.keys() == got.keys() and any("lora_A" in k for k in want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6, msg=k)


def sigterm_during(run, step: int) -> None:
    """Send SIGTERM from the loss forward of optimizer step ``step`` (one micro-batch a step):
    the run checkpoints at the end of that step and exits."""
    forward, calls = run.loss_fn.forward, []

    def signalling(outputs, batch, share=None):
        calls.append(1)
        if len(calls) == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return forward(outputs, batch, share)

    run.loss_fn.forward = signalling


def test_a_stop_between_log_steps_logs_the_rows_of_the_uninterrupted_run(tmp_path: Path):
    """logging.every=5 and SIGTERM at step 3: the resumed run's row at step 5 is the mean over
    steps 1-5 (the window's sums travel in the checkpoint), the row the straight run logs."""
    overrides = [*TINY, "train.steps=7", "logging.every=5", "checkpoint.every=0", "train.val_every=0"]
    overrides += ["logging.tensorboard=false"]

    def train(run_dir: Path, stop_at: int | None = None, resume: bool = False) -> None:
        run = setup(load_recipe(QUICKSTART, [*overrides, f"output_dir={run_dir}", f"train.resume={resume}"]))
        if stop_at is not None:
            sigterm_during(run, stop_at)
        fit(run)
        run.logger.close()

    train(tmp_path / "straight")
    train(tmp_path / "split", stop_at=3)
    assert ck.latest_checkpoint(tmp_path / "split" / "checkpoints") == ckpt(tmp_path / "split", 3)
    assert metric_rows(tmp_path / "split") == []  # nothing logged before the stop
    train(tmp_path / "split", resume=True)
    rows = metric_rows(tmp_path / "split")
    assert [r["step"] for r in rows if "loss" in r] == [5, 7]
    assert as_text(rows) == as_text(metric_rows(tmp_path / "straight"))
    # the FLOPs of steps 1-3 travel too: TFLOP/s over the row's samples/s (FLOPs per sample, the
    # seconds cancel) is the straight run's, not 2/5 of it
    want = flops_per_sample(metric_rows(tmp_path / "straight"))
    assert flops_per_sample(rows) == pytest.approx(want, rel=1e-3)


def flops_per_sample(rows: list[dict]) -> list[float]:
    return [1e12 * r["perf/tflops"] / r["perf/samples_per_s"] for r in rows if "loss" in r]


def test_a_log_window_saved_by_two_processes_resumes_on_one_as_their_mean():
    from vla_ft.run_state import rank_window
    from vla_ft.tracking import TrainWindow

    saved = []
    for loss in (1.0, 3.0):  # two ranks, two steps each
        window = TrainWindow()
        for _ in range(2):
            window.values.add({"loss": torch.tensor(loss)})
        window.samples = 16
        saved.append(window.state_dict())
    assert rank_window(saved, 1, 2) == saved[1]
    window = TrainWindow()
    window.load_state_dict(rank_window(saved, 0, 1), torch.device("cpu"))
    window.values.add({"loss": torch.tensor(5.0)})  # the third step, on one process
    assert window.values.means() == {"loss": (2.0 * 2 + 5.0) / 3} and window.samples == 16


def test_the_cli_prints_its_own_warnings_as_one_line(tmp_path: Path, capsys):
    """A harmless change on resume warns; Python's format (file:line: UserWarning, then the
    source line) read like a crash, the CLI says it like its errors."""
    import sys

    from vla_ft.cli import main as cli

    argv = train_argv(tmp_path / "run", [*TINY, "train.steps=1", "train.val_every=0", "logging.tensorboard=false"])
    assert cli(argv) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        # pytest records warnings; show them as Python would, through warnings.formatwarning
        warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: sys.stderr.write(
            warnings.formatwarning(message, category, filename, lineno, line)
        )
        assert cli([*argv, "train.resume=true", "train.steps=2"]) == 0
        warnings.warn("a library's own warning", UserWarning, stacklevel=1)  # not ours: Python's format
    err = capsys.readouterr().err
    assert "vla-ft train: warning: resuming from " in err and "with changed keys: train.steps\n" in err
    assert f"{__file__}:" in err and "UserWarning: a library's own warning" in err
