"""``vla-ft ablate``: variants from the recipe and --grid, a two-variant sweep on the tiny model
with its table and plots, skipping finished variants and resuming an interrupted one."""

from __future__ import annotations

import csv
import json
import re
import shutil
import statistics
from pathlib import Path

import pytest
from conftest import QUICKSTART, ROOT, TINY

from vla_ft import ablate, ablate_table, ablate_variants, train
from vla_ft.cli import main as cli
from vla_ft.config import RecipeError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TWO = "ablation.variants={full: {}, frozen_vision: {freeze.vision_encoder: true}}"
# Two variants, 4 updates, validated and checkpointed every 2 (a resume has a checkpoint to start from).
SWEEP = ["ablate", str(QUICKSTART), *TINY, "train.steps=4", "train.val_every=2", "checkpoint.every=2"]
SWEEP += ["checkpoint.keep_last=0", TWO]


def test_grid_is_every_combination_with_yaml_values():
    grid = ["optim.lr=1e-3,3e-4", "data.cameras=[a,b],[c]", "freeze.projector=true,false"]
    variants = ablate_variants.grid_variants(grid)
    assert len(variants) == 2 * 2 * 2
    first = variants[0]
    assert first.overrides == {"optim.lr": 1e-3, "data.cameras": ["a", "b"], "freeze.projector": True}  # YAML 1.2 float
    assert first.name == "optim.lr=1e-3+data.cameras=__a___b__+freeze.projector=true"
    assert len({v.name for v in variants}) == 8
    with pytest.raises(RecipeError, match="--grid 'optim.lr' must look like"):
        ablate_variants.grid_variants(["optim.lr"])


def test_recipe_variants_cross_the_grid_and_all_are_validated_first(tmp_path):
    recipe = ROOT / "recipes" / "ablation_freeze.yaml"
    _, planned = ablate_variants.plan(recipe, [f"output_dir={tmp_path}"], ["optim.lr=0.001,0.0003"])
    names = [v.name for v, _ in planned]
    assert names[:2] == ["full+optim.lr=0.001", "full+optim.lr=0.0003"] and len(names) == 10
    by_name = {v.name: r for v, r in planned}
    head = by_name["head_only+optim.lr=0.0003"]
    assert head.train.cache_features and head.optim.lr == 0.0003 and head.train.resume
    assert head.output_dir == str(tmp_path / "head_only+optim.lr=0.0003")
    staged = by_name["staged_unfreeze+optim.lr=0.001"].unfreeze["vision_encoder"]
    assert (staged.at_step, staged.warmup_steps) == (200, 50)

    # The quick look of too few steps for the staged variant's unfreeze names that variant.
    with pytest.raises(RecipeError, match=r"variant 'staged_unfreeze': unfreeze.vision_encoder.at_step: 200"):
        ablate_variants.plan(recipe, [f"output_dir={tmp_path}", "train.steps=100"], [])

    # One bad variant key (with a suggestion) and one bad name are reported together, before any training.
    bad = ["ablation.variants={good: {}, typo: {optim.lrr: 0.1}, 'bad name': {}}"]
    with pytest.raises(RecipeError) as err:
        ablate_variants.plan(QUICKSTART, [*bad, f"output_dir={tmp_path}"], [])
    text = str(err.value)
    assert "variant 'typo': unknown key 'optim.lrr' (did you mean 'optim.lr'?)" in text
    assert "ablation.variants.bad name: use letters" in text


def test_summary_row_from_metrics_by_hand(tmp_path):
    run = tmp_path / "v"
    run.mkdir()
    rows = [
        {"step": 1, "loss": 2.0, "perf/samples_per_s": 10.0},
        {"step": 2, "loss": 1.5, "perf/samples_per_s": 30.0},
        {"step": 2, "val/action_l1": 0.5, "val/gripper_acc": 0.6},
        {"step": 3, "loss": 1.2, "perf/samples_per_s": 20.0},
        {"step": 4, "val/action_l1": 0.3, "val/gripper_acc": 0.7},
        {"step": 6, "val/action_l1": 0.4, "val/gripper_acc": 0.9, "val/rollout/success_rate": 0.25},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    info = {"trainable_params": 123, "wall_s": 9.5, "peak_mem_gb": 1.25, "peak_mem_kind": "cpu_peak_rss"}
    (run / "run_summary.json").write_text(json.dumps(info))
    row = ablate_table.summary_row("v", run, "val/action_l1", "min")
    assert row["best val/action_l1"] == 0.3 and row["best_step"] == 4
    assert row["final val/action_l1"] == 0.4 and row["final val/gripper_acc"] == 0.9
    assert row["final val/rollout/success_rate"] == 0.25  # closed-loop success, when the variants roll out
    assert row["samples_per_s"] == 20.0  # median of 10, 30, 20
    assert (row["steps"], row["trainable_params"], row["wall_s"], row["peak_mem_gb"]) == (6, 123, 9.5, 1.25)
    best_acc = ablate_table.summary_row("v", run, "val/gripper_acc", "max")
    assert (best_acc["best val/gripper_acc"], best_acc["best_step"]) == (0.9, 6)


def test_a_tied_best_is_at_its_first_step_in_max_mode_too(tmp_path):
    """Accuracies on a small validation set tie often; the trainer's best checkpoint is the first
    step that reached the value, and so is the table's best_step, for max as for min."""
    run = tmp_path / "v"
    run.mkdir()
    rows = [{"step": s, "val/gripper_acc": a, "val/action_l1": -a} for s, a in ((2, 0.7), (4, 0.9), (6, 0.9))]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    best = ablate_table.summary_row("v", run, "val/gripper_acc", "max")
    assert (best["best val/gripper_acc"], best["best_step"]) == (0.9, 4)
    best = ablate_table.summary_row("v", run, "val/action_l1", "min")
    assert (best["best val/action_l1"], best["best_step"]) == (-0.9, 4)


def test_best_by_is_among_the_finished_variants(tmp_path):
    """A variant that failed or was stopped trained fewer steps (its best may predate a
    divergence): the table still lists it, but "Best by" names a finished variant and says which
    ones were left out."""
    outcomes = {"diverged": ({"halted": "non-finite loss"}, 0.1), "done": ({"finished": True}, 0.3)}
    outcomes |= {"cut": ({}, 0.2)}  # stopped by a signal: no outcome in its summary
    for name, (info, value) in outcomes.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text(json.dumps({"step": 2, "val/action_l1": value}) + "\n")
        (tmp_path / name / "run_summary.json").write_text(json.dumps(info))
    rows = ablate_table.write_summary(tmp_path, list(outcomes), "val/action_l1", "min")
    assert [r["status"] for r in rows] == ["halted", "finished", "stopped"]
    md = (tmp_path / "summary.md").read_text()
    assert md.endswith(
        "Best by val/action_l1 (min) among the finished variants (not: diverged (halted), cut (stopped)): **done**.\n"
    )
    (tmp_path / "done" / "run_summary.json").write_text("{}")
    md = ablate_table.markdown_table(
        ablate_table.write_summary(tmp_path, ["done"], "val/action_l1", "min"), "val/action_l1", "min"
    )
    assert md.endswith("Best by val/action_l1 (min): none, no variant finished with a finite value.\n")


def test_two_variant_ablation_table_plots_skip_and_resume(tmp_path, monkeypatch, capsys):
    root = tmp_path / "abl"
    argv = [*SWEEP, "logging.tensorboard=false", f"output_dir={root}"]
    assert cli(argv) == 0
    out = capsys.readouterr().out
    assert "[ablate 1/2] full: training" in out and "[ablate 2/2] frozen_vision: training" in out

    with open(root / "summary.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [r["variant"] for r in table] == ["full", "frozen_vision"]
    full, frozen = table
    params = {name: _trainable(root / name) for name in ("full", "frozen_vision")}
    assert int(full["trainable_params"]) == params["full"]
    assert int(frozen["trainable_params"]) == params["frozen_vision"] < params["full"]
    for r in table:
        assert r["steps"] == "4" and float(r["wall_s"]) > 0 and float(r["samples_per_s"]) > 0
        assert float(r["peak_mem_gb"]) > 0.05
        val = [json.loads(line) for line in (root / r["variant"] / "metrics.jsonl").read_text().splitlines()]
        val = [v["val/action_l1"] for v in val if "val/action_l1" in v]
        assert float(r["best val/action_l1"]) == pytest.approx(min(val))
        assert float(r["final val/action_l1"]) == pytest.approx(val[-1])
    md = (root / "summary.md").read_text()
    assert md.startswith("| variant | status | steps | trainable_params | best val/action_l1 |")
    assert "Best by val/action_l1" in md
    for name in ("val_curves.png", "metric_bars.png"):
        assert (root / name).read_bytes()[:8] == PNG_SIGNATURE

    # Rerun: both finished, nothing trains.
    def no_training(recipe):
        raise AssertionError(f"{recipe.output_dir} should have been skipped")

    monkeypatch.setattr(train, "main", no_training)
    assert cli(argv) == 0
    assert capsys.readouterr().out.count("finished earlier, skipped") == 2
    monkeypatch.undo()

    # Interrupted: frozen_vision's final checkpoint is gone, its summary says "not finished".
    ckpts = root / "frozen_vision" / "checkpoints"
    shutil.rmtree(ckpts / "step_000004")
    (ckpts / "latest").write_text("step_000002")
    summary = json.loads((root / "frozen_vision" / "run_summary.json").read_text())
    (root / "frozen_vision" / "run_summary.json").write_text(json.dumps({**summary, "finished": False}))
    trained = []
    real_main = train.main
    monkeypatch.setattr(train, "main", lambda recipe: trained.append(recipe.output_dir) or real_main(recipe))
    assert cli(argv) == 0
    out = capsys.readouterr().out
    assert "full: finished earlier, skipped" in out and "frozen_vision: resuming" in out
    assert trained == [str(root / "frozen_vision")]
    rows = [json.loads(line) for line in (root / "frozen_vision" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]  # resumed at 3, not restarted
    after = json.loads((root / "frozen_vision" / "run_summary.json").read_text())
    assert after["finished"] and after["segments"] == 2 and after["wall_s"] > summary["wall_s"]


def _trainable(run_dir: Path) -> int:
    """Sum of the 'trainable' column of parameters.txt over its module rows."""
    lines = (run_dir / "parameters.txt").read_text().splitlines()[2:-1]
    return sum(int(line.split()[2].replace(",", "")) for line in lines)


def test_a_variant_stopped_by_a_signal_stops_the_sweep(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(train, "main", lambda recipe: calls.append(recipe.output_dir) or {})  # returns early
    status = ablate.run_ablation(QUICKSTART, [*TINY, TWO, f"output_dir={tmp_path}"])
    assert status == 130 and calls == [str(tmp_path / "full")]
    assert "full: stopped before the end; rerun the same command to resume" in capsys.readouterr().out
    assert json.loads((tmp_path / "full" / "run_summary.json").read_text())["finished"] is False
    assert not (tmp_path / "summary.csv").exists()  # nothing trained, nothing to compare


def test_a_diverging_variant_is_recorded_and_the_sweep_goes_on(tmp_path, capsys):
    """lr=1e15 halts on non-finite steps: the other variant still trains, the table says
    'halted', and rerunning the command skips both (the first would only diverge again).
    Overrides after --grid are overrides too."""
    diverge = ["train.max_consecutive_skips=2", "optim.grad_clip=0", "optim.warmup_steps=0", "optim.groups={}"]
    argv = ["ablate", str(QUICKSTART), *TINY, *diverge, f"output_dir={tmp_path}", "--grid", "optim.lr=1e15,1e-3"]
    assert cli([*argv, "train.steps=4"]) == 0
    out = capsys.readouterr().out
    assert "[ablate 1/2] optim.lr=1e15: halted (" in out and "[ablate 2/2] optim.lr=1e-3: training" in out
    with open(tmp_path / "summary.csv") as fh:
        status = {r["variant"]: (r["status"], r["steps"]) for r in csv.DictReader(fh)}
    assert status["optim.lr=1e15"][0] == "halted" and status["optim.lr=1e-3"] == ("finished", "4")
    assert cli([*argv, "train.steps=4"]) == 0
    out = capsys.readouterr().out
    assert "optim.lr=1e15: halted earlier, skipped" in out and "optim.lr=1e-3: finished earlier, skipped" in out


def test_a_misspelt_ablation_metric_stops_after_the_first_variant(tmp_path, capsys):
    argv = ["ablate", str(QUICKSTART), *TINY, TWO, "ablation.metric=val/action_l", f"output_dir={tmp_path}"]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert "ablation.metric: 'val/action_l' is not logged by variant full (did you mean 'val/action_l1'?)" in err
    assert not (tmp_path / "frozen_vision").exists()


def test_a_null_variant_is_the_recipe_as_is(tmp_path):
    variants = "ablation.variants={baseline: null, frozen: {freeze.vision_encoder: true}}"
    _, planned = ablate_variants.plan(QUICKSTART, [*TINY, variants, f"output_dir={tmp_path}"], [])
    got = [(v.name, v.overrides) for v, _ in planned]
    assert got == [("baseline", {}), ("frozen", {"freeze.vision_encoder": True})]


def test_grid_refuses_keys_ablate_sets_a_key_given_twice_and_values_that_are_one_recipe(tmp_path):
    """output_dir, train.resume and ablation.* are ablate's own (a variant's value would be undone);
    a second --grid of one key would be merged; 1e-3 and 0.001 would train one recipe twice."""
    for spec, key in (("output_dir=a,b", "output_dir"), ("train.resume=true,false", "train.resume")):
        with pytest.raises(RecipeError, match=f"--grid '{spec}': {key} cannot differ between variants"):
            ablate_variants.grid_variants([spec])
    with pytest.raises(RecipeError, match="--grid 'ablation.metric=val/a,val/b': ablation.metric cannot differ"):
        ablate_variants.grid_variants(["ablation.metric=val/a,val/b"])
    with pytest.raises(RecipeError, match=r"--grid 'optim.lr=3e-4': optim.lr is swept by --grid 'optim.lr=1e-3'"):
        ablate_variants.grid_variants(["optim.lr=1e-3", "freeze.projector=true,false", "optim.lr=3e-4"])
    base = [*TINY, f"output_dir={tmp_path}"]
    with pytest.raises(RecipeError) as err:
        ablate_variants.plan(QUICKSTART, base, ["optim.lr=1e-3,0.001"])
    assert "variants 'optim.lr=1e-3' and 'optim.lr=0.001' are the same recipe" in str(err.value)
    with pytest.raises(RecipeError, match="ablation.variants.moved: output_dir cannot differ between variants"):
        ablate_variants.plan(QUICKSTART, [*base, "ablation.variants={moved: {output_dir: elsewhere}}"], [])


def test_a_rerun_with_another_recipe_is_refused_before_anything_trains(tmp_path, monkeypatch, capsys):
    """The variant's checkpoints were trained with optim.lr=1e-3: a rerun at 5e-4 would resume them
    (or skip the finished run) and list their results under 5e-4."""
    argv = ["ablate", str(QUICKSTART), *TINY, "train.steps=2", "ablation.variants={full: {}}", f"output_dir={tmp_path}"]
    assert cli(argv) == 0
    capsys.readouterr()

    def no_training(recipe):
        raise AssertionError(f"{recipe.output_dir} should not train")

    monkeypatch.setattr(train, "main", no_training)
    assert cli([*argv, "optim.lr=5e-4"]) == 2
    err = capsys.readouterr().err
    assert f"variant 'full': {tmp_path / 'full'} was trained with another recipe (optim.lr: 0.001 -> 0.0005)" in err
    assert cli(argv) == 0  # the recipe it was trained with: finished, skipped
    assert "full: finished earlier, skipped" in capsys.readouterr().out
    monkeypatch.undo()
    longer = [*argv, "train.steps=3", "logging.every=1"]  # the sweep run longer: the variant resumes
    assert cli(longer) == 0
    assert "full: resuming" in capsys.readouterr().out
    summary = json.loads((tmp_path / "full" / "run_summary.json").read_text())
    assert summary["finished"] and summary["segments"] == 2  # the wall time of both segments adds up
    assert summary["train_steps"] == [2, 3]
    with open(tmp_path / "summary.csv") as fh:
        (row,) = csv.DictReader(fh)
    assert row["note"] == "train.steps 2 -> 3 while it trained: not the LR schedule of a fresh run"
    # Shorter than it trained: its row would compare 3 steps with 2 (train.steps stops nothing trained).
    assert cli(argv) == 2
    assert f"variant 'full': {tmp_path / 'full'} trained to step 3 already, beyond train.steps=2" in (
        capsys.readouterr().err
    )


def test_a_failing_variant_is_recorded_and_the_sweep_goes_on(tmp_path, capsys):
    """A batch larger than the training set fails the first variant when its data is read: the
    second still trains, the table says 'failed' with the error, the exit status is 1, and a rerun
    retries the failed variant only."""
    variants = "ablation.variants={big: {train.batch_size: 64}, ok: {}}"
    argv = ["ablate", str(QUICKSTART), *TINY, "train.steps=2", variants, f"output_dir={tmp_path}"]
    assert cli(argv) == 1
    out = capsys.readouterr().out
    assert "[ablate 1/2] big: failed (RecipeError: " in out and "[ablate 2/2] ok: training" in out
    with open(tmp_path / "summary.csv") as fh:
        rows = {r["variant"]: r for r in csv.DictReader(fh)}
    assert (rows["big"]["status"], rows["ok"]["status"]) == ("failed", "finished")
    assert "train.batch_size: 64 is more than the 40 training samples" in rows["big"]["error"]
    assert rows["ok"]["error"] == "" and rows["ok"]["steps"] == "2"
    assert list(rows["ok"])[-1] == "error"
    assert json.loads((tmp_path / "big" / "run_summary.json").read_text())["failed"].startswith("RecipeError: ")
    assert cli(argv) == 1
    out = capsys.readouterr().out
    assert "big: training" in out and "ok: finished earlier, skipped" in out


def test_an_unexpected_error_in_a_variant_shows_its_traceback(tmp_path, monkeypatch, capsys):
    """Not a user error, maybe a bug: recorded like any failure, with the traceback on stderr."""

    def broken(recipe):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(train, "main", broken)
    assert ablate.run_ablation(QUICKSTART, [*TINY, "ablation.variants={only: {}}", f"output_dir={tmp_path}"]) == 1
    captured = capsys.readouterr()
    assert "Traceback" in captured.err and "in broken" in captured.err
    assert "[ablate 1/1] only: failed (ZeroDivisionError: division by zero)" in captured.out


def test_a_grid_value_with_an_apostrophe_is_one_value_and_an_unclosed_quote_an_error():
    """A quote opens only at the start of a value (YAML's rule): "what's" does not swallow the comma."""
    variants = ablate_variants.grid_variants(["data.prompt_template=what's {instruction},'do, {instruction}'"])
    got = [v.overrides["data.prompt_template"] for v in variants]
    assert got == ["what's {instruction}", "do, {instruction}"]
    with pytest.raises(RecipeError, match="a quote ' is never closed"):
        ablate_variants.grid_variants(["data.prompt_template='do {instruction},x"])


def test_a_nested_variant_override_merges_into_its_section(tmp_path):
    """``{optim: {lr: 3e-4}}`` changes the LR alone: the base's warmup and action-head group stay,
    as ``optim.lr: 3e-4`` would leave them; a free-form mapping (``unfreeze: {}``) replaces."""
    variants = "ablation.variants={nested: {optim: {lr: 3.0e-4}}, dotted: {optim.lr: 3.0e-4, optim.warmup_steps: 3}}"
    base, planned = ablate_variants.plan(QUICKSTART, [*TINY, variants, f"output_dir={tmp_path}"], [])
    nested, dotted = (r for _, r in planned)
    assert nested.optim.lr == dotted.optim.lr == 3e-4
    assert nested.optim.warmup_steps == base.optim.warmup_steps == 2 and dotted.optim.warmup_steps == 3
    assert nested.optim.groups == base.optim.groups and "action_head" in base.optim.groups
    staged = ["unfreeze={vision_encoder: {at_step: 3}}", "freeze.vision_encoder=true"]
    none = "ablation.variants={staged: {}, plain: {unfreeze: {}, freeze: {vision_encoder: false}}}"
    _, planned = ablate_variants.plan(QUICKSTART, [*TINY, *staged, none, f"output_dir={tmp_path}"], [])
    staged_recipe, plain = (r for _, r in planned)
    assert list(staged_recipe.unfreeze) == ["vision_encoder"] and plain.unfreeze == {}
    assert not plain.freeze.vision_encoder and plain.freeze.projector == staged_recipe.freeze.projector


def test_an_ablation_mode_against_its_metrics_direction_is_refused(tmp_path):
    """min on an accuracy would crown the worst variant (and title the bar chart "lower is better")."""
    argv = [*TINY, TWO, "ablation.metric=val/gripper_acc", f"output_dir={tmp_path}"]
    with pytest.raises(RecipeError, match="ablation.mode: min, but higher is better for 'val/gripper_acc'"):
        ablate_variants.plan(QUICKSTART, argv, [])
    _, planned = ablate_variants.plan(QUICKSTART, [*argv, "ablation.mode=max"], [])
    assert len(planned) == 2


def test_a_variant_that_failed_after_its_last_checkpoint_is_run_again(tmp_path, monkeypatch, capsys):
    """Its final checkpoint is there, but its ending failed (a full disk at teardown): the rerun
    goes through it again instead of skipping a variant the table calls failed, and exits 0."""
    argv = ["ablate", str(QUICKSTART), *TINY, "train.steps=2", "ablation.variants={only: {}}", f"output_dir={tmp_path}"]
    real = train.main

    def full_disk_at_the_end(recipe):
        real(recipe)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train, "main", full_disk_at_the_end)
    assert cli(argv) == 1
    summary = json.loads((tmp_path / "only" / "run_summary.json").read_text())
    assert summary["finished"] and summary["failed"].startswith("OSError")
    monkeypatch.undo()
    capsys.readouterr()
    assert cli(argv) == 0
    assert "only: resuming" in capsys.readouterr().out
    summary = json.loads((tmp_path / "only" / "run_summary.json").read_text())
    assert summary["finished"] and summary["failed"] is None


def test_a_variant_finished_by_a_shorter_sweep_is_not_finished_in_a_longer_ones_table(tmp_path, monkeypatch, capsys):
    """train.steps=2 finished both variants; the same sweep at train.steps=4 stopped (Ctrl-C) in
    the first, before the second resumed. The table called the second 'finished' (its summary of
    the shorter sweep said so) and named it best, although its newest checkpoint is at step 2 of 4."""
    argv = [
        "ablate",
        str(QUICKSTART),
        *TINY,
        "train.steps=2",
        "logging.tensorboard=false",
        TWO,
        f"output_dir={tmp_path}",
    ]
    assert cli(argv) == 0
    capsys.readouterr()
    monkeypatch.setattr(train, "main", lambda recipe: {})  # stopped by a signal before its first new step
    assert cli([*argv, "train.steps=4"]) == 130
    out = capsys.readouterr().out
    assert "[ablate 1/2] full: resuming" in out and "[ablate 2/2]" not in out
    state = json.loads((tmp_path / "frozen_vision/checkpoints/step_000002/trainer_state.json").read_text())
    assert state["state"]["step"] == 2 < 4  # the reference: where its training stands
    with open(tmp_path / "summary.csv") as fh:
        rows = {r["variant"]: r for r in csv.DictReader(fh)}
    assert rows["frozen_vision"]["status"] == "stopped" and rows["frozen_vision"]["steps"] == "2"
    assert "step 2 of train.steps=4" in rows["frozen_vision"]["note"]
    md = (tmp_path / "summary.md").read_text()
    assert "Best by val/action_l1 (min): none, no variant finished with a finite value." in md


def test_a_variant_name_that_is_no_directory_of_its_own_is_refused(tmp_path):
    """Variants run in <output_dir>/<name>: '..' trained in the sweep root's parent, '.' in the
    root itself (among the other variants and the summary), 'summary.md' where the table goes."""
    for name in ("..", ".", ".hidden", "summary.md", "val_curves.png"):
        variants = f"ablation.variants={{ok: {{}}, '{name}': {{freeze.vision_encoder: true}}}}"
        with pytest.raises(RecipeError, match=rf"ablation.variants.{re.escape(name)}: "):
            ablate_variants.plan(QUICKSTART, [*TINY, variants, f"output_dir={tmp_path}"], [])
    _, planned = ablate_variants.plan(QUICKSTART, [*TINY, TWO, f"output_dir={tmp_path}"], [])
    assert all(Path(r.output_dir).resolve().parent == tmp_path.resolve() for _, r in planned)


def test_the_table_of_a_resumed_sweep_agrees_with_tensorboard(tmp_path, monkeypatch, capsys):
    """The table reads metrics.jsonl; TensorBoard's event files, written by the same runs, are the
    independent record. A crashed segment of frozen_vision logged step 4 with other values (+100)
    before it died without its checkpoint: after the resume neither record may show them, and
    every number of the table is TensorBoard's (best and its step, final, steps, samples/s)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    argv = [*SWEEP, f"output_dir={tmp_path}"]
    real_validate = train.validate

    def stale_at_step_4(run):
        values = real_validate(run)
        return {**values, "val/action_l1": values["val/action_l1"] + 100} if run.state.step == 4 else values

    monkeypatch.setattr(train, "validate", stale_at_step_4)
    assert cli(argv) == 0
    monkeypatch.undo()
    ckpts = tmp_path / "frozen_vision" / "checkpoints"  # the crash: step 4's checkpoint never landed
    shutil.rmtree(ckpts / "step_000004")
    (ckpts / "latest").write_text("step_000002")
    summary = json.loads((tmp_path / "frozen_vision" / "run_summary.json").read_text())
    (tmp_path / "frozen_vision" / "run_summary.json").write_text(json.dumps({**summary, "finished": False}))
    assert cli(argv) == 0
    assert "frozen_vision: resuming" in capsys.readouterr().out
    with open(tmp_path / "summary.csv") as fh:
        table = {r["variant"]: r for r in csv.DictReader(fh)}
    finals = {}
    for name, row in table.items():
        events = EventAccumulator(str(tmp_path / name / "tensorboard"))
        events.Reload()
        val = [(e.step, e.value) for e in events.Scalars("val/action_l1")]
        best = min(val, key=lambda sv: (sv[1], sv[0]))
        assert float(row["best val/action_l1"]) == pytest.approx(best[1], rel=1e-6) and int(row["best_step"]) == best[0]
        assert float(row["final val/action_l1"]) == pytest.approx(val[-1][1], rel=1e-6)
        assert float(row["final val/gripper_acc"]) == pytest.approx(events.Scalars("val/gripper_acc")[-1].value)
        assert int(row["steps"]) == max(e.step for e in events.Scalars("loss")) == 4
        rates = [e.value for e in events.Scalars("perf/samples_per_s")]
        assert float(row["samples_per_s"]) == pytest.approx(statistics.median(rates), rel=1e-6)
        finals[name] = val[-1][1]
    assert finals["full"] > 100 > finals["frozen_vision"]  # the stale +100 of the crashed segment is gone


def test_a_logged_infinity_reads_back_as_tensorboard_keeps_it(tmp_path):
    """metrics.jsonl wrote inf as null, which reads back as NaN ("undefined for this batch"), while
    TensorBoard, written by the same log call, kept inf: a diverged variant's final value read nan.
    TensorBoard's event files are the independent record: every value read back from
    metrics.jsonl, by the reader and the table, is TensorBoard's, the infinities and NaN apart."""
    import math

    import numpy as np
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vla_ft.tracking import MetricsLogger

    run = tmp_path / "diverged"
    run.mkdir()
    logger = MetricsLogger(run, tensorboard=True)
    logger.log(2, {"loss": 0.5, "val/action_l1": 0.25, "metric/gripper_transition_acc": math.nan})
    logger.log(4, {"loss": math.inf, "val/action_l1": math.inf, "optim/log_ratio": -math.inf})
    logger.close()
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    for key in events.Tags()["scalars"]:
        board = [(e.step, e.value) for e in events.Scalars(key)]
        logged = [(r["step"], r[key]) for r in ablate_table.read_rows(run) if key in r]
        np.testing.assert_array_equal(np.array(logged, float), np.array(board, float), err_msg=key)  # NaN == NaN here
    final = events.Scalars("val/action_l1")[-1].value
    row = ablate_table.summary_row("diverged", run, "val/action_l1", "min")
    assert row["final val/action_l1"] == final and math.isinf(final)
    assert row["best val/action_l1"] == events.Scalars("val/action_l1")[0].value and row["best_step"] == 2

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not strict JSON")

    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=refuse)
    # a file written before the infinities were spelled out: its nulls still read as NaN
    (run / "metrics.jsonl").write_text('{"step": 2, "loss": null, "val/action_l1": 0.5}\n')
    (old,) = ablate_table.read_rows(run)
    assert math.isnan(old["loss"]) and old["val/action_l1"] == 0.5
