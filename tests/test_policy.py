"""VLAPolicy: loads from the checkpoint directory alone, prepares inputs exactly like training,
and returns actions in the dataset's units."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_models import save_lm_dir, save_tokenizer_dir, save_vit_file, tiny_recipe

from vla_ft import VLAPolicy
from vla_ft.checkpoint import CheckpointError
from vla_ft.train import main as train

TASK = "pick up the red block"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A 2-step run from local pretrained parts (deleted afterwards), with 2 state frames per sample
    and a tokenizer that puts a BOS first (as Llama's)."""
    tmp = tmp_path_factory.mktemp("policy")
    save_vit_file(tmp / "parts" / "vit.safetensors")
    save_lm_dir(tmp / "parts" / "lm")
    save_tokenizer_dir(tmp / "parts" / "tok", bos=True)
    torch.set_num_threads(1)
    train(
        tiny_recipe(
            tmp,
            f"model.vision.pretrained={tmp / 'parts' / 'vit.safetensors'}",
            f"model.language.name={tmp / 'parts' / 'lm'}",
            "model.language.config={}",
            f"model.language.tokenizer={tmp / 'parts' / 'tok'}",
            "data.history=2",
            "train.steps=2",
            "checkpoint.every=2",
            "train.val_every=2",
        )
    )
    shutil.rmtree(tmp / "parts")  # inference must not need the pretrained parts again
    return tmp / "run"


@pytest.fixture
def offline(monkeypatch):
    """No network and no dataset: loading a policy must need neither."""
    import robot_data
    import vla_ft.data

    def refuse(*args, **kwargs):
        raise AssertionError("the policy tried to read the dataset")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(robot_data, "build_reader", refuse)
    monkeypatch.setattr(vla_ft.data, "build_reader", refuse)


def _frame(seed: int, size: int = 80) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_checkpoint_carries_what_inference_needs(trained):
    ckpt = trained / "checkpoints" / "step_000002"
    meta = json.loads((ckpt / "model_meta.json").read_text())
    assert (meta["state_dim"], meta["action_dim"], meta["chunk"], meta["history"]) == (3, 3, 3, 2)
    assert meta["cameras"] == ["observation.images.top"] and meta["image_size"] == 64
    assert meta["gripper"] == {"dims": [2], "closed_is_high": True, "threshold": 0.5}
    assert meta["prompt_prefix"] == [2]  # the tokenizer's BOS, as the prompts were trained
    assert json.loads((ckpt / "language_model" / "config.json").read_text())["model_type"] == "qwen2"


def test_load_is_bit_exact_from_the_directory_alone(trained, offline):
    ckpt = trained / "checkpoints" / "step_000002"
    policy = VLAPolicy.from_pretrained(ckpt)
    saved = load_file(str(ckpt / "model.safetensors"))
    loaded = policy.model.state_dict()
    assert saved.keys() <= loaded.keys()
    assert all(torch.equal(loaded[k], v) for k, v in saved.items())
    pair = {"language_model.model.embed_tokens.weight", "language_model.lm_head.weight"}  # tied in this LM
    assert len(loaded.keys() - saved.keys()) == 1 and loaded.keys() - saved.keys() <= pair  # stored once
    assert torch.equal(*(loaded[k] for k in pair))
    assert VLAPolicy.from_pretrained(trained).meta == policy.meta  # a run directory -> its newest checkpoint


def test_predict_action_matches_the_training_pipeline(trained, offline, monkeypatch):
    """Raw frame + instruction + raw state through the policy == the dataset sample through the model."""
    from robot_data import collate
    from vla_ft.config import load_recipe
    from vla_ft.data import build_data
    from vla_ft.metrics import real_actions

    policy = VLAPolicy.from_pretrained(trained)
    monkeypatch.undo()  # the reference below reads the dataset; the policy is already loaded
    ckpt = trained / "checkpoints" / "step_000002"
    recipe = load_recipe(ckpt / "config.yaml")
    data = build_data(recipe, policy.prompts.tokenizer, json.loads((ckpt / "norm_stats.json").read_text()))
    ds = data.val_set
    assert ds[0]["prompt_ids"][0] == 2  # trained with the BOS the policy must add too
    for index in (0, 1, 5):  # frame 0 and 1: the state history is clamped at the episode start
        episode, t = ds.locate(index)
        frame = data.reader.frames(episode.index, "observation.images.top", [t])[0]
        states = data.reader.numeric(episode.index).state[[max(t - 1, 0), t]]
        got = policy.predict_action({"observation.images.top": frame}, episode.task, states)
        with torch.no_grad():
            want = real_actions(policy.model(collate([ds[index]])), data.normalizer, [2], True)[0].numpy()
        np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("closed", [True, False])
def test_actions_come_back_in_real_units(trained, offline, closed):
    policy = VLAPolicy.from_pretrained(trained)
    bias = torch.tensor([0.5, -1.5, 7.0])  # normalised action the head will output at every step
    with torch.no_grad():
        policy.model.action_head[-1].weight.zero_()
        policy.model.action_head[-1].bias.copy_(bias)
        policy.model.gripper_head[-1].weight.zero_()
        policy.model.gripper_head[-1].bias.fill_(3.0 if closed else -3.0)
    stats = json.loads((trained / "checkpoints" / "step_000002" / "norm_stats.json").read_text())
    assert stats["mode"] == "mean_std" and stats["raw_action_dims"] == [2]
    mean, std = stats["stats"]["action"]["mean"], stats["stats"]["action"]["std"]
    gripper = stats["stats"]["action"]["max" if closed else "min"][2]  # closed = high for this task
    expected = [0.5 * std[0] + mean[0], -1.5 * std[1] + mean[1], gripper]
    actions = policy.predict_action(_frame(0), TASK, np.zeros((2, 3), np.float32))
    assert actions.shape == (3, 3) and actions.dtype == np.float32
    np.testing.assert_allclose(actions, np.tile(expected, (3, 1)), rtol=1e-6, atol=1e-7)


def test_a_missing_state_reading_acts_as_in_training(trained, offline):
    """A NaN state entry (a sensor dropout) is zeroed after normalisation, as RobotDataset does:
    the same actions as that entry at its dataset mean, not an error blaming the checkpoint."""
    policy = VLAPolicy.from_pretrained(trained)
    stats = json.loads((trained / "checkpoints" / "step_000002" / "norm_stats.json").read_text())
    assert stats["mode"] == "mean_std"
    state = np.random.default_rng(1).normal(size=(2, 3)).astype(np.float32)
    at_mean = state.copy()
    state[1, 0], at_mean[1, 0] = np.nan, stats["stats"]["state"]["mean"][0]
    got = policy.predict_action(_frame(0), TASK, state)
    np.testing.assert_allclose(got, policy.predict_action(_frame(0), TASK, at_mean), atol=1e-5)


def test_a_batch_gives_the_rows_of_single_calls(trained, offline):
    policy = VLAPolicy.from_pretrained(trained)
    frames = np.stack([_frame(i) for i in range(3)])
    tasks = [TASK, "pick up the blue block", "release the green block over the bin"]  # different lengths: padding
    states = np.random.default_rng(0).normal(size=(3, 2, 3)).astype(np.float32)
    batch = policy.predict_action(frames, tasks, states)
    assert batch.shape == (3, 3, 3)
    for i in range(3):
        np.testing.assert_allclose(batch[i], policy.predict_action(frames[i], tasks[i], states[i]), atol=1e-5)
    one_task = policy.predict_action([frames], TASK, states)  # a list of cameras, one instruction for all rows
    np.testing.assert_allclose(one_task[0], batch[0], atol=1e-5)


def test_a_checkpoint_that_recorded_no_prompt_prefix_is_prompted_without_one(trained, offline, tmp_path, monkeypatch):
    """Checkpoints written before ``prompt_prefix`` was recorded trained without the tokenizer's BOS:
    their policy, their evaluation and their resumed run prompt without it too."""
    from vla_ft.evaluate import load_evaluation
    from vla_ft.run_setup import build_components

    ckpt = tmp_path / "old"
    shutil.copytree(trained / "checkpoints" / "step_000002", ckpt)
    meta = json.loads((ckpt / "model_meta.json").read_text())
    del meta["prompt_prefix"]
    (ckpt / "model_meta.json").write_text(json.dumps(meta))
    old, new = VLAPolicy.from_pretrained(ckpt), VLAPolicy.from_pretrained(trained)
    assert new._prompt(TASK, 1)["prompt_ids"][0].tolist() == [2, *old._prompt(TASK, 1)["prompt_ids"][0].tolist()]
    monkeypatch.undo()  # evaluation and a resumed run read the dataset
    for directory, prefix in ((ckpt, []), (trained / "checkpoints" / "step_000002", [2])):
        assert load_evaluation(directory).data.prompt_prefix == prefix
        recipe = tiny_recipe(tmp_path, "data.history=2")  # as trained, less the pretrained parts (gone)
        _, _, _, (_, data) = build_components(recipe, torch.device("cpu"), resume_from=directory)
        assert data.prompt_prefix == prefix and data.train_set[0]["prompt_ids"][: len(prefix)].tolist() == prefix


def test_a_dict_of_cameras_is_read_in_the_models_camera_order(tmp_path):
    """Camera names not in sorted order: a dict gives the actions of the list in the checkpoint's order."""
    from tiny_models import save_tokenizer_dir

    from robot_data import Normalizer, SyntheticReader, compute_stats
    from vla_ft.model import build_model
    from vla_ft.model_files import model_meta
    from vla_ft.tokenizer import load_tokenizer

    save_tokenizer_dir(tmp_path / "tok")
    recipe = tiny_recipe(tmp_path, f"model.language.tokenizer={tmp_path / 'tok'}")
    torch.manual_seed(0)
    model = build_model(recipe, state_dim=3, action_dim=3, n_cameras=2, vocab_size=284).eval()
    cameras = ["top", "left"]
    normalizer = Normalizer(compute_stats(SyntheticReader(episodes=2, episode_length=5), range(2)), "mean_std", [2])
    tokenizer = load_tokenizer(recipe.model.language.tokenizer)
    # what model_meta reads of a DataBundle
    data = SimpleNamespace(cameras=cameras, prompt_prefix=[], reader=SimpleNamespace(fps=10.0))
    policy = VLAPolicy(model, model_meta(model, recipe, data), normalizer, tokenizer, torch.device("cpu"))
    top, left, state = _frame(0), _frame(1), np.zeros(3, np.float32)
    in_order = policy.predict_action([top, left], TASK, state)
    assert not np.allclose(in_order, policy.predict_action([left, top], TASK, state))  # the order matters
    np.testing.assert_array_equal(policy.predict_action({"left": left, "top": top}, TASK, state), in_order)


def test_wrong_inputs_are_errors_naming_the_argument(trained, offline):
    policy = VLAPolicy.from_pretrained(trained)
    state = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match=r"images: this policy needs 1 camera\(s\)"):
        policy.predict_action([_frame(0), _frame(1)], TASK, state)
    with pytest.raises(ValueError, match=r"images: expected cameras \['observation.images.top'\], got \['wrist'\]"):
        policy.predict_action({"wrist": _frame(0)}, TASK, state)
    with pytest.raises(ValueError, match="images\\['observation.images.top'\\]: expected uint8"):
        policy.predict_action(_frame(0).astype(np.float32), TASK, state)
    for empty in (_frame(0)[:0], _frame(0)[:, :0]):  # a dropped camera frame must not become a blank image
        with pytest.raises(ValueError, match=r"with H, W > 0 .* got uint8 \((0, \d+|\d+, 0), 3\)"):
            policy.predict_action(empty, TASK, state)
    with pytest.raises(ValueError, match=r"state: expected shape \(2, 3\)"):
        policy.predict_action(_frame(0), TASK, np.zeros(3, np.float32))  # history is 2
    with pytest.raises(ValueError, match="instruction: 2 instructions for a batch of 3"):
        policy.predict_action(np.stack([_frame(i) for i in range(3)]), [TASK, TASK], np.zeros((3, 2, 3), np.float32))
    with pytest.raises(ValueError, match="instruction: a str or a list of str, got NoneType"):
        policy.predict_action(_frame(0), None, np.zeros((2, 3), np.float32))


def test_a_directory_that_is_not_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        VLAPolicy.from_pretrained(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="no model_meta.json and no complete checkpoint"):
        VLAPolicy.from_pretrained(tmp_path)


def test_a_runs_checkpoints_directory_loads_its_newest(trained):
    assert VLAPolicy.from_pretrained(trained / "checkpoints").directory == trained / "checkpoints" / "step_000002"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_cuda_without_a_gpu_is_refused_naming_the_argument(trained):
    with pytest.raises(ValueError, match=r"device: cuda asked, but this torch sees no GPU"):
        VLAPolicy.from_pretrained(trained, "cuda")


def _copy_checkpoint(trained: Path, tmp_path: Path, name: str = "step_000002") -> Path:
    """A copy of the trained checkpoint to damage, under ``tmp_path/run/checkpoints/<name>``."""
    return Path(shutil.copytree(trained / "checkpoints" / "step_000002", tmp_path / "run" / "checkpoints" / name))


def test_an_incomplete_checkpoint_is_refused(trained, tmp_path):
    """No COMPLETE file: the save was interrupted (or is running); a .tmp_ directory is an unfinished write."""
    unfinished = _copy_checkpoint(trained, tmp_path)
    (unfinished / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match="incomplete checkpoint") as refused:
        VLAPolicy.from_pretrained(unfinished)
    assert str(unfinished) in str(refused.value) and f"load the run directory {tmp_path / 'run'}" in str(refused.value)
    staging = _copy_checkpoint(trained, tmp_path, ".tmp_step_000004")  # COMPLETE written, not yet renamed
    with pytest.raises(CheckpointError, match=r"\.tmp_step_000004 is an unfinished save or export"):
        VLAPolicy.from_pretrained(staging)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):  # the run has no complete one
        VLAPolicy.from_pretrained(tmp_path / "run")


def test_best_and_latest_pointers_resolve_to_their_checkpoint(trained, tmp_path):
    from vla_ft.checkpoint import write_pointer
    from vla_ft.policy import resolve_directory

    ckpts = trained / "checkpoints"
    assert resolve_directory(ckpts / "best") == ckpts / "step_000002"  # as the run wrote it
    older, newer = _copy_checkpoint(trained, tmp_path, "step_000001"), _copy_checkpoint(trained, tmp_path)
    root = older.parent
    write_pointer(root, "best", older.name)
    write_pointer(root, "latest", newer.name)
    assert resolve_directory(root / "best") == older and resolve_directory(root / "latest") == newer
    assert VLAPolicy.from_pretrained(root / "best").directory == older
    shutil.rmtree(older)
    with pytest.raises(CheckpointError, match=f"{root / 'best'} names 'step_000001', which is not a complete"):
        resolve_directory(root / "best")


def test_torch_tensors_are_frames(trained, offline):
    policy = VLAPolicy.from_pretrained(trained)
    frames = np.stack([_frame(i) for i in range(2)])
    state = np.zeros((2, 2, 3), np.float32)
    want = policy.predict_action(frames, TASK, state)
    tensor = torch.from_numpy(frames)
    one = policy.predict_action(frames[0], TASK, state[0])
    np.testing.assert_array_equal(policy.predict_action(tensor[0], TASK, state[0]), one)  # bare tensor, one frame
    np.testing.assert_array_equal(policy.predict_action(tensor, TASK, torch.from_numpy(state)), want)  # a batch
    np.testing.assert_array_equal(policy.predict_action({"observation.images.top": tensor}, TASK, state), want)
    np.testing.assert_array_equal(policy.predict_action([tensor], TASK, state), want)
    with pytest.raises(ValueError, match=r"images\['observation.images.top'\]: expected uint8 .* got float32"):
        policy.predict_action(tensor.float(), TASK, state)


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        ("truncate model.safetensors", "model.safetensors: unreadable (SafetensorError"),
        ("delete language_model", "language_model/config.json is missing"),
        ("delete language_model/config.json", "language_model/config.json is missing"),
        ("delete tokenizer", "tokenizer is missing"),
        ("drop norm_stats.json stats", "norm_stats.json: unreadable (KeyError: 'stats')"),
        ("drop model_meta.json chunk", "model_meta.json: lacks chunk"),
        ("drop model_meta.json gripper", "model_meta.json: lacks gripper.dims, gripper.closed_is_high"),
    ],
)
def test_a_damaged_checkpoint_names_the_file(trained, tmp_path, damage, named):
    ckpt = _copy_checkpoint(trained, tmp_path)
    verb, what, *key = damage.split()
    path = ckpt / what
    if verb == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif verb == "delete":
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    else:
        content = json.loads(path.read_text())
        del content[key[0]]
        path.write_text(json.dumps(content))
    with pytest.raises(CheckpointError) as refused:
        VLAPolicy.from_pretrained(ckpt)
    message = str(refused.value)
    assert f"{ckpt}/{named}" in message and f"the checkpoint or export {ckpt} is damaged or incomplete" in message
    assert "recipe" not in message  # the recipe is not what is wrong


def test_non_finite_outputs_are_an_error_naming_the_checkpoint(trained, offline):
    """A NaN weight gives NaN outputs; a NaN gripper logit must not be sent to the robot as 'open'."""
    from vla_ft.metrics import real_actions

    for head in ("action_head", "gripper_head"):
        policy = VLAPolicy.from_pretrained(trained)
        with torch.no_grad():
            getattr(policy.model, head)[-1].bias.fill_(float("nan"))
        with pytest.raises(CheckpointError, match="predicted non-finite") as refused:
            policy.predict_action(_frame(0), TASK, np.zeros((2, 3), np.float32))
        assert str(trained / "checkpoints" / "step_000002") in str(refused.value)
    outputs = {"actions": torch.zeros(1, 1, 3), "gripper_logits": torch.tensor([[[float("nan")]]])}
    actions = real_actions(outputs, policy.normalizer, [2], True)[0, 0]
    assert actions[2].isnan() and actions[:2].isfinite().all()  # validation metrics show NaN, not 'open'


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_predict_as_fp32_within_their_precision(trained, offline, dtype):
    frames = np.stack([_frame(i) for i in range(3)])
    state = np.random.default_rng(0).normal(size=(3, 2, 3)).astype(np.float32)
    full = VLAPolicy.from_pretrained(trained).predict_action(frames, TASK, state)
    half = VLAPolicy.from_pretrained(trained, dtype=dtype)
    assert {p.dtype for p in half.model.parameters()} == {dtype}
    buffers = {n: b.dtype for n, b in half.model.named_buffers() if b.is_floating_point()}
    assert any("inv_freq" in n for n in buffers) and set(buffers.values()) == {torch.float32}  # as in training
    low = half.predict_action(frames, TASK, state)
    assert low.dtype == np.float32
    np.testing.assert_allclose(low[..., :2], full[..., :2], atol=0.05 * np.abs(full[..., :2]).max())


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        ({"dtype": torch.int8}, "dtype: the weights run in one of torch.float32, torch.bfloat16, torch.float16"),
        ({"dtype": torch.float64}, "dtype: .* got torch.float64"),  # loaded, then failed at the first prediction
        ({"device": "cpuu"}, "device: 'cpuu' is not a torch device"),  # was torch's RuntimeError
        ({"device": "meta"}, "device: meta holds no values"),  # was accepted, then every prediction failed
    ],
)
def test_a_dtype_or_device_no_policy_runs_in_is_refused_naming_the_argument(trained, argument, message):
    with pytest.raises(ValueError, match=message):
        VLAPolicy.from_pretrained(trained, **argument)


def test_a_chunk_runner_drives_a_loaded_policy(trained, offline):
    """ChunkRunner on a real policy: the first action of a receding horizon is the chunk's first
    row, and an ensembled gripper holds one of the dataset's two values."""
    from vla_ft import ChunkRunner

    policy = VLAPolicy.from_pretrained(trained)
    state = np.zeros((2, 3), np.float32)
    chunk = policy.predict_action(_frame(0), TASK, state)
    np.testing.assert_array_equal(ChunkRunner(policy, execute=2).act(_frame(0), TASK, state), chunk[0])
    runner = ChunkRunner(policy, ensemble=0.1)
    stats = json.loads((trained / "checkpoints" / "step_000002" / "norm_stats.json").read_text())["stats"]["action"]
    for seed in range(3):
        action = runner.act(_frame(seed), TASK, state)
        assert action.shape == (3,) and float(action[2]) in (stats["min"][2], stats["max"][2])
