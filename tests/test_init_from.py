"""``model.init_from``: a second stage starts from an earlier run's weights (its average, LoRA
merged), keeps fresh only the modules shaped by the new data, refuses another model, and resumes
and loads for inference without the source."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_recipe

from vla_ft import VLAPolicy
from vla_ft.config import RecipeError
from vla_ft.data import to_device
from vla_ft.lora import merge_lora
from vla_ft.model_files import load_model
from vla_ft.run_setup import setup, teardown
from vla_ft.train import main as train


@pytest.fixture(scope="module")
def first(tmp_path_factory) -> Path:
    """Stage one: 4 steps with a weight average, chunk 3."""
    tmp = tmp_path_factory.mktemp("first")
    torch.set_num_threads(1)
    train(tiny_recipe(tmp, "train.ema_decay=0.5", "train.steps=4", "checkpoint.every=4"))
    return tmp / "run"


def test_a_second_stage_starts_from_the_first_stages_average(first, tmp_path, capsys):
    run = setup(tiny_recipe(tmp_path, f"model.init_from={first}", "data.chunk=2"))
    source, _ = load_model(first / "checkpoints" / "step_000004")  # the average, as inference loads it
    theirs, ours = source.state_dict(), run.model.state_dict()
    assert [k for k in ours if ours[k].shape != theirs[k].shape] == ["action_queries.weight"]  # one per chunk step
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if k != "action_queries.weight")
    assert f"model.init_from: weights of {first / 'checkpoints' / 'step_000004'}; fresh: action_queries" in (
        capsys.readouterr().out
    )
    teardown(run)


def test_a_head_of_another_width_starts_wholly_fresh(first, tmp_path, capsys):
    """A wider action head: its hidden layer cannot take the source's tensors, so none of the head's
    (its output bias neither, learned under the source's normalisation) come from the source."""
    run = setup(tiny_recipe(tmp_path, f"model.init_from={first}", "model.action_head_hidden=48"))
    source, _ = load_model(first / "checkpoints" / "step_000004")
    theirs, ours = source.state_dict(), run.model.state_dict()
    head = [k for k in ours if k.startswith("action_head.")]
    assert any(ours[k].shape == theirs[k].shape for k in head)  # the output bias, say
    assert not any(ours[k].shape == theirs[k].shape and torch.equal(ours[k], theirs[k]) for k in head)
    assert "fresh: action_head" in capsys.readouterr().out
    teardown(run)


def test_the_second_stage_trains_resumes_and_loads_without_the_source(first, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(first, source)
    stage = [f"model.init_from={source}", "train.steps=4", "checkpoint.every=2"]
    train(tiny_recipe(tmp_path, *stage[:1], "train.steps=2"))
    shutil.rmtree(source)  # the second stage's checkpoints carry everything from here on
    train(tiny_recipe(tmp_path, *stage, "train.resume=true"))
    policy = VLAPolicy.from_pretrained(tmp_path / "run")
    assert policy.meta["model"]["init_from"] == str(source)
    frame = torch.zeros((64, 64, 3), dtype=torch.uint8)
    assert policy.predict_action(frame, "pick up the red block", torch.zeros(3)).shape == (3, 3)
    from vla_ft.evaluate import evaluate_checkpoint

    assert evaluate_checkpoint(tmp_path / "run", [], "val", tmp_path / "eval", plot_episodes=0)["step"] == 4


@pytest.mark.parametrize("extra", ["", "lm_head", "embed_tokens"])
def test_a_lora_source_is_merged_and_new_adapters_start_from_it(tmp_path, extra):
    """An adapter on the tied LM head or input embeddings unties them when merged: the new model,
    built tied from the source's config, must be untied too, or one side overwrites the other."""
    targets = f"model.lora.target_modules=[q_proj, v_proj{', ' + extra if extra else ''}]"
    lora = ["model.lora.enabled=true", "model.lora.r=4", targets]
    train(tiny_recipe(tmp_path / "a", *lora, "train.steps=2", "checkpoint.every=2", "optim.lr=0.05"))
    ckpt = tmp_path / "a" / "run" / "checkpoints" / "step_000002"
    run = setup(tiny_recipe(tmp_path / "b", *lora, f"model.init_from={ckpt}"))
    source, _ = load_model(ckpt)
    merge_lora(source)
    ours, theirs = run.model.language_model.get_base_model(), source.language_model
    for side in ("get_input_embeddings", "get_output_embeddings"):
        mine = getattr(ours, side)()
        assert torch.equal(getattr(mine, "base_layer", mine).weight, getattr(theirs, side)().weight), side
    batch = to_device(next(iter(run.val_loader)), run.rt.device)
    run.model.eval()
    with torch.no_grad():  # fresh adapters add nothing (B = 0): the merged source's actions
        torch.testing.assert_close(run.model(batch)["actions"], source(batch)["actions"], rtol=1e-5, atol=1e-6)
    # The adapters' base is the merged source, stored nowhere as an LM: no base path (the source's
    # language_model/ holds only a config, where AutoPeftModel would look for weights).
    assert run.model.language_model.peft_config["default"].base_model_name_or_path in (None, "")
    teardown(run)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.vision.kwargs.embed_dim=48", "holds another model than this recipe builds"),
        ("model.projector_hidden=16", "projector.0.weight is not in it"),  # an MLP where the source has a linear
        # the LM is built from the source's config: a width here would be recorded, never built
        ("model.language.config.hidden_size=64", "model.language.config.hidden_size: 64 here, 32 in"),
    ],
)
def test_another_model_is_refused_naming_the_tensor(first, tmp_path, override, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        setup(tiny_recipe(tmp_path, f"model.init_from={first}", override))


def test_a_missing_source_is_refused_naming_the_key(tmp_path):
    with pytest.raises(RecipeError, match=re.escape(f"model.init_from: no such directory: {tmp_path / 'nowhere'}")):
        setup(tiny_recipe(tmp_path, f"model.init_from={tmp_path / 'nowhere'}"))
