"""LoRA through peft on the LM (and optionally the vision encoder).

peft errors only when *no* target matches; a recipe listing ``q_proj, qkv_proj`` where only
one exists would silently adapt less than asked. We check each pattern on its own with
peft's matching rule (exact name or a ``.pattern`` suffix) and refuse the ones that match
nothing, naming the key. peft's ``all-linear`` shorthand is passed through as is. A vision
backbone's layers that the encoder never uses (SigLIP's pooling head under patch features) get
no adapter: it would never train.

The adapted linears run :mod:`vla_ft.lora_fused`'s forward unless ``model.lora.fused`` is false.
Adapters are saved in PEFT's own format next to every checkpoint (``adapter/``, see
:mod:`vla_ft.model_files`), so ``peft.PeftModel.from_pretrained(base_lm, ".../adapter")`` opens them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from vla_ft.config import LoraConfig, ModelConfig, RecipeError

if TYPE_CHECKING:
    from vla_ft.model import VLA

ALL_LINEAR = "all-linear"


def _matches(pattern: str, module_names: list[str]) -> bool:
    return any(n == pattern or n.endswith("." + pattern) for n in module_names)


def check_targets(module: nn.Module, patterns: list[str], key: str, unused: frozenset[str] = frozenset()) -> None:
    """Every pattern must match at least one module of ``module`` that its forward uses (not in
    ``unused``); the error lists the linear layers."""
    if not patterns:
        raise RecipeError(f"{key}: empty; name the modules to adapt (e.g. q_proj, v_proj) or use {ALL_LINEAR}")
    if any(p.lower() == ALL_LINEAR for p in patterns):
        if len(patterns) > 1:
            raise RecipeError(f"{key}: {ALL_LINEAR} adapts every linear layer, so it must be the only entry")
        return
    names = [n for n, _ in module.named_modules()]
    missing = [p for p in patterns if not _matches(p, names)]
    leaves = sorted({n.rsplit(".", 1)[-1] for n, m in module.named_modules() if isinstance(m, nn.Linear)})
    if missing:
        raise RecipeError(f"{key}: pattern(s) {missing} match no module; linear layers here: {', '.join(leaves)}")
    idle = [p for p in patterns if not _matches(p, [n for n in names if n not in unused])]
    if idle:
        raise RecipeError(
            f"{key}: pattern(s) {idle} match only layers this model's forward never uses "
            f"({', '.join(sorted(n for n in unused if _matches_any(n, idle)))}); adapt other layers"
        )
    modules = list(module.named_modules())
    unsupported = sorted(
        {f"{p} ({type(m).__name__})" for p in patterns for n, m in modules if _matches(p, [n]) and not _adaptable(m)}
    )
    if unsupported:
        raise RecipeError(
            f"{key}: {', '.join(unsupported)} cannot carry an adapter (linear, embedding and conv layers can); "
            f"linear layers here: {', '.join(leaves)}"
        )


def _matches_any(name: str, patterns: list[str]) -> bool:
    return any(_matches(p, [name]) for p in patterns)


def _adaptable(module: nn.Module) -> bool:
    """A layer peft's LoRA wraps: linear (bitsandbytes' 4-bit ones are nn.Linear too), embedding,
    convolution, or transformers' GPT-2-style Conv1D."""
    return isinstance(module, (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or (
        type(module).__name__ == "Conv1D"
    )


def wrap(
    module: nn.Module,
    cfg: LoraConfig,
    targets: list[str],
    key: str,
    task_type: str | None = None,
    unused: frozenset[str] = frozenset(),
) -> nn.Module:
    """``module`` -> a peft model whose adapters are the only trainable parameters. No adapter goes
    on a layer in ``unused`` (its forward never uses it: it would never train)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    from vla_ft.lora_fused import fuse_lora_layers

    check_targets(module, targets, key, unused)
    target_modules = ALL_LINEAR if targets[0].lower() == ALL_LINEAR else list(targets)
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=target_modules,
        exclude_modules=sorted(unused) or None,
        task_type=task_type,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
    )
    model = get_peft_model(module, peft_cfg)
    if cfg.fused:
        fuse_lora_layers(model)
    return model


def apply_lora(model: VLA, cfg: ModelConfig) -> None:
    """Wrap ``model.language_model`` (and the vision backbones) in peft LoRA, in place."""
    lora = cfg.lora
    if lora.enabled:
        # CAUSAL_LM: the saved adapter_config.json is what AutoPeftModelForCausalLM expects.
        lm = wrap(model.language_model, lora, lora.target_modules, "model.lora.target_modules", "CAUSAL_LM")
        model.language_model = lm
        model.lora_modules.add("language_model")
    if lora.vision:
        key = "model.lora.vision_target_modules"
        encoder = model.vision_encoder
        for i, bb in enumerate(encoder.backbones):
            unused = unused_layers(encoder, bb, cfg.vision.img_size)
            encoder.backbones[i] = wrap(bb, lora, lora.vision_target_modules, key, unused=unused)
            check_adapters_run(encoder, encoder.backbones[i], key, cfg.vision.img_size)
        model.lora_modules.add("vision_encoder")


def _blank(backbone: nn.Module, img_size: int) -> torch.Tensor:
    weight = next(backbone.parameters())
    return torch.zeros(1, 3, img_size, img_size, dtype=weight.dtype, device=weight.device)


def unused_layers(encoder: nn.Module, backbone: nn.Module, img_size: int) -> frozenset[str]:
    """Adaptable layers of ``backbone`` whose weights the encoder's forward never uses: SigLIP's
    attention-pooling head with ``model.vision.features=patch``, say. Found by the gradient of one
    eval-mode forward of a blank image (what training runs, ``encoder.encode``) w.r.t. each weight."""
    layers = {n: m.weight for n, m in backbone.named_modules() if _adaptable(m) and isinstance(m.weight, nn.Parameter)}
    if not layers:
        return frozenset()
    flags, training = [w.requires_grad for w in layers.values()], backbone.training
    try:
        backbone.eval()
        for w in layers.values():
            w.requires_grad_(True)
        with torch.enable_grad():
            out = encoder.encode(backbone, _blank(backbone, img_size))
            grads = torch.autograd.grad(out.float().sum(), list(layers.values()), allow_unused=True)
    finally:
        backbone.train(training)
        for w, flag in zip(layers.values(), flags, strict=True):
            w.requires_grad_(flag)
    return frozenset(n for n, g in zip(layers, grads, strict=True) if g is None)


@torch.no_grad()
def check_adapters_run(encoder: nn.Module, backbone: nn.Module, key: str, img_size: int) -> None:
    """Refuse adapters a forward never calls: some timm models read a layer's weight directly
    (BEiT and EVA compute attention with ``F.linear(x, self.qkv.weight, ...)``), which bypasses the
    layer and so its adapter; it would never train. One eval-mode forward of a blank image through
    the encoder's own path finds them."""
    adapted = {n: m for n, m in backbone.named_modules() if hasattr(m, "lora_A")}
    called: set[str] = set()
    hooks = [m.register_forward_hook(lambda *_, n=n: called.add(n)) for n, m in adapted.items()]
    base, training = backbone.get_base_model(), backbone.training
    try:
        backbone.eval()  # no dropout draws, no batch-norm statistics updated
        encoder.encode(base, _blank(base, img_size))
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
