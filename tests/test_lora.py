"""LoRA through peft: targets checked one by one, only adapters train, and the adapters we
save open with peft's own loader on a freshly loaded base model."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny_models import fake_batch, save_lm_dir, save_vit_file, tiny_recipe, tiny_vit

from vla_ft import optim
from vla_ft.config import RecipeError
from vla_ft.model import build_model
from vla_ft.model_files import ADAPTER_DIR, write_model_files

DIMS = {"state_dim": 4, "action_dim": 3, "vocab_size": 284}


def _lora_model(tmp_path: Path, *overrides: str):
    recipe = tiny_recipe(tmp_path, "model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8", *overrides)
    torch.manual_seed(0)
    model = build_model(recipe, n_cameras=1, **DIMS)
    model.set_frozen(optim.frozen_at(recipe, model, 0))
    return recipe, model


def _perturb_adapters(module: torch.nn.Module) -> None:
    """peft initialises lora_B to zero (adapters start as a no-op); make them do something."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("freeze_lm", [False, True])  # recipes/lora.yaml freezes the LM: its adapters still train
def test_only_the_adapters_of_the_targeted_layers_train(tmp_path, freeze_lm):
    recipe, model = _lora_model(
        tmp_path, "model.lora.target_modules=[q_proj, v_proj]", f"freeze.language_model={str(freeze_lm).lower()}"
    )
    base = model.language_model.get_base_model()
    # Independent count: r * (in + out) per adapted Linear, from the base model's layer shapes.
    expected = sum(
        4 * (m.base_layer.in_features + m.base_layer.out_features)
        for n, m in base.named_modules()
        if n.endswith(("q_proj", "v_proj"))
    )
    trainable = {n: p for n, p in model.language_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == expected == 4 * ((32 + 32) + (32 + 16))
    assert all(p.requires_grad for p in model.action_head.parameters())  # the rest trains as usual
    groups = optim.build_param_groups(recipe, model)
    in_lm_groups = {id(p) for g in groups if g["module"] == "language_model" for p in g["params"]}
    assert in_lm_groups == {id(p) for p in trainable.values()}


def test_a_lora_variant_without_adapters_is_refused(tmp_path):
    with pytest.raises(RecipeError, match=r"model\.lora\.use_dora: no adapter to shape"):
        tiny_recipe(tmp_path, "model.lora.use_dora=true")


def test_a_target_that_matches_nothing_is_an_error_naming_the_key(tmp_path):
    with pytest.raises(RecipeError, match=r"model.lora.target_modules: pattern\(s\) \['qkv_proj'\] match no module"):
        _lora_model(tmp_path, "model.lora.target_modules=[q_proj, qkv_proj]")
    with pytest.raises(RecipeError, match=r"model.lora.vision_target_modules: pattern\(s\) \['q_proj'\]"):
        _lora_model(tmp_path, "model.lora.vision=true", "model.lora.vision_target_modules=[qkv, q_proj]")
    with pytest.raises(RecipeError, match="model.lora.target_modules: empty"):
        _lora_model(tmp_path, "model.lora.target_modules=[]")
    with pytest.raises(RecipeError, match=r"target_modules: self_attn \(Qwen2Attention\) cannot carry an adapter"):
        _lora_model(tmp_path, "model.lora.target_modules=[q_proj, self_attn]")  # peft's traceback, named
    with pytest.raises(RecipeError, match="model.lora.alpha: must be finite and > 0, got 0"):
        tiny_recipe(tmp_path, "model.lora.enabled=true", "model.lora.alpha=0")  # adapters scaled by 0


def test_vision_adapters_a_forward_never_calls_are_refused(tmp_path):
    """timm's BEiT computes attention with F.linear on qkv.weight, bypassing the layer and its
    adapter: refused, naming the key; its attention output projection is called and trains."""
    beit = ["model.vision.name=beit_base_patch16_224", "model.lora.vision=true"]
    with pytest.raises(RecipeError, match=r"vision_target_modules: the adapters on \['qkv'\] never run: Beit"):
        _lora_model(tmp_path, *beit, "model.lora.vision_target_modules=[qkv, proj]")
    _lora_model(tmp_path, *beit, "model.lora.vision_target_modules=[proj]")


@pytest.mark.parametrize("features", ["patch", "pooled"])
def test_vision_adapters_go_only_on_layers_the_encoder_uses(tmp_path, features):
    """SigLIP's attention-pooling head runs only for pooled features: with patch tokens (OpenVLA's
    way) its ``proj`` gets no adapter, so the default ``[qkv, proj]`` adapts the blocks; a pattern
    that names only the idle head is refused. The adapters that are built all get a gradient."""
    siglip = [
        "model.vision.name=vit_base_patch16_siglip_224",
        "model.lora.vision=true",
        f"model.vision.features={features}",
    ]
    _, model = _lora_model(tmp_path, *siglip, "model.lora.vision_target_modules=[qkv, proj]")
    backbone = model.vision_encoder.backbones[0]
    adapted = {n.removeprefix("base_model.model.") for n, m in backbone.named_modules() if hasattr(m, "lora_A")}
    assert {"blocks.0.attn.qkv", "blocks.0.attn.proj"} <= adapted
    assert ("attn_pool.proj" in adapted) == (features == "pooled")
    _perturb_adapters(backbone)
    model.vision_encoder(torch.randint(0, 255, (1, 1, 3, 64, 64), dtype=torch.uint8)).sum().backward()
    assert all(p.grad is not None for n, p in backbone.named_parameters() if "lora_" in n)
    if features == "patch":
        with pytest.raises(
            RecipeError, match=r"pattern\(s\) \['kv'\] match only layers this model's forward never uses"
        ):
            _lora_model(tmp_path, *siglip, "model.lora.vision_target_modules=[qkv, kv]")


def test_a_cnn_is_probed_at_the_recipes_image_size(tmp_path):
    """Inception v3 needs at least 75 px: the adapter probe ran at 64 and crashed in a conv."""
    cnn = ["model.vision.name=inception_v3", "model.vision.img_size=160", "model.vision.kwargs={}"]
    _, model = _lora_model(tmp_path, *cnn, "model.lora.vision=true", "model.lora.vision_target_modules=[conv]")
    assert any(hasattr(m, "lora_A") for m in model.vision_encoder.modules())


def test_all_linear_is_the_only_entry_in_any_case(tmp_path):
    with pytest.raises(RecipeError, match="all-linear adapts every linear layer, so it must be the only entry"):
        _lora_model(tmp_path, "model.lora.target_modules=[all-linear, lm_head]")
    _, model = _lora_model(tmp_path, "model.lora.target_modules=[ALL-LINEAR]")
    assert any(n.endswith("down_proj") for n, m in model.language_model.named_modules() if hasattr(m, "lora_A"))


def test_a_group_for_vision_adapters_alone_is_accepted(tmp_path):
    """Vision LoRA without LM LoRA: the frozen encoder's adapters train, so its group is read."""
    vision = ["model.lora.vision=true", "freeze.vision_encoder=true", "optim.groups.vision_encoder.lr=1e-4"]
    tiny_recipe(tmp_path, *vision)
    with pytest.raises(RecipeError, match="optim.groups.language_model: freeze.language_model is true"):
        tiny_recipe(tmp_path, *vision, "freeze.language_model=true", "optim.groups.language_model.lr=1e-4")


def test_all_linear_shorthand_adapts_every_linear_layer_of_the_lm(tmp_path):
    _, model = _lora_model(tmp_path, "model.lora.target_modules=[all-linear]")
    adapted = {n.rsplit(".", 1)[-1] for n, m in model.language_model.named_modules() if hasattr(m, "lora_A")}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= adapted
    assert "lm_head" not in adapted  # peft keeps the output layer out of all-linear


@pytest.mark.parametrize("variant", ["lora", "use_dora"])
def test_peft_opens_our_adapter_on_a_freshly_loaded_base_lm(tmp_path, variant):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    save_lm_dir(tmp_path / "lm")
    extra = [f"model.lora.{variant}=true"] if variant != "lora" else []
    recipe, model = _lora_model(tmp_path, f"model.language.name={tmp_path / 'lm'}", "model.language.config={}", *extra)
    _perturb_adapters(model.language_model)
    run = SimpleNamespace(
        model=model,
        recipe=recipe,
        data=SimpleNamespace(cameras=["observation.images.top"], prompt_prefix=[], reader=SimpleNamespace(fps=10.0)),
    )
    write_model_files(run, tmp_path / "ckpt")

    config = json.loads((tmp_path / "ckpt" / ADAPTER_DIR / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["task_type"] == "CAUSAL_LM"
    assert config["use_dora"] == (variant == "use_dora")
    base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "lm"), dtype=torch.float32)
    theirs = PeftModel.from_pretrained(base, str(tmp_path / "ckpt" / ADAPTER_DIR)).eval()
    ids = torch.randint(4, 284, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.language_model.eval()(input_ids=ids).logits
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours, atol=1e-5, rtol=1e-5)
    with torch.no_grad(), theirs.disable_adapter():
        assert not torch.allclose(theirs(input_ids=ids).logits, ours, atol=1e-3)  # the adapter matters


def test_the_recipes_lora_dropout_reaches_the_adapters(tmp_path):
    """model.lora.dropout: adapter inputs are dropped while training (two passes differ), never in eval."""
    _, model = _lora_model(tmp_path, "model.lora.dropout=0.5", "model.lora.target_modules=[q_proj]")
    _perturb_adapters(model.language_model)
    layer = next(m for n, m in model.language_model.named_modules() if n.endswith("q_proj") and hasattr(m, "lora_A"))
    assert {type(d).__name__ for d in layer.lora_dropout.values()} == {"Dropout"}
    x = torch.randn(4, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.train()
        assert not torch.allclose(layer(x), layer(x))
        layer.eval()
        torch.testing.assert_close(layer(x), layer(x))


def test_vision_lora_adapters_train_and_are_saved_in_peft_format(tmp_path):
    from peft import PeftModel

    saved = save_vit_file(tmp_path / "vit.safetensors")
    recipe, model = _lora_model(
        tmp_path,
        "model.lora.vision=true",
        "model.lora.vision_target_modules=[qkv]",
        f"model.vision.pretrained={tmp_path / 'vit.safetensors'}",
    )
    trainable = [n for n, p in model.vision_encoder.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    _perturb_adapters(model.vision_encoder)
    run = SimpleNamespace(
        model=model,
        recipe=recipe,
        data=SimpleNamespace(cameras=["observation.images.top"], prompt_prefix=[], reader=SimpleNamespace(fps=10.0)),
    )
    write_model_files(run, tmp_path / "ckpt")
    fresh = tiny_vit(seed=123)
    fresh.load_state_dict(saved)  # the pretrained weights, then our adapter on top
    theirs = PeftModel.from_pretrained(fresh, str(tmp_path / "ckpt" / "vision_adapter")).eval()
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.vision_encoder.backbones[0].eval().forward_features(pixels)
        torch.testing.assert_close(theirs.forward_features(pixels), ours, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(tiny_vit(seed=123).eval().forward_features(pixels), ours, atol=1e-3)
    model.train()(fake_batch(model))["actions"].sum().backward()
    assert all(p.grad is not None for p in model.vision_encoder.parameters() if p.requires_grad)


def test_an_output_layer_adapter_in_a_run_without_language_is_refused(tmp_path):
    """lm_head's adapter trains only through language logits: without a language term its lora_B
    stayed 0 while it was counted as trained."""
    with pytest.raises(RecipeError, match="the LM's output layer is adapted, but this run trains no language"):
        _lora_model(tmp_path, "model.lora.target_modules=[q_proj, lm_head]", "data.language_target=none")
    _lora_model(tmp_path, "model.lora.target_modules=[q_proj, lm_head]", "data.language_target=text")
    _lora_model(tmp_path, "model.lora.target_modules=[q_proj]", "data.language_target=none")


def test_lora_on_an_lm_whose_vocabulary_grew_for_the_tokenizer_refuses_a_language_target(tmp_path):
    """A pretrained LM of 200 rows under a 284-token tokenizer: the 84 new rows (the action tokens
    among them) stay frozen at their initial values under LoRA, so a language target saying them
    could not learn; without a language target, or without LoRA, the run is fine."""
    from tiny_models import save_lm_dir

    save_lm_dir(tmp_path / "lm", vocab=200)
    small = [f"model.language.name={tmp_path / 'lm'}", "model.language.config={}"]
    with pytest.raises(RecipeError, match="the tokenizer has 84 more tokens than the LM's vocabulary; LoRA keeps"):
        _lora_model(tmp_path, *small, "data.language_target=text")
    _, model = _lora_model(tmp_path, *small, "data.language_target=none")
    assert model.language_model.get_input_embeddings().num_embeddings == 284
    recipe = tiny_recipe(tmp_path, *small, "data.language_target=text")
    build_model(recipe, n_cameras=1, **DIMS)  # a full fine-tune trains the new rows
