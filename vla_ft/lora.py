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

import torch
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
    leaves = sorted({n.rsplit(".", 1)[-1] for n, m in module.named_modules() if isinstance(m, nn.Linear)})
    if missing:
        raise RecipeError(f"{key}: pattern(s) {missing} match no module; linear layers here: {', '.join(leaves)}")
    modules = list(module.named_modules())
    unsupported = sorted(
        {f"{p} ({type(m).__name__})" for p in patterns for n, m in modules if _matches(p, [n]) and not _adaptable(m)}
    )
    if unsupported:
        raise RecipeError(
            f"{key}: {', '.join(unsupported)} cannot carry an adapter (linear, embedding and conv layers can); "
            f"linear layers here: {', '.join(leaves)}"
        )


def _adaptable(module: nn.Module) -> bool:
    """A layer peft's LoRA wraps: linear (bitsandbytes' 4-bit ones are nn.Linear too), embedding,
    convolution, or transformers' GPT-2-style Conv1D."""
    return isinstance(module, (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or (
        type(module).__name__ == "Conv1D"
    )


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
            check_adapters_run(backbones[i], "model.lora.vision_target_modules")
        model.lora_modules.add("vision_encoder")


@torch.no_grad()
def check_adapters_run(backbone: nn.Module, key: str) -> None:
    """Refuse adapters a forward never calls: some timm models read a layer's weight directly
    (BEiT and EVA compute attention with ``F.linear(x, self.qkv.weight, ...)``), which bypasses the
    layer and so its adapter; it would never train. One eval-mode forward of a blank image finds them."""
    adapted = {n: m for n, m in backbone.named_modules() if hasattr(m, "lora_A")}
    called: set[str] = set()
    hooks = [m.register_forward_hook(lambda *_, n=n: called.add(n)) for n, m in adapted.items()]
    base, training = backbone.get_base_model(), backbone.training
    size = getattr(getattr(base, "patch_embed", None), "img_size", None) or (64, 64)
    weight = next(base.parameters())
    try:
        backbone.eval()  # no dropout draws, no batch-norm statistics updated
        base.forward_features(torch.zeros(1, 3, *size, dtype=weight.dtype, device=weight.device))
    finally:
        backbone.train(training)
        for hook in hooks:
            hook.remove()
    silent = sorted({n.rsplit(".", 1)[-1] for n in adapted if n not in called})
    if silent:
        raise RecipeError(
            f"{key}: the adapters on {silent} never run: {type(base).__name__} reads those layers' weights "
            "directly instead of calling them, so the adapters would not train; adapt other layers"
        )


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
