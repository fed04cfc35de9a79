"""``vla-ft export``: LoRA merged into the weights, a standalone LM directory, and the same
actions from the export as from the checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_recipe

from vla_ft import VLAPolicy
from vla_ft.checkpoint import CheckpointError
from vla_ft.cli import main as cli
from vla_ft.train import main as train

R, ALPHA = 4, 8


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    """A 2-step LoRA run (LM and vision adapters, large LM LR so adapters move) and its export."""
    tmp = tmp_path_factory.mktemp("export")
    torch.set_num_threads(1)
    train(
        tiny_recipe(
            tmp,
            "model.lora.enabled=true",
            f"model.lora.r={R}",
            f"model.lora.alpha={ALPHA}",
            "model.lora.vision=true",
            "model.lora.vision_target_modules=[qkv]",
            "optim.groups.language_model.lr=0.05",
            "optim.groups.vision_encoder.lr=0.05",
            "train.steps=2",
            "checkpoint.every=2",
            "train.val_every=2",
        )
    )
    ckpt = tmp / "run" / "checkpoints" / "step_000002"
    assert cli(["export", str(ckpt), str(tmp / "export")]) == 0
    return ckpt, tmp / "export"


def test_export_gives_the_same_actions_as_the_checkpoint(exported):
    ckpt, out = exported
    frames = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    state = np.random.default_rng(1).normal(size=(2, 3)).astype(np.float32)
    tasks = ["pick up the red block", "pick up the green block"]
    from_ckpt = VLAPolicy.from_pretrained(ckpt).predict_action(frames, tasks, state)
    from_export = VLAPolicy.from_pretrained(out).predict_action(frames, tasks, state)
    np.testing.assert_allclose(from_export, from_ckpt, atol=1e-5)  # merged W + BA vs W x + B(Ax): rounding only


def test_the_merged_lm_is_base_plus_scaled_adapter_product(exported):
    ckpt, out = exported
    trained = load_file(str(ckpt / "model.safetensors"))
    prefix = "language_model.base_model.model.model.layers.0.self_attn.q_proj."
    base, a, b = (trained[prefix + k] for k in ("base_layer.weight", "lora_A.default.weight", "lora_B.default.weight"))
    merged = load_file(str(out / "language_model" / "model.safetensors"))
    assert not any("lora" in k for k in merged)
    expected = base + (ALPHA / R) * b @ a  # LoRA's definition: W' = W + (alpha / r) B A
    assert (expected - base).abs().max() > 1e-3  # the adapter moved, so the check below means something
    torch.testing.assert_close(merged["model.layers.0.self_attn.q_proj.weight"], expected, atol=1e-6, rtol=1e-6)


def test_export_layout_and_a_standalone_lm(exported):
    from transformers import AutoModelForCausalLM

    _, out = exported
    assert sorted(p.name for p in out.iterdir()) == [  # no COMPLETE file: written aside, renamed when whole
        "config.yaml",
        "language_model",
        "model_meta.json",
        "norm_stats.json",
        "policy.safetensors",
        "tokenizer",
    ]
    meta = json.loads((out / "model_meta.json").read_text())
    assert meta["merged"] is True and meta["model"]["lora"]["enabled"] is False
    parts = load_file(str(out / "policy.safetensors"))
    assert {k.split(".")[0] for k in parts} == {
        "vision_encoder",
        "projector",
        "proprio_encoder",
        "action_queries",
        "action_head",
        "gripper_head",
    }
    assert not any("lora" in k for k in parts)
    lm = AutoModelForCausalLM.from_pretrained(str(out / "language_model"))
    assert lm.config.model_type == "qwen2" and lm.get_input_embeddings().num_embeddings == 284


def test_export_refuses_a_non_empty_output_directory(exported, capsys):
    ckpt, out = exported
    assert cli(["export", str(ckpt), str(out)]) == 2
    err = capsys.readouterr().err  # one prefix, as data synth says it (not "error: export: ...")
    assert err == f"vla-ft export: error: {out}: exists and is not empty; choose a new OUT directory\n"
    (out.parent / "afile").write_text("")  # a file in OUT's place: one line too (was NotADirectoryError)
    assert cli(["export", str(ckpt), str(out.parent / "afile")]) == 2
    assert capsys.readouterr().err.endswith("afile: is a file; choose a new OUT directory\n")


def test_an_export_is_synced_whole_or_leaves_nothing(exported, tmp_path, monkeypatch):
    """A crash mid-export leaves no OUT a policy could half-load; a finished one is on disk, fsync'ed."""
    from vla_ft import checkpoint as ck
    from vla_ft import export

    ckpt, _ = exported
    synced: list[str] = []
    real_fsync = ck._fsync
    monkeypatch.setattr(ck, "_fsync", lambda p: synced.append(Path(p).name) or real_fsync(p))
    export.export_policy(ckpt, tmp_path / "whole")
    assert {"policy.safetensors", "model_meta.json", "norm_stats.json", "config.yaml"} <= set(synced)

    def disk_gone(*args, **kwargs):
        raise OSError("I/O error")

    monkeypatch.setattr(export, "save_file", disk_gone)
    with pytest.raises(OSError, match="I/O error"):
        export.export_policy(ckpt, tmp_path / "cut")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["whole"]


def test_an_unconsolidated_fsdp_checkpoint_says_to_consolidate(exported, tmp_path, capsys):
    sharded = tmp_path / "step_000002"
    shutil.copytree(exported[0], sharded)
    (sharded / "model.safetensors").unlink()
    (sharded / "model_dcp").mkdir()  # what an FSDP run writes instead
    assert cli(["export", str(sharded), str(tmp_path / "out")]) == 2
    assert f"run `vla-ft consolidate {sharded}`" in capsys.readouterr().err
    # a mistyped path is no "not an FSDP checkpoint"
    assert cli(["consolidate", str(tmp_path / "step_00002")]) == 2
    assert f"{tmp_path / 'step_00002'}: no such checkpoint directory" in capsys.readouterr().err


def test_an_adapter_on_a_tied_lm_head_moves_only_the_head(tmp_path):
    """The LM ties lm_head to the input embeddings: merging the head's adapter must not move the
    embeddings (so the actions), and the standalone LM must keep the adapted head."""
    from transformers import AutoModelForCausalLM

    from vla_ft.export import export_policy
    from vla_ft.model_files import load_model

    lora = ["model.lora.enabled=true", "model.lora.target_modules=[lm_head,q_proj]"]
    train(tiny_recipe(tmp_path, *lora, "optim.groups.language_model.lr=0.05", "train.steps=2", "checkpoint.every=2"))
    ckpt = tmp_path / "run" / "checkpoints" / "step_000002"
    model, _ = load_model(ckpt)
    assert model.language_model.get_base_model().config.tie_word_embeddings
    out = export_policy(ckpt, tmp_path / "export")
    frames = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    state = np.random.default_rng(1).normal(size=(2, 3)).astype(np.float32)
    from_ckpt = VLAPolicy.from_pretrained(ckpt).predict_action(frames, "pick up the red block", state)
    from_export = VLAPolicy.from_pretrained(out).predict_action(frames, "pick up the red block", state)
    np.testing.assert_allclose(from_export, from_ckpt, atol=1e-5)
    lm = AutoModelForCausalLM.from_pretrained(str(out / "language_model")).eval()
    ids = torch.randint(0, 200, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(lm(input_ids=ids).logits, model.language_model(input_ids=ids).logits)


def test_export_of_the_best_checkpoint(exported, tmp_path, capsys):
    ckpt, _ = exported
    assert (ckpt.parent / "best").read_text() == ckpt.name  # written by the run
    assert cli(["export", str(ckpt.parent / "best"), str(tmp_path / "best")]) == 0
    assert json.loads((tmp_path / "best" / "model_meta.json").read_text())["source"] == str(ckpt.resolve())
    assert f"exported {ckpt} -> " in capsys.readouterr().out  # the checkpoint, not the pointer file


def test_export_refuses_an_incomplete_checkpoint(exported, tmp_path, capsys):
    unfinished = Path(shutil.copytree(exported[0], tmp_path / "step_000002"))
    (unfinished / "COMPLETE").unlink()
    assert cli(["export", str(unfinished), str(tmp_path / "out")]) == 2
    assert f"{unfinished} is an incomplete checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        ("truncate language_model/model.safetensors", "language_model/model.safetensors: unreadable (SafetensorError"),
        ("delete language_model/model.safetensors", "language_model/model.safetensors is missing"),
        ("delete language_model", "language_model/config.json is missing"),
        ("truncate policy.safetensors", "policy.safetensors: unreadable (SafetensorError"),
        ("delete tokenizer", "tokenizer is missing"),
    ],
)
def test_a_damaged_export_names_its_file_not_a_recipe_key(exported, tmp_path, damage, named):
    out = Path(shutil.copytree(exported[1], tmp_path / "export"))
    verb, what = damage.split()
    path = out / what
    if verb == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    with pytest.raises(CheckpointError) as refused:
        VLAPolicy.from_pretrained(out)
    message = str(refused.value)
    assert f"{out}/{named}" in message and f"the checkpoint or export {out} is damaged or incomplete" in message
    assert "recipe" not in message and "model.language" not in message


@pytest.mark.parametrize("variant", ["use_rslora", "use_dora"])
def test_rslora_and_dora_train_and_export_as_defined(tmp_path, variant):
    """rsLoRA scales B A by alpha / sqrt(r); DoRA rescales each row of W + (alpha / r) B A to its trained
    magnitude. The merged export weight is checked against those definitions, computed by hand from
    the checkpoint's tensors, and the export acts as the checkpoint (whose layers run the adapters)."""
    train(
        tiny_recipe(
            tmp_path,
            "model.lora.enabled=true",
            f"model.lora.r={R}",
            f"model.lora.alpha={ALPHA}",
            f"model.lora.{variant}=true",
            "optim.groups.language_model.lr=0.05",
            "train.steps=2",
            "checkpoint.every=2",
            "train.val_every=0",
        )
    )
    ckpt = tmp_path / "run" / "checkpoints" / "step_000002"
    assert cli(["export", str(ckpt), str(tmp_path / "export")]) == 0
    trained = load_file(str(ckpt / "model.safetensors"))
    prefix = "language_model.base_model.model.model.layers.0.self_attn.q_proj."
    base, a, b = (trained[prefix + k] for k in ("base_layer.weight", "lora_A.default.weight", "lora_B.default.weight"))
    if variant == "use_rslora":
        expected = base + (ALPHA / R**0.5) * b @ a
    else:
        magnitude = trained[prefix + "lora_magnitude_vector.default.weight"]  # (out,), trained from ||W|| per row
        assert (magnitude - base.norm(dim=1)).abs().max() > 1e-4
        direction = base + (ALPHA / R) * b @ a
        expected = (magnitude / direction.norm(dim=1))[:, None] * direction
    assert (expected - base).abs().max() > 1e-3
    merged = load_file(str(tmp_path / "export" / "language_model" / "model.safetensors"))
    torch.testing.assert_close(merged["model.layers.0.self_attn.q_proj.weight"], expected, atol=1e-6, rtol=1e-5)
    frames = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    state = np.random.default_rng(1).normal(size=(2, 3)).astype(np.float32)
    acts = [VLAPolicy.from_pretrained(d).predict_action(frames, "pick", state) for d in (ckpt, tmp_path / "export")]
    np.testing.assert_allclose(acts[1], acts[0], atol=1e-5)


def test_export_honours_ema_and_records_which_weights_it_holds(tmp_path, capsys):
    """export always took the weight average; now --no-ema exports the trained weights, model_meta.json
    says which, and an export of the average refuses to load as the trained weights."""
    train(tiny_recipe(tmp_path, "train.ema_decay=0.5", "train.steps=2", "checkpoint.every=2", "train.val_every=0"))
    ckpt = tmp_path / "run" / "checkpoints" / "step_000002"
    assert cli(["export", str(ckpt), str(tmp_path / "average")]) == 0
    assert cli(["export", str(ckpt), str(tmp_path / "trained"), "--no-ema"]) == 0
    frames = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    state = np.zeros(3, np.float32)
    actions = {}
    for name, ema in (("average", True), ("trained", False)):
        assert json.loads((tmp_path / name / "model_meta.json").read_text())["ema"] is ema
        actions[name] = VLAPolicy.from_pretrained(tmp_path / name, ema=ema).predict_action(frames, "go", state)
        want = VLAPolicy.from_pretrained(ckpt, ema=ema).predict_action(frames, "go", state)
        np.testing.assert_allclose(actions[name], want, atol=1e-5)
    assert not np.allclose(actions["average"], actions["trained"], atol=1e-5)  # two different sets of weights
    with pytest.raises(CheckpointError, match="exported from the weight average .* load the checkpoint it came from"):
        VLAPolicy.from_pretrained(tmp_path / "average", ema=False)
    assert cli(["export", str(tmp_path / "average"), str(tmp_path / "again"), "--no-ema"]) == 2
    assert "exported from the weight average" in capsys.readouterr().err
