"""The loop's mechanics: accumulation scaling, diagnostics in the log, best checkpoint and early
stopping, precision, and the progress display off a TTY."""

from __future__ import annotations

import io
import itertools
import json
import math
import time

import pytest
import torch
from conftest import QUICKSTART, TINY
from train_helpers import metric_rows, tiny_run

import vla_ft.train as train_mod
from vla_ft import checkpoint as ck
from vla_ft.config import RecipeError, load_recipe
from vla_ft.data import to_device
from vla_ft.losses import CompositeLoss
from vla_ft.metrics import validation_names
from vla_ft.run_setup import setup
from vla_ft.tracking import Averager, MetricsLogger, Progress, format_eta, read_rows
from vla_ft.train import fit, train_step


def captured_gradients(run, group) -> list[torch.Tensor]:
    """Run ``train_step`` on ``group`` and return the gradients the optimizer step received."""
    grads = []
    run.optimizer.step = lambda *a, **k: grads.extend(p.grad.clone() for p in run.trainable_params())
    train_step(run, group)
    return grads


def reference_gradients(run, batches) -> list[torch.Tensor]:
    """d mean(loss of each batch) / d params, computed directly (one batch: its loss's gradient)."""
    run.model.train()
    run.loss_fn.train()
    run.optimizer.zero_grad(set_to_none=True)
    losses = [run.loss_fn(run.model(to_device(b, run.rt.device)), b)[0] for b in batches]
    (sum(losses) / len(losses)).backward()
    grads = [p.grad.clone() for p in run.trainable_params()]
    run.optimizer.zero_grad(set_to_none=True)
    return grads


def one_batch(run, group) -> dict:
    """The samples of every micro-batch of ``group`` collated as one batch."""
    loader = run.train_loader
    return loader.collate_fn([loader.dataset[(0, int(i))] for b in group for i in b["index"]])


@pytest.mark.parametrize("strategy", ["static", "uncertainty"])
def test_accumulated_micro_batches_give_the_gradient_of_one_batch_of_their_samples(tmp_path, strategy):
    """Micro-batches hold different numbers of target tokens and of action steps padded at the
    episode end (chunk 4 over 10-frame episodes): each term is pooled over the valid elements of
    the whole step, as one batch of all the samples computes it, not a mean of micro-batch means."""
    run = tiny_run(
        tmp_path / "run",
        "optim.accumulation=2",
        "optim.grad_clip=0",
        "data.chunk=4",
        f"loss.strategy={strategy}",
        "data.synthetic.episode_length=10",
    )
    b1, b2, b3 = itertools.islice(iter(run.train_loader), 3)
    counts = [run.loss_fn.counts(b) for b in (b1, b2)]
    assert counts[0]["action"] != counts[1]["action"] and counts[0]["language"] != counts[1]["language"]
    for group in ([b1, b2], [b3]):  # a full group, and a final partial one (1 of 2)
        expected = reference_gradients(run, [one_batch(run, group)])
        got = captured_gradients(run, group)
        assert len(got) == len(expected)
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-7)


METRICS = ("gripper_acc", "gripper_f1", "gripper_transition_acc", "token_acc", "perplexity")


def test_accumulated_micro_batches_log_the_metrics_of_one_batch_of_their_samples(tmp_path):
    """The logged metric/* of a step were the unweighted mean of each micro-batch's ratio: with
    micro-batches holding different numbers of target tokens and of valid (unpadded) action steps,
    not the metric of the step's samples. They are pooled by their counts, as the losses are."""
    run = tiny_run(tmp_path / "run", "optim.accumulation=2", "train.batch_size=3", "data.chunk=4")
    batches = list(itertools.islice(iter(run.train_loader), 6))
    counts = [run.loss_fn.counts(b) for b in batches]
    b1, b2 = next(
        (batches[0], b)
        for b, c in zip(batches, counts, strict=True)
        if c["language"] != counts[0]["language"] and c["gripper"] != counts[0]["gripper"]
    )
    run.model.train()
    run.loss_fn.train()
    whole = one_batch(run, [b1, b2])
    with torch.no_grad():  # the reference: the loss's metrics of one batch of all the samples
        expected = run.loss_fn(run.model(whole), whole)[1]
    got = train_step(run, [b1, b2]).parts
    for name in METRICS:
        key = f"metric/{name}"
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, equal_nan=True, msg=key)
    assert not any(k.startswith("stat/") for k in got)  # counts are pooled, not logged


def test_a_run_with_accumulation_logs_the_metrics_of_one_with_the_whole_batch(tmp_path):
    """Batch 3 x accumulation 2 and batch 6 x 1 see the same samples at every step (same seed, the same
    weights up to rounding): their logged training metrics agree, as their losses do. The second step's
    micro-batches hold 10 and 12 target tokens, 5 and 12 valid gripper steps (padded chunk ends)."""
    rows = {}
    for name, split in (
        ("accumulated", ["train.batch_size=3", "optim.accumulation=2"]),
        ("whole", ["train.batch_size=6"]),
    ):
        run = tiny_run(tmp_path / name, *split, "data.chunk=4", "train.steps=3", "checkpoint.every=0")
        fit(run)
        run.logger.close()
        rows[name] = [r for r in metric_rows(tmp_path / name) if "loss" in r]
    assert [r["step"] for r in rows["accumulated"]] == [r["step"] for r in rows["whole"]] == [1, 2, 3]
    for one, two in zip(rows["whole"], rows["accumulated"], strict=True):
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
        for name in METRICS:
            key = f"metric/{name}"
            assert two[key] == pytest.approx(one[key], rel=1e-5, nan_ok=True), (one["step"], key)


def test_gradnorm_diagnostics_are_computed_once_per_step_and_logged(tmp_path, monkeypatch):
    calls = []
    norms = CompositeLoss.term_grad_norms
    monkeypatch.setattr(CompositeLoss, "term_grad_norms", lambda self, *a: calls.append(self._step) or norms(self, *a))
    rows = {}
    for every in (1, 2):
        run = tiny_run(
            tmp_path / f"every{every}",
            "train.steps=4",
            "loss.grad_norm_every=2",
            f"logging.every={every}",
            "checkpoint.every=0",
        )
        fit(run)
        rows[every] = {r["step"]: r for r in metric_rows(tmp_path / f"every{every}") if "loss" in r}
    assert calls == [0, 2] * 2  # updates 0 and 2 of each run, one computation each
    one, two = rows[1], rows[2]
    assert [s for s, r in one.items() if "gradnorm/action" in r] == [1, 3]
    assert {"gradnorm/language", "gradnorm/gripper", "gradnorm_weighted/action"} <= one[1].keys()
    # a window averages each key over the steps that have it: the norm is not diluted
    assert two[2]["gradnorm/action"] == one[1]["gradnorm/action"]
    assert two[4]["gradnorm/action"] == one[3]["gradnorm/action"]
    assert two[2]["loss"] == pytest.approx((one[1]["loss"] + one[2]["loss"]) / 2, rel=1e-6)
    assert two[2]["grad_norm"] == pytest.approx((one[1]["grad_norm"] + one[2]["grad_norm"]) / 2, rel=1e-6)


def test_a_frozen_trunk_with_gradnorm_diagnostics_trains_without_them(tmp_path):
    trunk = ["vision_encoder", "projector", "proprio_encoder", "language_model", "action_queries"]
    run = tiny_run(
        tmp_path / "run",
        *(f"freeze.{m}=true" for m in trunk),
        "loss.weights.language=0",
        "loss.grad_norm_every=1",
        "train.steps=2",
        "checkpoint.every=0",
    )
    fit(run)
    rows = [r for r in metric_rows(tmp_path / "run") if "loss" in r]
    assert len(rows) == 2 and not any(k.startswith("gradnorm") for r in rows for k in r)


@pytest.mark.parametrize(
    ("mode", "values", "best", "stop", "min_delta"),
    [
        ("min", [1.0, 0.95, 0.949, 0.96, 0.5], 2, 4, 0.01),  # 0.949 improves by less than min_delta
        ("max", [0.1, 0.3, 0.305, 0.2, 0.9], 2, 4, 0.01),
        ("min", [math.nan, 1.0, 0.5, 0.6, 0.7], 3, 5, 0.01),  # NaN is never the best, nor a value to beat
        ("max", [0.5] + [1.0] * 9, 2, 4, 0.0),  # min_delta 0: an equal value is no improvement
    ],
)
def test_best_checkpoint_and_early_stopping(tmp_path, monkeypatch, mode, values, best, stop, min_delta):
    scripted, metric = iter(values), "val/action_l1" if mode == "min" else "val/gripper_acc"
    monkeypatch.setattr(train_mod, "evaluate", lambda run: {metric: next(scripted), "val/baseline_l1": 1.0})
    run = tiny_run(
        tmp_path / "run",
        "train.steps=10",
        "train.val_every=1",
        f"train.best_metric={metric}",
        f"train.best_mode={mode}",
        "train.early_stopping.patience=2",
        f"train.early_stopping.min_delta={min_delta}",
        "checkpoint.every=0",
        "checkpoint.keep_last=1",
    )
    fit(run)
    assert (run.state.step, run.state.best_step, run.early_stop) == (stop, best, True)
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.glob("step_*")) == [ck.step_dir_name(best), ck.step_dir_name(stop)]
    assert ck.read_pointer(root, "best") == root / ck.step_dir_name(best)
    assert ck.latest_checkpoint(root) == root / ck.step_dir_name(stop)


def test_the_last_step_is_logged_validated_and_checkpointed_off_the_cadence(tmp_path, monkeypatch):
    """5 steps, every cadence 2: rows, validations and checkpoints at steps 2 and 4, and at 5 (the end)."""
    scripted = iter([1.0, 2.0, 3.0])  # the best stays at step 2: step 5 is not saved as the best
    monkeypatch.setattr(train_mod, "evaluate", lambda run: {"val/action_l1": next(scripted), "val/baseline_l1": 1.0})
    cadence = ["logging.every=2", "train.val_every=2", "checkpoint.every=2", "checkpoint.keep_last=0"]
    run = tiny_run(tmp_path / "run", "train.steps=5", "train.early_stopping.patience=0", *cadence)
    fit(run)
    rows = metric_rows(tmp_path / "run")
    assert [r["step"] for r in rows if "loss" in r] == [2, 4, 5]
    assert [r["step"] for r in rows if "val/action_l1" in r] == [2, 4, 5]
    root = tmp_path / "run" / "checkpoints"
    assert ck.complete_checkpoints(root) == [root / ck.step_dir_name(s) for s in (2, 4, 5)]
    assert ck.read_pointer(root, "best") == root / ck.step_dir_name(2)


def test_early_stopping_between_log_steps_logs_the_last_steps(tmp_path, monkeypatch):
    scripted = iter([1.0, 2.0])
    monkeypatch.setattr(train_mod, "evaluate", lambda run: {"val/action_l1": next(scripted), "val/baseline_l1": 1.0})
    run = tiny_run(
        tmp_path / "run", "train.steps=12", "train.val_every=3", "logging.every=4", "train.early_stopping.patience=1"
    )
    fit(run)
    assert run.state.step == 6 and run.early_stop
    assert [r["step"] for r in metric_rows(tmp_path / "run") if "loss" in r] == [4, 6]


def test_val_batches_spread_their_samples_over_the_validation_set(tmp_path):
    """train.val_batches=1 (batch 4) over 2 validation episodes of 10 frames: the first 4 samples would
    be the first frames of one episode; the samples are spread evenly, first and last included."""
    run = tiny_run(tmp_path / "run", "train.val_batches=1")
    (batch,) = list(run.val_loader)
    assert batch["episode_index"].tolist() == [2, 2, 3, 3] and batch["frame_index"].tolist() == [0, 6, 3, 9]
    assert set(train_mod.evaluate(run)) >= {"val/loss/action", "val/action_l1"}
    assert len(list(tiny_run(tmp_path / "all", "train.val_batches=0").val_loader)) == 5


def test_bf16_autocast_trains_on_cpu(tmp_path):
    overrides = ("train.precision=bf16", "train.param_dtype=fp32", "train.steps=2", "checkpoint.every=0")
    run = tiny_run(tmp_path / "run", *overrides)
    dtypes = []
    run.model.action_head.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    before = [p.detach().clone() for p in run.model.action_head.parameters()]
    fit(run)
    assert set(dtypes) == {torch.bfloat16}
    rows = [r for r in metric_rows(tmp_path / "run") if "loss" in r]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert all(p.dtype == torch.float32 for p in run.model.parameters())  # weights stay fp32
    assert any(not torch.equal(a, p) for a, p in zip(before, run.model.action_head.parameters(), strict=True))


def test_progress_prints_plain_lines_with_eta_off_a_tty(capsys):
    progress = Progress(total=10, initial=0, mode="auto")  # captured stderr is not a TTY
    assert progress.mode == "plain"
    progress.update(1)  # no summary: nothing printed between log steps
    progress.update(3, {"loss": 0.5, "loss/action": 0.25})
    progress.write("step 3: val action_l1=0.1")
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("step 3/10 loss=0.5 loss/action=0.25 eta ") and out[0].endswith("s")
    assert out[1:] == ["step 3: val action_l1=0.1"]


def test_progress_draws_a_bar_on_a_tty():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    progress = Progress(total=10, initial=2, mode="auto", stream=screen)
    progress.update(5, {"loss": 0.5})
    progress.close()
    assert progress.mode == "bar" and "5/10" in screen.getvalue() and "loss=0.5" in screen.getvalue()


def test_format_eta():
    assert [format_eta(s) for s in (float("nan"), 42.4, 185, 3725)] == ["?", "42s", "3m05s", "1h02m"]


def test_validation_losses_are_pooled_over_valid_elements(tmp_path):
    """Batches of 6 with a short last one give the same val/loss/* as the whole set in one batch."""
    overrides = [*TINY, "train.val_batches=0", f"output_dir={tmp_path}"]
    small = setup(load_recipe(QUICKSTART, [*overrides, "train.batch_size=6"]))
    n = len(small.data.val_set)
    assert n % 6, "the test needs a short last batch"
    whole = setup(load_recipe(QUICKSTART, [*overrides, f"train.batch_size={n}"]))
    got, want = train_mod.evaluate(small), train_mod.evaluate(whole)
    losses = [k for k in want if k.startswith("val/loss/")]
    assert losses and all(got[k] == pytest.approx(want[k], rel=1e-5) for k in losses)


def test_a_batch_larger_than_the_training_set_is_a_recipe_error(tmp_path):
    with pytest.raises(RecipeError, match=r"train.batch_size: 64 is more than the \d+ training samples"):
        setup(load_recipe(QUICKSTART, [*TINY, "train.batch_size=64", f"output_dir={tmp_path}"]))


def test_more_micro_batches_than_an_epoch_holds_is_a_recipe_error(tmp_path):
    """A step's micro-batches end at the epoch: 16 asked of an epoch of fewer trained smaller batches."""
    with pytest.raises(RecipeError, match=r"optim.accumulation: 16 micro-batches per step, but an epoch holds \d+"):
        setup(load_recipe(QUICKSTART, [*TINY, "optim.accumulation=16", f"output_dir={tmp_path}"]))


def test_action_dims_out_of_range_are_a_recipe_error_before_anything_is_built(tmp_path):
    run_dir = tmp_path / "run"
    for key, value, message in (
        ("loss.gripper.dims", "[7]", r"loss.gripper.dims: \[7\] out of range for the data's 3 action dims"),
        ("data.raw_dims", "[2,5]", r"data.raw_dims: \[5\] out of range for the data's 3 action dims"),
        ("train.best_metric", "val/action_l1/dim5", "'val/action_l1/dim5' is not a validation metric of this recipe"),
    ):
        with pytest.raises(RecipeError, match=message):
            setup(load_recipe(QUICKSTART, [*TINY, f"{key}={value}", f"output_dir={run_dir}"]))
    assert not run_dir.exists()


@pytest.mark.parametrize(
    "overrides",
    [[], ["model.gripper_head=false", "data.language_target=none"]],
    ids=["full", "bare"],
)
def test_validation_names_are_the_names_validation_logs(tmp_path, overrides):
    """What ``train.best_metric`` is checked against at recipe validation: exactly what validation produces."""
    run = tiny_run(tmp_path, *overrides)
    logged = train_mod.evaluate(run)
    assert sorted(validation_names(run.recipe, run.data.action_dim)) == sorted(logged)
    assert ("val/gripper_acc" in logged) == run.recipe.model.gripper_head


def test_undefined_batch_metrics_are_left_out_of_the_logged_mean():
    window = Averager()
    window.add({"metric/gripper_transition_acc": torch.tensor(0.5), "loss": torch.tensor(1.0)})
    window.add({"metric/gripper_transition_acc": torch.tensor(float("nan")), "loss": torch.tensor(float("nan"))})
    means = window.means()
    assert means["metric/gripper_transition_acc"] == 0.5 and math.isnan(means["loss"])  # a NaN loss shows


def test_a_fresh_start_moves_an_earlier_runs_metrics_aside(tmp_path):
    """A run that crashed before its first checkpoint, relaunched: its rows must not mix with the new run's."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 8.0}\n')
    overrides = [*TINY, "train.steps=2", "train.val_every=0", "logging.tensorboard=false", f"output_dir={tmp_path}"]
    run = setup(load_recipe(QUICKSTART, [*overrides, "train.resume=true"]))  # nothing to resume: from scratch
    fit(run)
    run.logger.close()
    rows = metric_rows(tmp_path)
    steps = [r["step"] for r in rows]
    assert steps == sorted(steps) and steps.count(1) == 1 and 9.0 not in [r.get("loss") for r in rows]
    (moved,) = tmp_path.glob("metrics.*.jsonl")
    assert moved.read_text().startswith('{"step": 1, "loss": 9.0}')


def test_two_fresh_starts_in_one_second_keep_both_earlier_logs(tmp_path):
    """Names of moved-aside logs carry the second; a second move in the same second overwrote the first."""
    for loss in (9.0, 7.0):
        (tmp_path / "metrics.jsonl").write_text(f'{{"step": 1, "loss": {loss}}}\n')
        MetricsLogger(tmp_path, tensorboard=False).start_fresh()
    kept = sorted(p.read_text() for p in tmp_path.glob("metrics.*.jsonl"))
    assert kept == ['{"step": 1, "loss": 7.0}\n', '{"step": 1, "loss": 9.0}\n']


def test_metrics_rows_are_strict_json_and_read_back_nan(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log(3, {"loss": 0.5, "metric/gripper_transition_acc": float("nan")})
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 4, "lo')  # a row a crash cut short

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    line = (tmp_path / "metrics.jsonl").read_text().splitlines()[0]
    assert json.loads(line, parse_constant=refuse)["metric/gripper_transition_acc"] is None
    (row,) = read_rows(tmp_path / "metrics.jsonl")
    assert row["loss"] == 0.5 and math.isnan(row["metric/gripper_transition_acc"])


def test_a_fresh_run_refuses_a_directory_with_an_earlier_runs_checkpoints(tmp_path):
    overrides = [*TINY, "train.steps=1", "train.val_every=0", "logging.tensorboard=false", f"output_dir={tmp_path}"]
    fit(setup(load_recipe(QUICKSTART, overrides)))
    with pytest.raises(RecipeError, match="holds checkpoints of an earlier run \\(newest: step_000001\\)"):
        setup(load_recipe(QUICKSTART, [*overrides, "train.steps=2"]))


@pytest.mark.parametrize("below", ["", "run"])
def test_an_output_dir_that_is_a_file_is_refused_naming_the_key(tmp_path, below):
    """output_dir=README.md said only "[Errno 17] File exists"; output_dir=README.md/run was a traceback."""
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    output_dir = notes / below if below else notes
    overrides = [*TINY, "train.steps=1", "train.val_every=0", f"output_dir={output_dir}"]
    with pytest.raises(RecipeError, match=f"output_dir: {notes} is a file, not a directory; choose another output_dir"):
        setup(load_recipe(QUICKSTART, overrides))
    assert notes.read_text() == "keep me"


def test_a_term_ramped_from_zero_is_validated_before_its_ramp(tmp_path):
    """Validation logs val/loss/<term> for every term the run trains, also while its scheduled
    weight is still 0, so a best_metric on it (accepted at load) never fails mid-run."""
    ramp = ["start_step=2", "end_step=8", "start=0", "end=1"]  # 0 up to step 2: the first validation
    run = tiny_run(
        tmp_path / "run",
        "loss.strategy=scheduled",
        *[f"loss.schedule.gripper.{kv}" for kv in ramp],
        "train.steps=4",
        "train.val_every=2",
        "train.best_metric=val/loss/gripper",
        "checkpoint.every=0",
    )
    fit(run)
    rows = [r for r in metric_rows(tmp_path / "run") if "val/loss/action" in r]
    assert [r["step"] for r in rows] == [2, 4] and all(math.isfinite(r["val/loss/gripper"]) for r in rows)


def test_validation_and_checkpoints_are_left_out_of_the_throughput(tmp_path, monkeypatch):
    """perf/samples_per_s (and MFU) of the window after a slow validation and checkpoint stay the training's.

    Each of them moves the clock on by 1000 s (no real sleep): counted, they would cut the rate of the
    windows after them >= 100x, far beyond the spread of real step times on a loaded machine."""
    offset, perf_counter = [0.0], time.perf_counter
    monkeypatch.setattr(time, "perf_counter", lambda: perf_counter() + offset[0])
    for name in ("evaluate", "save_training_checkpoint"):
        slow = getattr(train_mod, name)
        monkeypatch.setattr(
            train_mod, name, lambda run, slow=slow: (offset.__setitem__(0, offset[0] + 1000), slow(run))[1]
        )
    run = tiny_run(tmp_path / "run", "train.steps=9", "logging.every=3", "train.val_every=3", "checkpoint.every=3")
    fit(run)
    rate = {r["step"]: r["perf/samples_per_s"] for r in metric_rows(tmp_path / "run") if "perf/samples_per_s" in r}
    assert sorted(rate) == [3, 6, 9]
    assert min(rate[6], rate[9]) > 0.05 * rate[3], rate


def test_a_resumed_window_counts_the_training_seconds_before_the_stop(monkeypatch):
    """12 samples in 3 s, a checkpoint, a resume, 12 more in 3 s: the row says 4 samples/s, not 8."""
    from vla_ft import tracking

    now = [0.0]
    monkeypatch.setattr(tracking.time, "perf_counter", lambda: now[0])
    window = tracking.TrainWindow()
    window.samples, now[0] = 12, 3.0
    state = window.state_dict()
    back = tracking.TrainWindow()
    back.load_state_dict(state, torch.device("cpu"))
    back.start_clock()  # the resumed run starts training
    back.samples, now[0] = back.samples + 12, 6.0
    assert back.perf(back.elapsed())["perf/samples_per_s"] == 4.0


def test_a_log_row_measures_samples_and_flops_over_one_interval(monkeypatch):
    """samples/s, data wait and TFLOP/s of a row divide by the same seconds: read twice, a clock
    tick between the reads skewed FLOPs per sample (a flaky resume test caught it)."""
    from types import SimpleNamespace

    from vla_ft import tracking

    ticks = itertools.count()
    monkeypatch.setattr(tracking.time, "perf_counter", lambda: float(next(ticks)))  # 1 s per read
    window = tracking.TrainWindow()
    window.samples = 8
    logged = {}
    run = SimpleNamespace(
        state=SimpleNamespace(step=5, skipped=0),
        scaler=None,
        optimizer=SimpleNamespace(param_groups=[{"module": "action_head", "lr": 0.1}]),
        reduce_metrics=lambda values: values,
        perf_metrics=lambda samples, elapsed: {"perf/tflops": 8e12 / elapsed / 1e12},  # 1 TFLOP per sample
        logger=SimpleNamespace(log=lambda step, values: logged.update(values)),
        progress=SimpleNamespace(update=lambda step, summary: None),
    )
    train_mod.log_train(run, window)
    assert logged["perf/tflops"] == logged["perf/samples_per_s"]


@pytest.mark.parametrize("accumulation", [1, 2])
def test_a_step_without_any_of_a_terms_elements_is_left_out_of_its_logged_mean(tmp_path, monkeypatch, accumulation):
    """Language targets missing from every sample of a step (sparse annotations) give that step no
    loss/language: a logged row averages the steps that had targets, not zeros for the others."""
    calls: list[int] = []

    def drop_targets_of_even_steps(batch, device):
        out = to_device(batch, device)
        calls.append(1)
        if (len(calls) - 1) // accumulation % 2 == 1:  # every micro-batch of steps 2, 4, ...
            out["target_mask"] = torch.zeros_like(out["target_mask"])
        return out

    rows = {}
    for every in (1, 2):
        calls.clear()
        monkeypatch.setattr(train_mod, "to_device", drop_targets_of_even_steps)
        run = tiny_run(tmp_path / str(every), f"logging.every={every}", f"optim.accumulation={accumulation}")
        fit(run)
        rows[every] = {r["step"]: r for r in metric_rows(tmp_path / str(every)) if "loss" in r}
    each, pairs = rows[1], rows[2]
    assert all(each[s]["loss/language"] is None for s in (2, 4, 6))  # no value (null), not 0
    assert all(each[s]["loss/language"] > 0 for s in (1, 3, 5))
    for s in (2, 4, 6):
        assert pairs[s]["loss/language"] == pytest.approx(each[s - 1]["loss/language"], rel=1e-6)
        assert pairs[s]["loss/action"] == pytest.approx((each[s - 1]["loss/action"] + each[s]["loss/action"]) / 2)


@pytest.mark.parametrize(
    ("overrides", "steps"),
    [
        (["loss.weights.language=0"], 2),
        (["data.language_target=none"], 2),
        # at 0 in steps 0 and 1 (logged as steps 1 and 2), on from step 2 (a ramp must move in the run)
        (["loss.strategy=scheduled", "loss.schedule.language.start_step=1", "loss.schedule.language.end_step=200"], 3),
    ],
)
def test_a_term_switched_off_is_not_logged_as_a_zero_loss(tmp_path, overrides, steps):
    """With accumulation, a term the step does not compute (weight 0, no language target, a ramp
    still at 0) was logged as ``loss/language = 0.0``: a perfect language loss in the curves."""
    run = tiny_run(tmp_path, *overrides, "optim.accumulation=2", f"train.steps={steps}", "checkpoint.every=0")
    from vla_ft.train import fit

    fit(run)
    rows = [row for row in metric_rows(tmp_path) if "loss" in row]
    assert rows and all("loss/action" in row for row in rows)
    assert not any("loss/language" in row for row in rows if row["step"] <= 2), rows
    assert all("loss/language" in row for row in rows if row["step"] > 2), rows


def test_an_epoch_is_the_same_steps_however_the_global_batch_is_split(tmp_path, monkeypatch):
    """40 samples, global batch 6: 6 steps an epoch, as batch 3 x accumulation 2 or 6 x 1 (a resume
    may change the split). The micro-batch left at an epoch's end trained as a step of 3 samples, so
    a run resumed with the other split skipped samples and shifted every later step."""
    steps: list[list[int]] = []
    groups = train_mod.step_groups

    def recorded(*args):
        for group in groups(*args):
            steps.append(sorted(i for b in group for i in b["index"].tolist()))
            yield group

    monkeypatch.setattr(train_mod, "step_groups", recorded)

    def run(name: str, split: list[str], *extra: str) -> list[list[int]]:
        steps.clear()
        base = [*TINY, "logging.tensorboard=false", "train.val_every=0", "checkpoint.every=0"]
        train_mod.main(load_recipe(QUICKSTART, [*base, *split, *extra, f"output_dir={tmp_path / name}"]))
        return list(steps)

    accumulated, whole = ["train.batch_size=3", "optim.accumulation=2"], ["train.batch_size=6", "optim.accumulation=1"]
    straight = run("straight", accumulated, "train.steps=14")
    assert all(len(s) == 6 for s in straight) and sorted(sum(straight[:6], [])) == sorted(set(sum(straight[:6], [])))
    resumed = run("resumed", accumulated, "train.steps=5") + run(
        "resumed", whole, "train.steps=14", "train.resume=true"
    )
    assert resumed == straight


def test_loader_workers_draw_per_rank_and_leave_signals_to_the_trainer():
    """Worker global RNGs (for user transforms) were seeded train.seed + worker id: every rank's
    workers drew the same numbers, and so did every epoch's. A SIGTERM to the process group
    (torchrun, SLURM) killed the workers under the trainer writing its stop checkpoint: they ignore it."""
    import signal

    import numpy as np

    from vla_ft.data import _seed_worker

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def draws(base: int, rank: int) -> float:
        torch.manual_seed(base)  # what the DataLoader does in a worker: its per-iterator seed + worker id
        _seed_worker(rank, 0)
        return float(np.random.rand())

    try:
        assert draws(7, 0) == draws(7, 0)
        assert len({draws(7, 0), draws(7, 1), draws(8, 0)}) == 3
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)


def test_a_schedule_whose_every_weight_starts_at_0_trains_with_accumulation(tmp_path):
    """No term is on at step 0: pooling the micro-batches' counts stacked an empty list (a crash
    naming no key) where one micro-batch simply gave a zero loss."""
    schedule = [f"loss.schedule.action.{k}" for k in ("start=0", "end=1", "start_step=0", "end_step=3")]
    overrides = ["loss.strategy=scheduled", "loss.weights.language=0", "loss.weights.gripper=0", *schedule]
    run = tiny_run(tmp_path, *overrides, "optim.accumulation=2", "train.steps=4", "checkpoint.every=0")
    fit(run)
    run.logger.close()
    assert run.state.step == 4


def test_a_resume_replays_a_kept_infinity_to_tensorboard_as_inf(tmp_path):
    """A resume that drops a skip row at the checkpoint's step gives TensorBoard that step's kept
    rows again, read back from metrics.jsonl: an infinity there ("Infinity") must go in as inf."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log(2, {"loss": math.inf})
    logger.log(2, {"fault/nonfinite_skips": 1.0})  # a skip after the checkpoint at step 2
    resumed = MetricsLogger(tmp_path, tensorboard=True)
    resumed.truncate_after(2, skipped=0)
    resumed.log(3, {"loss": 0.5})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(2, math.inf), (3, 0.5)]
    assert [(r["step"], r["loss"]) for r in read_rows(tmp_path / "metrics.jsonl")] == [(2, math.inf), (3, 0.5)]


def test_read_rows_takes_a_string_path(tmp_path):
    """The README shows ``vla_ft.tracking.read_rows(path)`` next to ``read_report(path)``, which
    takes a string: ``read_rows("runs/x/metrics.jsonl")`` raised AttributeError ('str' has no is_file)."""
    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log(1, {"loss": math.nan, "grad_norm": math.inf})
    logger.close()
    (row,) = read_rows(str(tmp_path / "metrics.jsonl"))
    assert row["step"] == 1 and math.isnan(row["loss"]) and row["grad_norm"] == math.inf
    assert read_rows(str(tmp_path / "missing.jsonl")) == []
