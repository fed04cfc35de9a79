"""VLA assembly: pretrained parts loaded from disk through recipe keys, forward shapes, the
action readout, and the errors a wrong recipe gets."""

from __future__ import annotations

import copy
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from tiny_models import (
    add_to_hf_cache,
    fake_batch,
    save_lm_dir,
    save_tokenizer_dir,
    save_vit_dir,
    save_vit_file,
    tiny_recipe,
)

from vla_ft import lm_compile
from vla_ft.backbones import PatchifyConv, build_language_model, build_vision_encoder, patchify_as_matmul
from vla_ft.config import RecipeError
from vla_ft.model import build_model
from vla_ft.tokenizer import load_tokenizer

DIMS = {"state_dim": 4, "action_dim": 3, "vocab_size": 284}  # gripper = action dim 2 (quickstart)


def _model(tmp_path: Path, *overrides: str, n_cameras: int = 1):
    torch.manual_seed(0)
    return build_model(tiny_recipe(tmp_path, *overrides), n_cameras=n_cameras, **DIMS).eval()


# ----------------------------------------------------------------------------- vision encoder
@pytest.mark.parametrize("layout", ["file", "dir"])
def test_vision_weights_load_from_a_local_file_or_directory(tmp_path, layout):
    saved = save_vit_file(tmp_path / "vit.safetensors") if layout == "file" else save_vit_dir(tmp_path / "vit")
    source = tmp_path / ("vit.safetensors" if layout == "file" else "vit")
    cfg = tiny_recipe(tmp_path, f"model.vision.pretrained={source}").model
    loaded = build_vision_encoder(cfg, n_cameras=1).backbones[0].state_dict()
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)


def test_a_directory_of_another_tags_weights_is_refused_naming_the_tag(tmp_path):
    """What ``hf download timm/vit_small_patch16_224.dino`` leaves records its weights' mean and std
    in config.json; under the bare name (augreg's 0.5/0.5) the encoder would see pixels normalised
    otherwise than in pretraining."""
    import timm
    from timm.models import save_for_hf
    from tiny_models import VIT_KWARGS

    dino = timm.create_model("vit_small_patch16_224.dino", pretrained=False, num_classes=0, img_size=64, **VIT_KWARGS)
    save_for_hf(dino, str(tmp_path / "dino"), safe_serialization=True)
    weights = f"model.vision.pretrained={tmp_path / 'dino'}"
    cfg = tiny_recipe(tmp_path, weights, "model.vision.name=vit_small_patch16_224").model
    with pytest.raises(
        RecipeError, match=r"records mean \[0.485, 0.456, 0.406\].*model.vision.name=vit_small_patch16_224.dino"
    ):
        build_vision_encoder(cfg, n_cameras=1)
    cfg = tiny_recipe(tmp_path, weights, "model.vision.name=vit_small_patch16_224.dino").model
    encoder = build_vision_encoder(cfg, n_cameras=1)
    assert torch.allclose(encoder.mean.flatten() / 255, torch.tensor([0.485, 0.456, 0.406]))


def test_vision_image_size_override_resamples_position_embeddings(tmp_path):
    saved = save_vit_file(tmp_path / "vit.safetensors")  # trained at 64 px: 4x4 patches
    weights = f"model.vision.pretrained={tmp_path / 'vit.safetensors'}"
    cfg = tiny_recipe(tmp_path, weights, "model.vision.img_size=32").model
    enc = build_vision_encoder(cfg, n_cameras=1)
    loaded = enc.backbones[0].state_dict()
    assert loaded["pos_embed"].shape == (1, 1 + 2 * 2, 32)  # class token + 2x2 patches
    assert torch.equal(loaded["pos_embed"][:, 0], saved["pos_embed"][:, 0])  # the class token's is kept
    assert torch.equal(loaded["blocks.0.attn.qkv.weight"], saved["blocks.0.attn.qkv.weight"])
    assert enc(torch.zeros(2, 1, 3, 32, 32, dtype=torch.uint8)).shape == (2, 4, 32)


def _sin_cos_reference(h: int, w: int, dim: int) -> torch.Tensor:
    """(h * w, dim), patches row by row: [sin(row f), sin(col f), cos(row f), cos(col f)],
    f = 10000^(-k / (dim / 4)), k = 0 .. dim / 4 - 1 (MAE's 2-D layout, written out)."""
    f = 10000.0 ** (-torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    r, c = rows.reshape(-1, 1) * f, cols.reshape(-1, 1) * f
    return torch.cat([r.sin(), c.sin(), r.cos(), c.cos()], dim=1).float()


def test_a_random_init_vit_starts_from_sin_cos_positions(tmp_path):
    vit = build_vision_encoder(tiny_recipe(tmp_path).model, n_cameras=1).backbones[0]
    (h, w), pos = vit.patch_embed.grid_size, vit.pos_embed.detach()[0]
    assert torch.allclose(pos[1:], _sin_cos_reference(h, w, pos.shape[1]), atol=1e-6)
    assert torch.equal(pos[0], torch.zeros_like(pos[0]))  # the class token's
    assert vit.pos_embed.requires_grad  # an init, learned from there
    timm_init = build_vision_encoder(tiny_recipe(tmp_path, "model.vision.position_init=timm").model, n_cameras=1)
    pos = timm_init.backbones[0].pos_embed.detach()
    assert 0.01 < pos.std() < 0.03  # timm's own: trunc_normal(std=0.02)
    odd = tiny_recipe(tmp_path, "model.vision.kwargs.embed_dim=34").model  # 2 heads of 17: no 4-way split
    with pytest.warns(UserWarning, match="width divisible by 4 \\(got 34\\)"):
        pos = build_vision_encoder(odd, n_cameras=1).backbones[0].pos_embed.detach()
    assert 0.01 < pos.std() < 0.03


def test_vision_weights_of_another_architecture_are_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"conv1.weight": torch.zeros(8, 3, 3, 3)}, str(tmp_path / "resnet.safetensors"))
    cfg = tiny_recipe(tmp_path, f"model.vision.pretrained={tmp_path / 'resnet.safetensors'}").model
    with pytest.raises(RecipeError, match=r"model.vision.pretrained: .* lacks \d+ of \d+ weights"):
        build_vision_encoder(cfg, n_cameras=1)
    save_vit_file(tmp_path / "vit.safetensors")
    wider = tiny_recipe(
        tmp_path, f"model.vision.pretrained={tmp_path / 'vit.safetensors'}", "model.vision.kwargs.embed_dim=48"
    ).model
    with pytest.raises(RecipeError, match="model.vision.pretrained: .* does not fit"):
        build_vision_encoder(wider, n_cameras=1)


def test_any_timm_model_cnn_patch_and_pooled_tokens(tmp_path):
    for features, tokens in (("patch", 2 * 2), ("pooled", 1)):  # resnet: stride 32 -> 64 px gives 2x2 cells
        cfg = tiny_recipe(
            tmp_path, "model.vision.name=resnet10t", "model.vision.kwargs={}", f"model.vision.features={features}"
        ).model
        enc = build_vision_encoder(cfg, n_cameras=2)
        out = enc(torch.zeros(3, 2, 3, 64, 64, dtype=torch.uint8))
        assert out.shape == (3, 2 * tokens, 512) and enc.width == 512


@pytest.mark.parametrize(("size", "patch"), [((32, 48), 16), ((35, 37), 16), ((12, 12), 4)])
def test_patchify_conv_equals_the_strided_conv(size, patch):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, patch, stride=patch)
    ours = copy.deepcopy(conv)
    patchify_as_matmul(ours)
    assert type(ours) is PatchifyConv and ours.state_dict().keys() == conv.state_dict().keys()
    x = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)
    conv, ours = conv.double(), ours.double()
    got, want = ours(x), conv(x)
    torch.testing.assert_close(got, want)
    g = torch.randn_like(want)
    torch.testing.assert_close(
        torch.autograd.grad(got, (x, ours.weight, ours.bias), g),
        torch.autograd.grad(want, (x, conv.weight, conv.bias), g),
    )


def test_only_patchifying_convs_become_matmuls(tmp_path):
    convs = [
        torch.nn.Conv2d(3, 8, 3, stride=3, padding=1),
        torch.nn.Conv2d(3, 8, 4, stride=2),
        torch.nn.Conv2d(4, 8, 2, 2, groups=2),
        torch.nn.Conv2d(4, 8, 1),  # a CNN's pointwise conv
    ]
    for conv in convs:
        patchify_as_matmul(conv)
        assert type(conv) is torch.nn.Conv2d
    encoder = build_vision_encoder(tiny_recipe(tmp_path).model, n_cameras=1)
    assert type(encoder.backbones[0].patch_embed.proj) is PatchifyConv


def test_pixels_normalised_with_the_backbones_stats_and_each_camera_in_its_own_row(tmp_path):
    """uint8 frames -> (x / 255 - mean) / std with timm's own data config, per image; the shared
    encoder's one batched call keeps every camera's tokens in its own batch row, in camera order."""
    import timm

    enc = build_vision_encoder(tiny_recipe(tmp_path).model, n_cameras=2).eval()
    bb = enc.backbones[0]
    cfg = timm.data.resolve_data_config({}, model=bb)
    mean, std = torch.tensor(cfg["mean"]).view(3, 1, 1), torch.tensor(cfg["std"]).view(3, 1, 1)
    images = torch.randint(0, 256, (3, 2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = enc(images)
        for row in range(3):
            want = [
                bb.forward_features(((images[row, cam].float() / 255 - mean) / std)[None])[:, bb.num_prefix_tokens :]
                for cam in range(2)
            ]
            torch.testing.assert_close(got[row : row + 1], torch.cat(want, 1), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- language model
@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_language_model_and_tokenizer_load_from_local_directories(tmp_path, model_type):
    saved = save_lm_dir(tmp_path / "lm", model_type, dtype=torch.bfloat16)  # as hub LMs ship
    save_tokenizer_dir(tmp_path / "tok")
    recipe = tiny_recipe(
        tmp_path,
        f"model.language.name={tmp_path / 'lm'}",
        "model.language.config={}",
        f"model.language.tokenizer={tmp_path / 'tok'}",
    )
    lm = build_language_model(recipe.model, vocab_size=284)
    assert lm.config.model_type == model_type and lm.config._attn_implementation == lm_compile.NAME
    loaded = lm.state_dict()
    for k, v in saved.items():  # float32 master weights holding exactly the bf16 values
        assert loaded[k].dtype == torch.float32 and torch.equal(loaded[k], v.float()), k
    tokenizer = load_tokenizer(recipe.model.language.tokenizer)
    assert len(tokenizer) == 284 and tokenizer("pick up the red block")["input_ids"][:2] == [4, 5]


def test_a_larger_tokenizer_grows_the_embeddings(tmp_path):
    save_lm_dir(tmp_path / "lm")  # 284 rows
    lm = build_language_model(
        tiny_recipe(tmp_path, f"model.language.name={tmp_path / 'lm'}", "model.language.config={}").model,
        vocab_size=300,
    )
    assert lm.get_input_embeddings().num_embeddings == 300 and lm.get_output_embeddings().out_features == 300


def test_lm_weights_missing_from_the_directory_are_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    save_lm_dir(tmp_path / "lm")
    weights = load_file(str(tmp_path / "lm" / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if "q_proj" not in k}, str(tmp_path / "lm" / "model.safetensors"))
    with pytest.raises(RecipeError, match=r"model.language.name: 2 weights missing .*q_proj"):
        build_language_model(
            tiny_recipe(tmp_path, f"model.language.name={tmp_path / 'lm'}", "model.language.config={}").model, 284
        )


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_truncated_pretrained_weights_are_errors_naming_the_key(tmp_path):
    """An interrupted download or copy leaves a truncated safetensors file: a recipe error, not a traceback."""
    vit, lm = tmp_path / "vit.safetensors", tmp_path / "lm"
    save_vit_file(vit)
    save_lm_dir(lm)
    _truncate(vit)
    _truncate(lm / "model.safetensors")
    with pytest.raises(RecipeError, match=f"model.vision.pretrained: {vit} is damaged"):
        build_vision_encoder(tiny_recipe(tmp_path, f"model.vision.pretrained={vit}").model, 1)
    with pytest.raises(RecipeError, match=f"model.language.name: a weights file in '{lm}' is damaged"):
        build_language_model(tiny_recipe(tmp_path, f"model.language.name={lm}", "model.language.config={}").model, 284)


def test_gradient_checkpointing_is_on_and_backward_runs(tmp_path):
    model = _model(tmp_path, "model.language.gradient_checkpointing=true").train()
    lm = model.language_model
    assert getattr(lm, "is_activation_checkpointing", None) or lm.is_gradient_checkpointing
    model(fake_batch(model))["actions"].sum().backward()
    assert model.action_queries.weight.grad is not None


def test_hub_names_resolve_offline_from_a_filled_cache(tmp_path, monkeypatch):
    """model.language.name=org/name and model.vision.pretrained=true on a machine without network:
    the documented way is a filled cache under HF_HOME plus HF_HUB_OFFLINE=1. huggingface_hub reads
    those variables at import, so the test sets the two constants they become."""
    lm_state = save_lm_dir(tmp_path / "lm")
    add_to_hf_cache(tmp_path / "hf", "tiny-org/tiny-lm", tmp_path / "lm")
    vit_state = save_vit_dir(tmp_path / "vit")
    add_to_hf_cache(tmp_path / "hf", "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k", tmp_path / "vit")  # timm's id
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    recipe = tiny_recipe(
        tmp_path, "model.language.name=tiny-org/tiny-lm", "model.language.config={}", "model.vision.pretrained=true"
    )
    lm = build_language_model(recipe.model, 284).state_dict()
    vit = build_vision_encoder(recipe.model, 1).backbones[0].state_dict()
    assert all(torch.equal(lm[k], v) for k, v in lm_state.items())
    assert all(torch.equal(vit[k], v) for k, v in vit_state.items())


# ----------------------------------------------------------------------------- assembly and readout
@pytest.mark.parametrize(
    ("n_cameras", "overrides", "prefix_tokens"),
    [
        (1, [], 16 + 1),  # 64 px / patch 16 -> 16 patch tokens, + the state token
        (2, [], 2 * 16 + 1),
        (2, ["model.proprio=false", "model.vision.per_camera=true"], 2 * 16),
        (2, ["model.vision.features=pooled", "model.gripper_head=false", "data.history=2"], 2 * 1 + 1),
    ],
)
def test_forward_shapes(tmp_path, n_cameras, overrides, prefix_tokens):
    model = _model(tmp_path, *overrides, n_cameras=n_cameras)
    batch = fake_batch(model, batch_size=2, target_len=3)
    prefix = model.embed_prefix(batch, model.language_model.get_input_embeddings()(batch["prompt_ids"]))
    assert prefix.shape == (2, prefix_tokens, 32)
    out = model(batch)
    assert out["actions"].shape == (2, 3, 3)  # (B, chunk, action_dim)
    assert ("gripper_logits" in out) == (model.gripper_head is not None)
    if model.gripper_head is not None:
        assert out["gripper_logits"].shape == (2, 3, 1)
    assert out["lm_logits"].shape == (2 * 3, 284) and out["lm_labels"].shape == (6,)
    assert len(model.vision_encoder.backbones) == (n_cameras if "model.vision.per_camera=true" in overrides else 1)


def test_readout_ignores_prompt_padding_and_the_language_target(tmp_path):
    model = _model(tmp_path)
    batch = fake_batch(model, batch_size=2, prompt_lens=(3, 5))  # row 0 carries 2 pad tokens
    together = model.trunk(batch)["readout"]
    alone = {k: v[:1] for k, v in batch.items()}
    alone["prompt_ids"], alone["prompt_mask"] = batch["prompt_ids"][:1, 2:], batch["prompt_mask"][:1, 2:]
    alone["target_ids"] = torch.randint(4, 40, (1, 4))  # a different target must not leak into the readout
    alone["target_mask"] = torch.ones(1, 4, dtype=torch.bool)
    torch.testing.assert_close(model.trunk(alone)["readout"], together[:1], atol=1e-5, rtol=1e-5)


def test_target_hidden_states_predict_the_next_token(tmp_path):
    """The last query position predicts target[0]; target position t predicts target[t + 1]."""
    model = _model(tmp_path)
    batch = fake_batch(model, batch_size=1, prompt_lens=(3,), target_len=3)
    out = model.trunk(batch)
    embeds = model.language_model.get_input_embeddings()
    prefix = model.embed_prefix(batch, embeds(batch["prompt_ids"]))
    seq = torch.cat([prefix, embeds(batch["prompt_ids"]), model.action_queries(1), embeds(batch["target_ids"])], 1)
    hidden = model.decoder(inputs_embeds=seq).last_hidden_state  # no padding: plain causal LM
    q_end = prefix.shape[1] + 3 + 3  # prefix + prompt + 3 queries
    torch.testing.assert_close(out["readout"], hidden[:, q_end - 3 : q_end], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["target_hidden"], hidden[:, q_end - 1 : q_end + 2], atol=1e-5, rtol=1e-5)


def test_action_tokens_target_uses_the_reserved_last_ids(tmp_path):
    from vla_ft.run_setup import build_components

    recipe = tiny_recipe(tmp_path, "data.language_target=action_tokens", "data.normalize=q01_q99")
    model, loss_fn, _, (tokenizer, data) = build_components(recipe, torch.device("cpu"))
    sample = data.train_set[0]
    bins, first = recipe.model.action_tokens_bins, len(tokenizer) - recipe.model.action_tokens_bins
    ids = sample["target_ids"][:-1]  # the last one is eos
    assert len(ids) == int(sample["action_mask"].sum()) * data.action_dim
    assert ((ids >= first) & (ids < first + bins)).all()
    assert tokenizer.convert_ids_to_tokens(int(ids[0])).startswith("<act_")
    from robot_data import collate

    out = model(collate([sample, data.train_set[1]], pad_id=0))
    total, parts = loss_fn(out, collate([sample, data.train_set[1]], pad_id=0))
    assert torch.isfinite(total) and "loss/language" in parts


def test_action_bins_are_never_said_as_special_tokens(tmp_path):
    """Qwen's vocabulary ends in its special tokens (eos, pad, <|im_start|>...): the last ids would
    make some action bins an end-of-text. The bins take the last ordinary ids; too many bins for the
    vocabulary, and bins on mean/std-normalised values (mostly clipped to the edge bins), are refused."""
    from vla_ft.config import RecipeError
    from vla_ft.data import action_token_ids
    from vla_ft.tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer(["pick", "up"], n_action_tokens=0)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    ids = action_token_ids(tok, 2)
    assert tok.convert_ids_to_tokens(ids) == ["pick", "up"] and len(tok) - 1 not in ids
    with pytest.raises(RecipeError, match="model.action_tokens_bins: 3 bins, but the tokenizer has 2 ordinary"):
        action_token_ids(tok, 3)
    with pytest.raises(RecipeError, match="data.normalize: mean_std with data.language_target=action_tokens"):
        tiny_recipe(tmp_path, "data.language_target=action_tokens")


def test_lm_labels_ignore_the_target_padding(tmp_path):
    model = _model(tmp_path)
    batch = fake_batch(model, batch_size=2, target_len=3)
    batch["target_mask"][0, 1:] = False  # row 0: one real target token, then right padding
    labels = model(batch)["lm_labels"].view(2, 3)
    assert labels[0].tolist() == [int(batch["target_ids"][0, 0]), -100, -100]
    assert labels[1].tolist() == batch["target_ids"][1].tolist()


def test_a_frozen_module_between_trainable_ones_passes_their_gradients(tmp_path):
    """Projector and LM frozen, vision encoder and action queries trained: the frozen modules must
    still run under autograd, or the modules upstream of them get no gradient."""
    model = _model(tmp_path)
    model.set_frozen({"projector", "proprio_encoder", "language_model"})
    model.train()
    model(fake_batch(model))["actions"].square().sum().backward()
    for name in ("vision_encoder", "action_queries"):
        grads = [p.grad for p in getattr(model, name).parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), name
    assert all(p.grad is None for p in model.projector.parameters())


# ----------------------------------------------------------------------------- errors naming the key
def test_wrong_recipes_are_errors_naming_the_key(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # never try the network
    with pytest.raises(RecipeError, match=r"model.vision.name: unknown timm model 'vit_tiny_patch16_22'.*did you mean"):
        build_vision_encoder(tiny_recipe(tmp_path, "model.vision.name=vit_tiny_patch16_22").model, 1)
    with pytest.raises(RecipeError, match="model.vision.pretrained: path does not exist"):
        build_vision_encoder(tiny_recipe(tmp_path, f"model.vision.pretrained={tmp_path / 'no.safetensors'}").model, 1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecipeError, match="model.vision.pretrained: no weights file in"):
        build_vision_encoder(tiny_recipe(tmp_path, f"model.vision.pretrained={tmp_path / 'empty'}").model, 1)
    with pytest.raises(RecipeError, match="model.language.name: directory not found"):
        build_language_model(
            tiny_recipe(tmp_path, f"model.language.name={tmp_path / 'nope'}", "model.language.config={}").model, 284
        )
    with pytest.raises(RecipeError, match="model.language.name: cannot load 'no-such-org/no-such-lm'"):
        build_language_model(
            tiny_recipe(tmp_path, "model.language.name=no-such-org/no-such-lm", "model.language.config={}").model, 284
        )
    with pytest.raises(RecipeError, match="model.language.tokenizer: tokenizer directory not found"):
        load_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(RecipeError, match="model.language.tokenizer: cannot load a tokenizer from directory"):
        load_tokenizer(str(tmp_path / "empty"))
    with pytest.raises(RecipeError, match="unknown built-in tokenizer 'builtin:tiy'; the built-in one is 'builtin:t"):
        load_tokenizer("builtin:tiy")


def test_a_camera_count_that_does_not_match_the_model_is_an_error(tmp_path):
    for overrides in ([], ["model.vision.per_camera=true"]):
        model = _model(tmp_path, *overrides, n_cameras=2)
        with pytest.raises(RecipeError, match=r"data.cameras: the model was built for 2 camera\(s\).* provides 1"):
            model(fake_batch(model, n_cameras=1))


def test_train_mode_reaches_every_submodule_and_keeps_frozen_ones_in_eval(tmp_path):
    """VLA.train skips children it already put in their mode (a per-step host cost), but a
    replaced child is walked: a LoRA wrapper is born in train mode around an LM that
    ``from_pretrained`` left in eval, and its dropout must come back on."""
    model = _model(tmp_path)
    model.set_frozen({"vision_encoder"})
    model.train()
    lm = model.language_model
    lm.eval()  # what from_pretrained returns
    model.language_model = torch.nn.Sequential(lm)  # a wrapper: itself in train mode, its inside in eval
    model.train()
    assert all(m.training for m in model.language_model.modules())
    assert not any(m.training for m in model.vision_encoder.modules())  # frozen: eval
    model.eval()
    assert not any(m.training for m in model.modules())
    model.set_frozen(set())  # thawed while in eval: stays eval until train()
    model.train()
    assert all(m.training for m in model.modules())


def test_arguments_the_libraries_refuse_are_errors_naming_the_free_form_key(tmp_path):
    """model.vision.kwargs and model.language.config go to timm and transformers as they are: what those
    refuse is a RecipeError naming the key and quoting the library, not a traceback from deep inside."""
    for overrides, message in (
        (["model.vision.kwargs.bogus_kw=1"], r"model.vision.kwargs: timm.create_model\('vit_tiny.*unexpected keyword"),
        (["model.vision.kwargs.embed_dim=33"], "model.vision.kwargs: .* AssertionError: dim should be divisible"),
    ):
        with pytest.raises(RecipeError, match=message):
            build_vision_encoder(tiny_recipe(tmp_path, *overrides).model, n_cameras=1)
    for overrides, message in (
        (
            ["model.language.config.rms_norm_eps='1e-6'"],
            "model.language.config: transformers refused it: .*rms_norm_eps",
        ),
        (["model.language.config.hidden_size=x"], "model.language.config: .*hidden_size"),
    ):
        with pytest.raises(RecipeError, match=message):
            build_language_model(tiny_recipe(tmp_path, *overrides).model, vocab_size=284)
