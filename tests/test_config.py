"""Recipes: every shipped recipe validates; each error case gives its named message."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import QUICKSTART, TINY

from vla_ft.config import Recipe, RecipeError, apply_overrides, load_recipe, recipe_from_dict, to_dict

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))


def test_recipes_found_recursively():
    assert ROOT / "recipes" / "quickstart.yaml" in RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_recipe_validates(path: Path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)


def test_overrides_parse_yaml_values(tmp_path: Path):
    r = load_recipe(
        ROOT / "recipes/quickstart.yaml",
        ["optim.lr=5e-4", "freeze.vision_encoder=true", "loss.gripper.dims=[1, 2]", "output_dir=" + str(tmp_path)],
    )
    assert r.optim.lr == 5e-4 and r.freeze.vision_encoder is True
    assert r.loss.gripper.dims == [1, 2] and r.output_dir == str(tmp_path)


def test_int_is_accepted_for_float():
    assert load_recipe(ROOT / "recipes/quickstart.yaml", ["optim.lr=1"]).optim.lr == 1.0


def test_all_errors_reported_at_once_with_suggestions():
    raw = {
        "optim": {"lrr": 1},
        "train": {"steps": "many", "batch_size": True},
        "modle": {},
        "data": {"normalize": "meanstd"},
    }
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(raw)
    problems = info.value.problems
    assert "unknown key 'optim.lrr' (did you mean 'optim.lr'?)" in problems
    assert "unknown key 'modle' (did you mean 'model'?)" in problems
    assert "train.steps: expected int, got str 'many'" in problems
    assert "train.batch_size: expected int, got bool True" in problems
    assert any(
        p.startswith("data.normalize: 'meanstd' is not one of") and "did you mean 'mean_std'" in p for p in problems
    )
    assert len(problems) == 5


def test_an_unknown_key_with_nothing_close_lists_the_keys_of_its_section():
    """'wd' is nowhere near 'weight_decay': with no suggestion the error named the key and nothing
    to type instead. The listed keys are the section's dataclass fields (the reference here)."""
    import dataclasses

    from vla_ft.config.schema import GroupConfig, Recipe

    for raw, key, cls in (
        ({"optim": {"groups": {"action_head": {"wd": 0.0}}}}, "optim.groups.action_head.wd", GroupConfig),
        ({"zzz": 1}, "zzz", Recipe),
    ):
        with pytest.raises(RecipeError) as info:
            recipe_from_dict(raw)
        (problem,) = info.value.problems
        assert problem.startswith(f"unknown key '{key}'; the keys of ")
        listed = problem.rsplit(": ", 1)[1].split(", ")
        assert listed == [f.name for f in dataclasses.fields(cls)]


def test_semantic_errors_name_the_key():
    with pytest.raises(RecipeError) as info:
        recipe_from_dict({"unfreeze": {"vison_encoder": {"at_step": 3}}, "data": {"format": "lerobto"}})
    text = str(info.value)
    assert "unfreeze.vison_encoder: unknown module (did you mean 'vision_encoder'?)" in text
    assert "data.format: unknown reader 'lerobto' (did you mean 'lerobot'?)" in text


def test_unfreeze_requires_frozen_module():
    with pytest.raises(RecipeError, match="unfreeze.vision_encoder: module is not frozen"):
        recipe_from_dict({"unfreeze": {"vision_encoder": {"at_step": 3}}})


def test_an_unknown_hdf5_layout_is_refused_with_a_suggestion():
    with pytest.raises(
        RecipeError, match=r"data.layout: unknown hdf5 layout 'robomimc' \(did you mean 'robomimic'\?\)"
    ):
        load_recipe(QUICKSTART, [*TINY, "data.format=hdf5", "data.path=x.hdf5", "data.layout=robomimc"])


def test_an_unfreeze_at_or_after_the_last_step_is_refused():
    frozen = [*TINY, "freeze.vision_encoder=true", "train.steps=100"]
    with pytest.raises(RecipeError, match=r"unfreeze.vision_encoder.at_step: 100 is not before train.steps \(100\)"):
        load_recipe(QUICKSTART, [*frozen, "unfreeze.vision_encoder.at_step=100"])
    assert load_recipe(QUICKSTART, [*frozen, "unfreeze.vision_encoder.at_step=99"]).unfreeze  # the last update


def test_round_trip_through_yaml():
    r = load_recipe(ROOT / "recipes/quickstart.yaml")
    again = recipe_from_dict(yaml.safe_load(yaml.safe_dump(to_dict(r))))
    assert again == r


def test_apply_overrides_creates_nested_keys():
    assert apply_overrides({}, ["a.b.c=3"]) == {"a": {"b": {"c": 3}}}


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vla_ft", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_user_errors_are_one_message_without_traceback(tmp_path: Path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: [unclosed\n")
    cases = {
        ("validate", str(tmp_path / "missing.yaml")): "recipe file not found",
        ("validate", str(bad_yaml)): "invalid YAML at line",
        ("validate", str(ROOT / "recipes/quickstart.yaml"), "optim.lrr=1"): "did you mean 'optim.lr'",
        ("validate", str(ROOT / "recipes/quickstart.yaml"), "train.steps=abc"): "train.steps: expected int",
        ("validate", str(ROOT / "recipes/quickstart.yaml"), "train.steps=[1"): "override 'train.steps=[1': not a valid",
        ("validate", str(ROOT / "recipes/quickstart.yaml"), "optim.groups={1: {lr: 0.1}}"): "keys must be names",
        ("validate", str(ROOT / "recipes/quickstart.yaml"), "loss.weights.action=-1"): "must be finite and >= 0",
        ("validate", str(ROOT / "recipes/quickstart.yaml"), "loss.dwa_window=0"): "loss.dwa_window: must be >= 1",
        ("validate", str(ROOT / "recipes/quickstart.yaml"), "optim.lr=.nan"): "optim.lr: must be finite",
        ("validate", str(ROOT / "recipes/quickstart.yaml"), "data.raw_dims=[0]"): "data.raw_dims: gripper dim(s) [",
    }
    for args, message in cases.items():
        proc = _cli(*args, cwd=tmp_path)
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
    ok = _cli("validate", str(ROOT / "recipes/quickstart.yaml"), cwd=tmp_path)
    assert ok.returncode == 0 and "valid recipe" in ok.stdout


def test_validate_checks_the_ablation_variants_ablate_would_refuse(tmp_path: Path):
    """``validate`` said ok to an ablation recipe whose variant ``ablate`` then refused."""
    ablation = str(ROOT / "recipes/ablation_freeze.yaml")
    bad = _cli("validate", ablation, "train.steps=100", cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert "variant 'staged_unfreeze': unfreeze.vision_encoder.at_step: 200 is not before" in bad.stderr
    ok = _cli("validate", ablation, cwd=tmp_path)
    assert ok.returncode == 0 and "5 ablation variants" in ok.stdout, ok.stderr


def test_numbers_outside_their_range_are_reported_at_once():
    """A count of 0 or -1 would log, validate or load differently from what the recipe says."""
    bad = {
        "train.val_batches": -1,
        "train.val_every": -1,
        "train.threads": -1,
        "train.early_stopping.patience": -1,
        "logging.every": 0,
        "data.num_workers": -1,
        "data.prefetch_factor": 0,
        "optim.warmup_steps": -1,
        "optim.grad_clip": -1,
        "optim.min_lr_ratio": 2,
        "checkpoint.every": -1,
        "checkpoint.keep_last": -1,
        "data.val_ratio": 1,
        "model.lora.dropout": 1,
        "model.action_tokens_bins": 1,
    }
    with pytest.raises(RecipeError) as err:
        load_recipe(QUICKSTART, [f"{k}={v}" for k, v in bad.items()])
    for key in bad:
        assert f"{key}: must be" in str(err.value), key
    assert "model.action_tokens_bins: must be >= 2, got 1" in str(err.value)
    ok = ["optim.min_lr_ratio=1", "train.val_batches=0", "checkpoint.every=0", "train.val_every=0"]
    load_recipe(QUICKSTART, [*ok, "model.action_tokens_bins=2"])


@pytest.mark.parametrize("scale", ["[1.5, 0.2]", "[0.5, 0.2]", "[0, 1]", "[0.5]"])
def test_a_crop_scale_that_is_no_fraction_range_is_refused(scale):
    """data.augment.crop_scale=[1.5, 0.2] passed validate and failed when the dataset was built."""
    with pytest.raises(
        RecipeError, match=re.escape("data.augment.crop_scale: must be [low, high] with 0 < low <= high")
    ):
        load_recipe(QUICKSTART, [f"data.augment.crop_scale={scale}"])
    assert load_recipe(QUICKSTART, ["data.augment.crop_scale=[0.2, 0.2]"]).data.augment.crop_scale == [0.2, 0.2]


def assert_each_refused(overrides: list[str], bad: dict[str, tuple[str, str]], joined: bool = True) -> RecipeError:
    """Load the quickstart with ``overrides``; every ``key: (value, message)`` of ``bad`` must be
    reported (as "key: message" when ``joined``, else both anywhere in the error)."""
    with pytest.raises(RecipeError) as err:
        load_recipe(QUICKSTART, overrides)
    text = str(err.value)
    for key, (_, message) in bad.items():
        assert (f"{key}: {message}" in text) if joined else (key in text and message in text), key
    return err.value


def test_loss_and_split_keys_the_recipe_alone_shows_are_refused_before_any_data_is_read():
    """`vla-ft validate` reads no data: what the recipe alone makes wrong must still be refused there."""
    bad = {
        "loss.language.label_smoothing": ("1.5", "must be in [0, 1)"),
        "loss.grad_norm_every": ("-1", "must be >= 0"),
        "loss.gripper.pos_weight": ("0", "must be > 0"),
        "loss.action.beta": ("-1", "must be >= 0"),
        "loss.gripper.dims": ("[6,6]", "repeated dim"),
        "loss.action.horizon_weights": ("[1,2]", "2 values for data.chunk=4"),
        "data.val_filter": ("valid", "data.val_episodes both choose"),
    }
    overrides = [f"{k}={v}" for k, (v, _) in bad.items()] + ["data.val_episodes=[1]"]
    assert_each_refused(overrides, bad, joined=False)


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("no placeholder", "has no {instruction} placeholder"),
        ("{instruction} {goal}", "names ['goal']; only {instruction} is filled"),
        ("{instruction", "expected '}' before end of string"),
    ],
)
def test_prompt_template_names_instruction_and_nothing_else(template, message):
    with pytest.raises(RecipeError, match=re.escape(f"data.prompt_template: {template!r}")) as err:
        load_recipe(QUICKSTART, [f"data.prompt_template={json.dumps(template)}"])
    assert message in str(err.value)
    load_recipe(QUICKSTART, ['data.prompt_template="{instruction} -> {{action}}"'])  # literal braces are fine


def test_keys_lists_a_prefix_and_refuses_one_matching_nothing(capsys):
    from vla_ft.cli import main as cli

    assert cli(["keys", "loss.gripper"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out and all(line.startswith("loss.gripper.") for line in out)
    assert cli(["keys", "optim.groups"]) == 0  # the fields of a keyed section's entries are keys too
    out = capsys.readouterr().out
    assert "optim.groups.<module>.lr (float or null, default None)" in out and "<module>.weight_decay" in out
    assert cli(["keys", "optm"]) == 2
    err = capsys.readouterr().err
    assert "no recipe key starts with 'optm' (did you mean 'optim'?)" in err and "sections: output_dir, model" in err
    assert cli(["keys", "nonexistent"]) == 2
    assert "no recipe key starts with 'nonexistent'; sections:" in capsys.readouterr().err


def test_best_metric_is_checked_against_what_validation_of_this_recipe_logs():
    quickstart = ROOT / "recipes/quickstart.yaml"
    for overrides, close in (
        (["train.best_metric=val/action_l"], "val/action_l1"),
        (["train.best_metric=val/gripper_accc"], "val/gripper_acc"),
        (["train.best_metric=val/action_l1/h9"], "val/action_l1/h3"),  # data.chunk 4: h0..h3
    ):
        with pytest.raises(RecipeError, match=f"train.best_metric: .* \\(did you mean '{close}'\\?\\)"):
            load_recipe(quickstart, overrides)
    ramp = "loss.schedule.language={start: 0.0, end: 0.2}"  # off at first, logged once the ramp starts
    for overrides in (
        ["train.best_metric=val/gripper_f1", "train.best_mode=max"],
        ["train.best_metric=val/loss/language", "loss.strategy=scheduled", ramp],
        ["train.best_metric=val/action_mse/dim6"],  # the action dim is known once the data is read
    ):
        assert load_recipe(quickstart, overrides).train.best_metric == overrides[0].split("=")[1]


def test_best_mode_must_follow_the_metric_direction():
    """best_mode min on an accuracy would keep the worst checkpoint and stop early while it improves."""
    for overrides, message in (
        (["train.best_metric=val/gripper_acc"], "train.best_mode: min, but higher is better for 'val/gripper_acc'"),
        (["train.best_metric=val/token_acc"], "set train.best_mode: max"),
        (["train.best_metric=val/loss/action", "train.best_mode=max"], "but lower is better for 'val/loss/action'"),
        (["train.best_metric=val/baseline_l1"], "mean-action baseline's error, which training does not change"),
    ):
        with pytest.raises(RecipeError, match=re.escape(message)):
            load_recipe(QUICKSTART, overrides)
    assert load_recipe(QUICKSTART, ["train.best_metric=val/gripper_acc", "train.best_mode=max"]).train.best_mode


def test_best_metric_of_a_part_the_recipe_leaves_out_names_the_switch_not_a_lookalike():
    """Without a gripper head, 'val/gripper_acc' is no typo: suggesting 'val/token_acc' would mislead."""
    quickstart = ROOT / "recipes/quickstart.yaml"
    for overrides, needs in (
        (["train.best_metric=val/gripper_acc", "model.gripper_head=false"], "model.gripper_head: true"),
        (["train.best_metric=val/loss/gripper", "model.gripper_head=false"], "model.gripper_head: true"),
        (["train.best_metric=val/token_acc", "data.language_target=none"], "data.language_target: text or"),
        (["train.best_metric=val/loss/language", "loss.weights.language=0"], "loss.weights.language > 0"),
    ):
        with pytest.raises(RecipeError) as err:
            load_recipe(quickstart, overrides)
        name = overrides[0].split("=")[1]
        assert f"train.best_metric: '{name}' is logged only with {needs}" in str(err.value)
        assert "did you mean" not in str(err.value)
    # A typo of such a name points at it and the switch, not at a lookalike this recipe logs.
    typo = ["train.best_metric=val/gripper_accc", "model.gripper_head=false"]
    with pytest.raises(RecipeError, match=r"mean 'val/gripper_acc'\? It is logged only with model.gripper_head"):
        load_recipe(quickstart, typo)


def test_the_recipe_knows_every_reader_and_the_cli_starts_without_torch():
    """`vla-ft --help` must stay instant: the config names the readers instead of importing them."""
    import subprocess
    import sys

    from robot_data import READERS as FORMATS
    from vla_ft.config import READERS

    assert set(READERS) == set(FORMATS)
    probe = "import sys, vla_ft.cli; print(sorted({'torch', 'robot_data', 'transformers'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout == "[]\n"


def test_a_loss_schedule_without_the_scheduled_strategy_is_refused():
    """The ramps are read by the scheduled strategy only: under another one they would silently do nothing."""
    ramp = "loss.schedule.gripper={start_step: 0, end_step: 100, start: 0.0, end: 1.0}"
    with pytest.raises(RecipeError) as err:
        load_recipe(QUICKSTART, [ramp, "loss.strategy=dwa"])
    assert "loss.schedule: ramps for gripper apply only with loss.strategy=scheduled" in str(err.value)
    assert "loss.strategy is 'dwa'" in str(err.value)
    assert load_recipe(QUICKSTART, [ramp, "loss.strategy=scheduled"]).loss.schedule


@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_a_loss_ramp_that_never_moves_within_the_run_is_refused(shape):
    """A ramp from 0 whose start_step is past the run held its term at 0 throughout, yet validation
    logged (and best_metric could pick) val/loss/<term> as for a trained term. Refused exactly when the
    weight at every step 0 .. train.steps-1 (the reference: ramp_weight step by step) is ``start``."""
    from vla_ft.config import ScheduledWeight
    from vla_ft.loss_weighting import ramp_weight

    steps = 5
    for start_step, end_step in ((3, 9), (4, 9), (5, 9), (4, 4), (5, 5), (12, 20), (0, 3)):
        ramp = f"loss.schedule.gripper={{start_step: {start_step}, end_step: {end_step}, start: 0.0, shape: {shape}}}"
        overrides = ["loss.strategy=scheduled", ramp, f"train.steps={steps}", "train.val_every=1"]
        spec = ScheduledWeight(start_step=start_step, end_step=end_step, start=0.0, end=1.0, shape=shape)
        moves = any(ramp_weight(spec, s) != spec.start for s in range(steps))
        if moves:
            assert load_recipe(QUICKSTART, overrides).loss.schedule["gripper"].start_step == start_step
            continue
        with pytest.raises(RecipeError) as err:
            load_recipe(QUICKSTART, overrides)
        assert f"loss.schedule.gripper.start_step: the ramp starts at step {start_step} but train.steps is 5" in str(
            err.value
        )
        # more steps (a resume that trains on) take the same ramp
        assert load_recipe(QUICKSTART, [*overrides, f"train.steps={end_step + 1}"]).train.steps == end_step + 1
    # a constant ramp past the run is a constant weight, not a ramp that never starts
    load_recipe(QUICKSTART, ["loss.strategy=scheduled", "loss.schedule.gripper={start_step: 50, start: 1, end: 1}"])


@pytest.mark.parametrize(
    ("overrides", "fix"),
    [
        # the only weighted term is language, which the run never computes without a language target
        (["loss.weights.action=0", "loss.weights.gripper=0", "data.language_target=none"], "data.language_target=text"),
        # the only weighted term is the gripper's, without a gripper head
        (["loss.weights.action=0", "loss.weights.language=0", "model.gripper_head=false"], "model.gripper_head=true"),
        # every ramp and static weight held at 0
        (
            ["loss.strategy=scheduled", "loss.schedule.action={start: 0, end: 0}"]
            + ["loss.weights.gripper=0", "loss.weights.language=0"],
            "loss.schedule.action.end=1",
        ),
    ],
)
def test_a_recipe_that_computes_no_loss_term_is_refused(overrides, fix):
    """These trained nothing, silently: the loss was the constant 0 of no term at every step (or, for
    a weighted gripper term without a head, 'every term has weight 0' once the model was built).
    The reference: the loss module of the fixed recipe computes a term, the refused one none."""
    from vla_ft.losses import CompositeLoss

    with pytest.raises(RecipeError, match=r"loss.weights: no loss term is ever computed, so nothing would train"):
        load_recipe(QUICKSTART, overrides)
    fixed = load_recipe(QUICKSTART, [*overrides, fix])
    loss = CompositeLoss(fixed.loss, 7, fixed.data.chunk, fixed.model.gripper_head).eval()
    computable = {"language": fixed.data.language_target != "none", "action": True, "gripper": True}
    assert any(loss.wants(t) and computable[t] for t in ("language", "action", "gripper"))


def test_a_gripper_ramp_without_a_gripper_head_is_refused():
    """The ramp was silently ignored: the loss has no gripper term to weigh."""
    ramp = ["loss.strategy=scheduled", "loss.schedule.gripper={start_step: 0, end_step: 3}"]
    with pytest.raises(RecipeError, match=r"loss.schedule.gripper: model.gripper_head is false: no gripper term"):
        load_recipe(QUICKSTART, [*ramp, "model.gripper_head=false"])
    assert load_recipe(QUICKSTART, ramp).loss.schedule["gripper"].end_step == 3


def test_every_learning_rate_decay_and_float_is_checked_for_its_range():
    """A negative group LR trains by gradient ascent; inf or NaN anywhere trains nothing meaningful."""
    bad = {
        "optim.groups.action_head.lr": ("-1e-2", "must be finite and > 0"),
        "optim.groups.projector.lr": (".nan", "must be finite and > 0"),
        "optim.groups.projector.weight_decay": ("-0.1", "must be >= 0"),
        "optim.eps": (".inf", "must be finite and > 0"),
        "optim.momentum": ("1.0", "must be in [0, 1)"),
        "optim.weight_decay": (".inf", "must be finite"),
        "loss.gripper.pos_weight": (".inf", "must be finite"),
        "loss.gripper.threshold": (".nan", "must be finite"),
        "loss.action.dim_weights[1]": ("[1, .inf]", "must be finite"),
        "loss.action.horizon_weights[2]": ("[1, 1, .nan]", "must be finite"),
        "data.augment.crop_scale": ("[.nan, 1.0]", "must be [low, high] with 0 < low <= high <= 1, got [nan"),
        "loss.schedule.action.end": ("{end: .inf}", "must be finite"),
    }
    overrides = [f"{k.split('[')[0]}={v}" for k, (v, _) in bad.items() if k != "loss.schedule.action.end"]
    overrides += ["loss.strategy=scheduled", "loss.schedule.action={end: .inf}", "optim.name=sgd"]
    err = assert_each_refused([*TINY, *overrides], bad)
    assert len(err.problems) == len(bad)  # one message per key, not one per check
    ok = [
        "optim.groups.projector={lr: 1e-5, weight_decay: 0}",
        "optim.name=sgd",
        "optim.momentum=0",
        "optim.grad_clip=0",
    ]
    assert load_recipe(QUICKSTART, ok).optim.groups["projector"].lr == 1e-5


def test_exponent_notation_is_a_float_in_every_section(tmp_path: Path):
    """YAML 1.1 reads 1e-6 as a string; free-form sections (model.language.config) have no float type to fix it."""
    from vla_ft.config import read_yaml, save_recipe
    from vla_ft.config.loader import parse_value

    path = tmp_path / "r.yaml"
    path.write_text("model:\n  language: {config: {rms_norm_eps: 1e-6}}\n  vision: {kwargs: {drop_path_rate: 1E-1}}\n")
    raw = read_yaml(path)
    assert raw["model"]["language"]["config"]["rms_norm_eps"] == 1e-6
    assert raw["model"]["vision"]["kwargs"]["drop_path_rate"] == 0.1
    assert [parse_value(t, "test") for t in ("1e6", "-2.5e-3", "+3e2", "7", "'1e-6'")] == [
        1e6,
        -2.5e-3,
        300.0,
        7,
        "1e-6",
    ]
    r = load_recipe(QUICKSTART, ["model.language.config.rms_norm_eps=1e-6", "output_dir='1e5'"])
    assert r.model.language.config["rms_norm_eps"] == 1e-6 and r.output_dir == "1e5"
    save_recipe(r, tmp_path / "saved.yaml")  # a string that reads as a number is written quoted
    assert load_recipe(tmp_path / "saved.yaml") == r


def test_integers_and_booleans_read_as_yaml_1_2(tmp_path: Path):
    """YAML 1.1 (PyYAML) reads 010 as octal 8 and 1:00 as 60: data.val_episodes=[001, 010] would
    silently hold out episode 8. Recipes read YAML 1.2: decimal, 0o/0x prefixes, true/false only."""
    from vla_ft.config import save_recipe
    from vla_ft.config.loader import parse_value

    assert [parse_value(t, "test") for t in ("010", "0755", "0o17", "0x1F", "-3", "1:00", "yes", "off", "True")] == [
        10,
        755,
        15,
        31,
        -3,
        "1:00",
        "yes",
        "off",
        True,
    ]
    r = load_recipe(QUICKSTART, ["data.val_episodes=[001, 010, 100]", "train.seed=0755"])
    assert r.data.val_episodes == [1, 10, 100] and r.train.seed == 755
    with pytest.raises(RecipeError, match="logging.every: expected int, got str '1:00'"):
        load_recipe(QUICKSTART, ["logging.every=1:00"])
    with pytest.raises(RecipeError, match=r"logging.tensorboard: expected bool, got str 'yes' \(recipes are YAML 1.2"):
        load_recipe(QUICKSTART, ["logging.tensorboard=yes"])
    r = load_recipe(QUICKSTART, ["output_dir='0o17'", "model.language.config.note=on"])
    save_recipe(r, tmp_path / "saved.yaml")  # strings that would read back as numbers are written quoted
    assert load_recipe(tmp_path / "saved.yaml") == r and r.output_dir == "0o17"


def test_settings_the_run_never_reads_are_refused():
    """A group for a module that never trains, DWA's settings under another strategy, a cache
    directory without the cache: validate said ok and the run silently ignored them."""
    frozen = ["freeze.vision_encoder=true", "optim.groups.vision_encoder.lr=1e-5"]
    with pytest.raises(RecipeError, match="optim.groups.vision_encoder: freeze.vision_encoder is true and unfreeze"):
        load_recipe(QUICKSTART, frozen)
    load_recipe(QUICKSTART, [*frozen, "unfreeze.vision_encoder.at_step=2"])  # it trains from step 2
    lora = ["model.lora.enabled=true", "freeze.language_model=true", "optim.groups.language_model.lr=1e-4"]
    load_recipe(QUICKSTART, lora)  # the adapters train
    with pytest.raises(RecipeError, match=r"loss.dwa_window: only loss.strategy=dwa reads it \(strategy is static"):
        load_recipe(QUICKSTART, ["loss.dwa_window=3"])
    load_recipe(QUICKSTART, ["loss.strategy=dwa", "loss.dwa_window=3"])
    with pytest.raises(RecipeError) as err:  # out of range and unread: reported once, as out of range
        load_recipe(QUICKSTART, ["loss.dwa_window=0"])
    assert err.value.problems == ["loss.dwa_window: must be >= 1, got 0"]
    with pytest.raises(RecipeError, match="train.feature_cache_dir: only train.cache_features=true reads it"):
        load_recipe(QUICKSTART, ["train.feature_cache_dir=/tmp/cache"])
    with pytest.raises(RecipeError, match=r"loss.dwa_window: DWA weighs .* train.steps is 40: it would never engage"):
        load_recipe(QUICKSTART, ["loss.strategy=dwa", "train.steps=40"])  # the default window is 50
    unread = {
        "optim.momentum": ("optim.momentum=0.5", "only optim.name=sgd reads it"),
        "optim.min_lr_ratio": ("optim.min_lr_ratio=0.5", "optim.scheduler=constant never decays"),
        "optim.groups.action_queries.weight_decay": (
            "optim.groups.action_queries.weight_decay=0.1",
            "action queries are a lookup table",
        ),
        "loss.action.beta": ("loss.action.beta=0.1", "only loss.action.type=smooth_l1 reads it"),
        "loss.gripper.pos_weight": ("loss.gripper.pos_weight=5", "model.gripper_head is false"),
    }
    with pytest.raises(RecipeError) as err:
        load_recipe(
            QUICKSTART, ["optim.scheduler=constant", "model.gripper_head=false", *(v for v, _ in unread.values())]
        )
    for key, (_, why) in unread.items():
        assert f"{key}: {why}" in str(err.value), key
    with pytest.raises(RecipeError, match="optim.eps: optim.name=sgd reads no Adam setting"):
        load_recipe(QUICKSTART, ["optim.name=sgd", "optim.eps=1.0e-6"])


def test_data_settings_the_reader_never_reads_are_refused():
    """data.fps of a LeRobot dataset (its meta/info.json has the rate) and data.layout of a non-HDF5 one
    were silently ignored."""
    unread = {
        "data.fps": ("30", "data.format=lerobot never reads it: a LeRobot dataset records its own"),
        "data.layout": ("aloha", "only data.format=hdf5 reads it (format is lerobot)"),
    }
    lerobot = ["data.format=lerobot", "data.path=ds", "data.text_key=narration"]
    assert_each_refused([*lerobot, *(f"{k}={v}" for k, (v, _) in unread.items())], unread)
    with pytest.raises(RecipeError, match="data.fps: data.format=synthetic never reads it: the task sets its own"):
        load_recipe(QUICKSTART, ["data.fps=30"])
    hdf5 = ["data.format=hdf5", "data.path=x.hdf5", "data.text_key=narration"]
    assert load_recipe(QUICKSTART, [*hdf5, *(f"{k}={v}" for k, (v, _) in unread.items())])


def test_switching_a_feature_off_keeps_its_tuning_keys():
    """`train.compile=false` on a recipe that sets train.compile_mode (the reference recipe, as the
    benchmark's CPU smoke runs it) and `train.ema_decay=0` on one that tunes the warm-up are overrides
    and ablation variants, not mistakes."""
    recipe = load_recipe(QUICKSTART, ["train.compile_mode=reduce-overhead", "train.ema_warmup=false"])
    assert recipe.train.compile_mode == "reduce-overhead" and recipe.train.ema_warmup is False
    assert load_recipe(ROOT / "recipes/bench/reference.yaml", ["train.compile=false"]).train.compile is False


def test_an_unknown_built_in_tokenizer_is_refused_by_validate_with_a_suggestion():
    """validate said ok to builtin:tiyn; the run refused it only when it built the tokenizer."""
    message = "model.language.tokenizer: unknown built-in tokenizer 'builtin:tiyn' (did you mean 'builtin:tiny'?)"
    with pytest.raises(RecipeError, match=re.escape(message)):
        load_recipe(QUICKSTART, ["model.language.tokenizer=builtin:tiyn"])


def test_flash_attention_without_its_package_is_refused_by_validate(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))
    with pytest.raises(RecipeError, match="model.language.attn_implementation: flash_attention_2 needs the flash_attn"):
        load_recipe(QUICKSTART, ["model.language.attn_implementation=flash_attention_2"])


def test_seeds_must_be_non_negative():
    with pytest.raises(RecipeError) as err:
        load_recipe(QUICKSTART, ["train.seed=-1", "data.synthetic.seed=-1", "data.split_seed=-1"])
    assert "train.seed: must be in [0, 2**32), got -1" in str(err.value)
    assert "data.split_seed: must be in [0, 2**32), got -1" in str(err.value)
    assert "data.synthetic.seed: must be in [0, 2**32), got -1" in str(err.value)
    assert load_recipe(QUICKSTART, ["train.seed=0", f"data.synthetic.seed={2**32 - 1}"]).train.seed == 0


def test_lora_targets_are_checked_by_validate_without_building_the_model():
    with pytest.raises(RecipeError, match=r"model.lora.target_modules: pattern\(s\) \['qproj'\] match no module"):
        load_recipe(QUICKSTART, ["model.lora.enabled=true", "model.lora.target_modules=[qproj]"])
    with pytest.raises(RecipeError, match=r"model.lora.vision_target_modules: pattern\(s\) \['qkvv'\] match no"):
        load_recipe(QUICKSTART, ["model.lora.vision=true", "model.lora.vision_target_modules=[qkvv]"])
    assert load_recipe(QUICKSTART, ["model.lora.enabled=true", "model.lora.target_modules=[q_proj]"]).model.lora


def test_the_model_section_is_checked_by_validate_on_the_meta_device():
    """What timm or transformers would refuse, misread or fail on at the first step is refused at load,
    naming the key: a misspelt LM config key (transformers would keep it and build its default width),
    head counts that do not divide the width, an LM config next to a pretrained LM's name."""
    cases = {
        "model.language.config.hidden_sise=96": "model.language.config.hidden_sise: not a Qwen2Config key, "
        "so transformers would ignore it (did you mean 'hidden_size'?)",
        "model.language.config.num_attention_heads=5": "model.language.config: the LM fails on a 4-token input",
        "model.language.config.num_key_value_heads=3": "model.language.config: the LM fails on a 4-token input",
        "model.language.name=some/lm": "model.language.config: used only when model.language.name is null",
        "model.vision.kwargs.num_heads=5": "model.vision.kwargs: timm.create_model(",
        "model.vision.kwargs.embed_dimm=96": "unexpected keyword argument 'embed_dimm'",
        "model.language.config.hidden_size=-4": "model.language.config: transformers cannot build the LM: "
        "RuntimeError: Trying to create tensor with negative dimension -4",
        "model.vision.kwargs.embed_dim=-4": "model.vision.kwargs: timm cannot build the backbone: "
        "RuntimeError: Trying to create tensor with negative dimension -4",
        # the kwargs' backbone runs at its default 224: the 7-pixel image (smaller than a patch) is to blame
        "model.vision.img_size=7": "model.vision.img_size: the backbone fails on a 7x7 image",
    }
    for override, message in cases.items():
        with pytest.raises(RecipeError) as err:
            load_recipe(QUICKSTART, [override])
        assert message in str(err.value), (override, str(err.value))
    # keys a config takes through **kwargs, or that resemble none of its keys, pass
    ok = load_recipe(QUICKSTART, ["model.language.config.rope_theta=10000.0", "model.language.config.my_flag=1"])
    assert ok.model.language.config["my_flag"] == 1
    assert load_recipe(QUICKSTART, ["model.language.name=some/lm", "model.language.config={}"]).model.language.name


def test_a_backbone_the_meta_device_cannot_build_is_left_to_building_the_real_one(monkeypatch):
    """The meta device's own limits (``.item()`` in a model's ``__init__``) are not the recipe's problem."""
    from vla_ft import model_check

    def meta_only(cfg):
        raise RuntimeError("Tensor.item() cannot be called on meta tensors")

    monkeypatch.setattr(model_check, "vision_skeleton", meta_only)
    assert model_check._vision_problems(load_recipe(QUICKSTART).model) == []


def test_unknown_module_and_term_names_are_reported_with_the_type_errors():
    raw = {
        "train": {"stepz": 3},
        "optim": {"groups": {"projectr": {"lr": 1e-4}}},
        "loss": {"schedule": {"languag": {"end": 1.0}}},
    }
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(raw)
    assert err.value.problems == [
        "unknown key 'train.stepz' (did you mean 'train.steps'?)",
        "optim.groups.projectr: unknown module (did you mean 'projector'?); modules: vision_encoder, projector, "
        "proprio_encoder, film, language_model, action_queries, action_head, gripper_head",
        "loss.schedule.languag: unknown term (did you mean 'language'?); terms: language, action, gripper",
    ]


def test_keys_setting_a_module_the_model_does_not_have_are_refused():
    overrides = ["model.gripper_head=false", "optim.groups.gripper_head.lr=1e-2", "freeze.gripper_head=true"]
    overrides += ["model.proprio=false", "freeze.proprio_encoder=true", "unfreeze.proprio_encoder={at_step: 2}"]
    with pytest.raises(RecipeError) as err:
        load_recipe(QUICKSTART, overrides)
    for key, switch in (
        ("optim.groups.gripper_head", "model.gripper_head"),
        ("freeze.gripper_head", "model.gripper_head"),
        ("freeze.proprio_encoder", "model.proprio"),
        ("unfreeze.proprio_encoder", "model.proprio"),
    ):
        assert f"{key}: {switch} is false, so the model has no" in str(err.value), key
    assert len(err.value.problems) == 4


def test_early_stopping_needs_validations_during_the_run():
    with pytest.raises(RecipeError, match="train.early_stopping.patience: 1 .* the run has no validation set"):
        load_recipe(QUICKSTART, ["data.val_ratio=0", "train.early_stopping.patience=1"])
    with pytest.raises(RecipeError, match="train.early_stopping.patience: 1 .* train.val_every is 0"):
        load_recipe(QUICKSTART, ["train.val_every=0", "train.early_stopping.patience=1"])
    assert load_recipe(QUICKSTART, ["data.val_ratio=0", "data.val_episodes=[0]", "train.early_stopping.patience=1"])
    stalls = ["train.steps=6", "train.val_every=3", "train.early_stopping.patience=2"]  # validations at 3 and 6
    with pytest.raises(RecipeError, match=r"validate 2 time\(s\), and the first sets the best: at most 1 can stall"):
        load_recipe(QUICKSTART, stalls)
    with pytest.raises(RecipeError, match=r"validate 1 time\(s\)"):
        load_recipe(QUICKSTART, ["train.steps=6", "train.val_every=10", "train.early_stopping.patience=1"])
    assert load_recipe(QUICKSTART, [*stalls[:2], "train.early_stopping.patience=1"])


def test_keys_piped_into_a_reader_that_stops_early_ends_without_a_traceback(tmp_path: Path):
    """``vla-ft keys | head`` printed a BrokenPipeError traceback once head had read its lines."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "vla_ft", "keys"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path
    )
    proc.stdout.close()  # the reader is gone before the first line is written
    err = proc.stderr.read().decode()
    assert proc.wait() == 141, err  # as a Unix tool killed by SIGPIPE reports it
    assert err == ""


def test_a_mapping_for_a_section_merges_and_one_for_a_free_form_key_replaces():
    """``optim={lr: 3e-4}`` would otherwise reset warmup and drop the action-head group to their
    defaults without a word; ``model.language.config={...}`` and ``unfreeze={}`` mean what they say."""
    base = load_recipe(QUICKSTART, TINY)
    frozen = [*TINY, "freeze.vision_encoder=true"]
    merged = load_recipe(QUICKSTART, [*frozen, "optim={lr: 3.0e-4}", "unfreeze.vision_encoder={at_step: 4}"])
    assert merged.optim.lr == 3e-4 and merged.optim.warmup_steps == base.optim.warmup_steps == 2
    assert merged.optim.groups == base.optim.groups and "action_head" in base.optim.groups
    assert merged.unfreeze["vision_encoder"].at_step == 4
    staged = ["unfreeze={vision_encoder: {at_step: 4, warmup_steps: 2}}", "unfreeze.vision_encoder={at_step: 5}"]
    again = load_recipe(QUICKSTART, [*frozen, *staged])
    assert (again.unfreeze["vision_encoder"].at_step, again.unfreeze["vision_encoder"].warmup_steps) == (5, 2)
    assert load_recipe(QUICKSTART, [*frozen, *staged, "unfreeze={}"]).unfreeze == {}
    config = {"model_type": "qwen2", "hidden_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1}
    replaced = load_recipe(QUICKSTART, [*TINY, f"model.language.config={json.dumps(config)}"])
    assert replaced.model.language.config == config


def test_the_validation_split_follows_data_split_seed_not_train_seed(tmp_path):
    """Every seed of a seed sweep validates on the same episodes; a checkpoint's config.yaml saved
    before data.split_seed existed split by train.seed, and reads so."""
    from robot_data import SyntheticReader
    from vla_ft.data import split_train_val
    from vla_ft.evaluate import eval_recipe

    reader = SyntheticReader(episodes=10, episode_length=4)

    def val(*overrides: str) -> list[int]:
        return split_train_val(
            load_recipe(QUICKSTART, [*TINY, "data.val_ratio=0.3", *overrides]), reader, list(range(10))
        )[1]

    assert val("train.seed=0") == val("train.seed=1") == val("train.seed=2")
    assert any(val(f"data.split_seed={s}") != val() for s in range(1, 4))
    old = to_dict(load_recipe(QUICKSTART, [*TINY, "train.seed=3"]))
    del old["data"]["split_seed"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    assert eval_recipe(tmp_path, []).data.split_seed == 3


def test_a_key_given_twice_is_an_error_naming_it_and_its_lines(tmp_path):
    """PyYAML keeps the last of two equal keys: a second ``optim:`` section silently dropped the
    first's lr and action-head group."""
    recipe = tmp_path / "dup.yaml"
    recipe.write_text(QUICKSTART.read_text() + "optim:\n  weight_decay: 0.1\n")
    with pytest.raises(RecipeError, match=r"'optim' is given twice \(lines \d+ and \d+\)"):
        load_recipe(recipe)


def test_validation_counts_global_batches():
    """1 process of batch 4 and 2 of batch 2 validate on the same samples (the best checkpoint and
    early stopping of the two agree)."""
    from vla_ft.samplers import validation_samples

    one = load_recipe(QUICKSTART, [*TINY, "train.val_batches=3", "train.batch_size=4"])
    two = load_recipe(QUICKSTART, [*TINY, "train.val_batches=3", "train.batch_size=2"])
    assert validation_samples(one, 1) == validation_samples(two, 2) == 12
    assert validation_samples(two, 2, saved=6) == 6  # a resume keeps the count it started with


def test_a_recipe_that_is_not_utf8_is_one_error_naming_it(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(QUICKSTART.read_bytes() + "# r\xe9glage\n".encode("latin-1"))
    with pytest.raises(RecipeError, match=r"latin1.yaml: not a UTF-8 text file"):
        load_recipe(path)


@pytest.mark.parametrize(
    ("key", "value"),
    [("loss.schedule.action.start_step", -1), ("unfreeze.vision_encoder.at_step", -1)],
)
def test_a_step_schedule_before_step_0_is_refused_naming_the_key(key, value):
    """A negative unfreeze.<module>.at_step was refused while a negative loss.schedule.<term>.start_step
    was accepted: both are refused, naming the key, and 0 (the first step) passes for both."""
    base = ["loss.strategy=scheduled", "loss.schedule.action={end_step: 5}", "freeze.vision_encoder=true"]
    base.append("unfreeze.vision_encoder={at_step: 0}")
    with pytest.raises(RecipeError, match=re.escape(f"{key}: must be >= 0 (the first step is 0), got {value}")):
        load_recipe(QUICKSTART, [*TINY, *base, f"{key}={value}"])
    assert load_recipe(QUICKSTART, [*TINY, *base, f"{key}=0"])


def _first_full_lr_step(recipe: Recipe, start: int, warmup: int) -> int | None:
    """The reference: the first step of the run at which the LR schedule gives a group its full LR."""
    from vla_ft.optim import lr_factor

    return next((s for s in range(recipe.train.steps) if lr_factor(recipe, s, start, warmup) == 1.0), None)


@pytest.mark.parametrize("steps", [1, 2, 5, 6])
@pytest.mark.parametrize("warmup", [0, 1, 2, 3, 4, 5, 6, 9])
def test_a_warmup_as_long_as_the_run_warns_naming_the_key_and_both_numbers(steps, warmup):
    """optim.warmup_steps (or an unfreeze warmup from its at_step) that reaches the full LR at the last
    step or never: warned about (not refused: short runs keep the recipe's warmup), exactly when the
    LR schedule step by step (optim.lr_factor) first gives the full LR at the last step or never,
    after a real warmup. Not in eval's read-back (training=False)."""
    import warnings

    cases = {  # key -> (overrides, the group's start, its warmup); constant: the warmup alone sets the LR
        "optim.warmup_steps": ([f"optim.warmup_steps={warmup}"], 0, warmup),
        "unfreeze.vision_encoder.warmup_steps": (
            ["optim.warmup_steps=0", "optim.scheduler=constant", "freeze.vision_encoder=true"]
            + [f"unfreeze.vision_encoder={{at_step: {steps // 2}, warmup_steps: {warmup}}}"],
            steps // 2,
            warmup,
        ),
    }
    for key, (overrides, start, group_warmup) in cases.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            recipe = load_recipe(QUICKSTART, [*TINY, f"train.steps={steps}", "train.val_every=0", *overrides])
        full = _first_full_lr_step(recipe, start, group_warmup)
        expected = full is None or (full == steps - 1 and full > start)
        ours = [str(w.message) for w in caught if key in str(w.message)]
        assert bool(ours) == expected, (key, ours)
        if expected:
            assert f"{key}: {warmup} " in ours[0] and f"train.steps ({steps})" in ours[0]
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # an evaluation's read-back of the recipe does not warn
                recipe_from_dict(to_dict(recipe), training=False)


def test_the_cli_prints_a_warmup_warning_as_one_line(tmp_path: Path):
    done = _cli("validate", str(QUICKSTART), "train.steps=10", "optim.warmup_steps=30", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "vla-ft validate: warning: " in done.stderr
    assert "optim.warmup_steps: 30 is not below train.steps (10)" in done.stderr and "Traceback" not in done.stderr
