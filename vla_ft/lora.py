"""LoRA through peft on the LM (and optionally the vision encoder).

peft errors only when *no* target matches; a recipe listing ``q_proj, qkv_proj`` where only
one exists would silently adapt less than asked. We check each pattern on its own with
peft's matching rule (exact name or a ``.pattern`` suffix) and refuse the ones that match
nothing, naming the key. peft's ``all-linear`` shorthand is passed through as is.

The adapted linears run :mod:`vla_ft.lora_fused`'s forward unless ``model.lora.fused`` is false.
Adapters are saved in PEFT's own format next to every checkpoint (``adapter/``, see
:mod:`vla_ft.model_files`), so ``peft.PeftModel.from_pretrained(base_lm, ".../adapter")`` opens them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from vla_ft.config import LoraConfig, RecipeError

if TYPE_CHECKING:
    from vla_ft.model import VLA

ALL_LINEAR = "all-linear"


def _matches(pattern: str, module_names: list[str]) -> bool:
    return any(n == pattern or n.endswith("." + pattern) for n in module_names)


def check_targets(module: nn.Module, patterns: list[str], key: str) -> None:
    """Every pattern must match at least one module of ``module``; the error lists the linear layers."""
    if not patterns:
        raise RecipeError(f"{key}: empty; name the modules to adapt (e.g. q_proj, v_proj) or use {ALL_LINEAR}")
    if patterns == [ALL_LINEAR]:
        return
    names = [n for n, _ in module.named_modules()]
    missing = [p for p in patterns if not _matches(p, names)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in module.named_modules() if isinstance(m, nn.Linear)})
        raise RecipeError(f"{key}: pattern(s) {missing} match no module; linear layers here: {', '.join(leaves)}")


def wrap(module: nn.Module, cfg: LoraConfig, targets: list[str], key: str, task_type: str | None = None) -> nn.Module:
    """``module`` -> a peft model whose adapters are the only trainable parameters."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    from vla_ft.lora_fused import fuse_lora_layers

    check_targets(module, targets, key)
    target_modules = ALL_LINEAR if targets == [ALL_LINEAR] else list(targets)
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=target_modules,
        task_type=task_type,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
    )
    model = get_peft_model(module, peft_cfg)
    if cfg.fused:
        fuse_lora_layers(model)
    return model


def apply_lora(model: VLA, cfg: LoraConfig) -> None:
    """Wrap ``model.language_model`` (and the vision backbones) in peft LoRA, in place."""
    if cfg.enabled:
        # CAUSAL_LM: the saved adapter_config.json is what AutoPeftModelForCausalLM expects.
        lm = wrap(model.language_model, cfg, cfg.target_modules, "model.lora.target_modules", "CAUSAL_LM")
        model.language_model = lm
        model.lora_modules.add("language_model")
    if cfg.vision:
        backbones = model.vision_encoder.backbones
        for i, bb in enumerate(backbones):
            backbones[i] = wrap(bb, cfg, cfg.vision_target_modules, "model.lora.vision_target_modules")
        model.lora_modules.add("vision_encoder")


def merge_lora(model: VLA) -> None:
    """Fold every adapter into its base weights and unwrap, in place (for export)."""
    if "language_model" in model.lora_modules:
        untie_adapted_embeddings(model.language_model)
        model.language_model = model.language_model.merge_and_unload()
    if "vision_encoder" in model.lora_modules:
        backbones = model.vision_encoder.backbones
        for i, bb in enumerate(backbones):
            backbones[i] = bb.merge_and_unload()
    model.lora_modules.clear()
    model._trainable = None  # requires_grad changed: drop the cached trainable set


def untie_adapted_embeddings(lm: nn.Module) -> None:
    """Give the LM head its own weight when it shares it with the input embeddings and either
    carries an adapter. Merging adds the adapter's update into its base weight; on a tied
    weight that would change the other side too (an ``lm_head`` adapter would move the input
    embeddings, so the actions). The export then stores both (``tie_word_embeddings: false``).
    """
    model = lm.get_base_model()
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if outputs is None or not any(hasattr(m, "base_layer") for m in (inputs, outputs)):
        return
    head = getattr(outputs, "base_layer", outputs)
    if head.weight is not getattr(inputs, "base_layer", inputs).weight:
        return
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    model.config.tie_word_embeddings = False
