"""LoRA through peft on the LM (and optionally the vision encoder).

peft errors only when *no* target matches; a recipe listing ``q_proj, qkv_proj`` where only
one exists would silently adapt less than asked. We check each pattern on its own with
peft's matching rule (exact name or a ``.pattern`` suffix) and refuse the ones that match
nothing, naming the key.
"""

from __future__ import annotations

from torch import nn

from vla_ft.config import LoraConfig, RecipeError


def _matches(pattern: str, module_names: list[str]) -> bool:
    return any(n == pattern or n.endswith("." + pattern) for n in module_names)


def check_targets(module: nn.Module, patterns: list[str], key: str) -> None:
    names = [n for n, _ in module.named_modules()]
    missing = [p for p in patterns if not _matches(p, names)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in module.named_modules() if isinstance(m, nn.Linear)})
        raise RecipeError(f"{key}: pattern(s) {missing} match no module; linear layers here: {', '.join(leaves)}")


def wrap(module: nn.Module, cfg: LoraConfig, targets: list[str], key: str) -> nn.Module:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    check_targets(module, targets, key)
    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(targets))
    return get_peft_model(module, peft_cfg)


def apply_lora(model: nn.Module, cfg: LoraConfig) -> None:
    """Wrap ``model.language_model`` (and the vision backbones) in peft LoRA, in place."""
    if cfg.enabled:
        model.language_model = wrap(model.language_model, cfg, cfg.target_modules, "model.lora.target_modules")
        model.lora_modules.add("language_model")
    if cfg.vision:
        backbones = model.vision_encoder.backbones
        for i, bb in enumerate(backbones):
            backbones[i] = wrap(bb, cfg, cfg.vision_target_modules, "model.lora.vision_target_modules")
        model.lora_modules.add("vision_encoder")
