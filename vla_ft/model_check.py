"""The model section checked before any weight exists, for ``vla-ft validate`` (every recipe load).

A bad ``model.vision.kwargs`` or ``model.language.config`` would otherwise pass validation and
fail when a job starts, or worse, train something else than asked: transformers keeps an unknown
config key (``hidden_sise: 96``) as an attribute and builds its default width; a head count that
does not divide the width builds, then fails on the first forward with a shape error from inside
attention. So the backbones are built here on the meta device (module trees, no weights, no
memory, no download) and run one forward on a tiny input. What fails names the recipe key.

A forward the meta device cannot run (an op with no meta kernel, a data-dependent branch) is not
a recipe problem and is skipped; building the real model checks the rest.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
from collections.abc import Callable
from typing import Any

import torch

from vla_ft.backbones import language_model_skeleton, library_message, vision_skeleton
from vla_ft.config import ModelConfig, RecipeError
from vla_ft.film import vit_blocks
from vla_ft.lora import check_targets

_checked: dict[str, list[str]] = {}


def model_structure_problems(cfg: ModelConfig) -> list[str]:
    """Problems with ``cfg``'s backbones and LoRA targets (empty = none found). Cached per model
    section: ablation variants and tests load one model many times."""
    key = json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str)
    if key not in _checked:
        _checked[key] = _vision_problems(cfg) + _language_problems(cfg)
    return list(_checked[key])


def _vision_problems(cfg: ModelConfig) -> list[str]:
    shaped_by = "model.vision.kwargs" if cfg.vision.kwargs else "model.vision.img_size"
    try:
        backbone = vision_skeleton(cfg)
        if cfg.lora.vision:
            check_targets(backbone, cfg.lora.vision_target_modules, "model.lora.vision_target_modules")
        if cfg.vision.film:
            vit_blocks(backbone, cfg.vision.name)
    except RecipeError as err:
        return err.problems
    except Exception as err:  # noqa: BLE001 - whatever timm raises (a negative width); see _build_problems
        return _build_problems(err, shaped_by, "timm cannot build the backbone")
    size = cfg.vision.img_size
    probe = _vision_forward(backbone, size)
    if not probe:
        return []
    return [f"{_vision_key_to_blame(cfg, backbone)}: the backbone fails on a {size}x{size} image: {probe}"]


def _vision_forward(backbone: torch.nn.Module, size: int) -> str | None:
    """:func:`_meta_forward` of ``backbone`` on one ``size`` x ``size`` image."""
    return _meta_forward(lambda: backbone.forward_features(torch.zeros(1, 3, size, size)))


def _vision_key_to_blame(cfg: ModelConfig, backbone: torch.nn.Module) -> str:
    """The key to change when the backbone fails on a ``model.vision.img_size`` image: img_size itself when
    the same backbone (``model.vision.kwargs`` included) runs at its model's default size (an image smaller
    than a patch is the size's fault, not the kwargs'); else the kwargs that shaped it, if any."""
    default = backbone.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    if cfg.vision.kwargs and default != cfg.vision.img_size:
        at_default = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, img_size=default))
        try:
            runs_at_default = _vision_forward(vision_skeleton(at_default), default) is None
        except Exception:  # noqa: BLE001 - not buildable at the default size either: the kwargs are to blame
            runs_at_default = False
        if not runs_at_default:
            return "model.vision.kwargs"
    return "model.vision.img_size"


def _language_problems(cfg: ModelConfig) -> list[str]:
    lang = cfg.language
    if lang.name is not None and lang.config:
        return [
            "model.language.config: used only when model.language.name is null (a pretrained LM's own "
            "config.json decides its shape); remove it, or override it with model.language.config={}"
        ]
    if lang.name is not None and not cfg.lora.enabled:  # a pretrained LM's shapes are its checkpoint's
        return []
    p = unknown_config_keys(lang.config) if lang.name is None else []
    try:
        lm = language_model_skeleton(cfg)
        if lm is not None and cfg.lora.enabled:
            check_targets(lm, cfg.lora.target_modules, "model.lora.target_modules")
    except RecipeError as err:
        return p + err.problems
    except Exception as err:  # noqa: BLE001 - as for the vision backbone
        key = "model.language.config" if lang.name is None else "model.language.name"
        return p + _build_problems(err, key, "transformers cannot build the LM")
    if lang.name is not None:  # built for its LoRA targets only
        return p
    probe = _meta_forward(lambda: lm(input_ids=torch.zeros(1, 4, dtype=torch.long)))
    return p + ([f"model.language.config: the LM fails on a 4-token input: {probe}"] if probe else [])


def unknown_config_keys(config: dict[str, Any]) -> list[str]:
    """Keys of ``model.language.config`` that its config class does not take and that look like a
    typo of one it does. transformers keeps any key as an attribute, so a misspelt width would
    silently build the default; keys that resemble nothing pass (a model's code may read them)."""
    from transformers import AutoConfig

    try:
        defaults = AutoConfig.for_model(config["model_type"])
    except Exception:  # noqa: BLE001 - no or an unknown model_type: building the skeleton names it
        return []
    config_class = type(defaults)
    known = {
        name
        for cls in config_class.__mro__
        if "__init__" in vars(cls)
        for name in inspect.signature(cls.__init__).parameters
    } | set(defaults.to_dict())
    p = []
    for name in sorted(set(config) - known - {"model_type"}):
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.8)
        if close:
            p.append(
                f"model.language.config.{name}: not a {config_class.__name__} key, so transformers would "
                f"ignore it (did you mean '{close[0]}'?)"
            )
    return p


def _meta_forward(run: Callable[[], object]) -> str | None:
    """Runs ``run()`` on meta tensors: None if it works or the meta device cannot run it, else the error."""
    try:
        with torch.device("meta"), torch.no_grad():
            run()
    except Exception as err:  # noqa: BLE001 - whatever the model raises is reported, naming the key
        return None if _meta_limit(err) else library_message(err)
    return None


def _build_problems(err: BaseException, key: str, what: str) -> list[str]:
    """An error building a backbone on the meta device as a problem naming ``key`` (a negative width in
    its kwargs or config); none when it is the meta device's limit, which building the real model checks."""
    return [] if _meta_limit(err) else [f"{key}: {what}: {library_message(err)}"]


def _meta_limit(err: BaseException) -> bool:
    """Whether ``err`` is the meta device's limit rather than the recipe's: an op without a meta kernel,
    or a value read from a meta tensor (``.item()``, a data-dependent branch). Building the real model
    checks what the meta device cannot."""
    text = str(err).lower()
    return isinstance(err, NotImplementedError) or "meta" in text or "data-dependent" in text
