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
    try:
        backbone = vision_skeleton(cfg)
        if cfg.lora.vision:
            check_targets(backbone, cfg.lora.vision_target_modules, "model.lora.vision_target_modules")
        if cfg.vision.film:
            vit_blocks(backbone, cfg.vision.name)
    except RecipeError as err:
        return err.problems
    except Exception:  # noqa: BLE001 - a model that cannot be built on the meta device: build_model checks it
        return []
    size, key = cfg.vision.img_size, "model.vision.kwargs" if cfg.vision.kwargs else "model.vision.img_size"
    probe = _meta_forward(lambda: backbone.forward_features(torch.zeros(1, 3, size, size)))
    return [f"{key}: the backbone fails on a {size}x{size} image: {probe}"] if probe else []


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
    except Exception:  # noqa: BLE001 - as for the vision backbone
        return p
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
    except NotImplementedError:
        return None  # an op without a meta kernel
    except Exception as err:  # noqa: BLE001 - whatever the model raises is reported, naming the key
        text = str(err)
        if "meta" in text.lower() or "data-dependent" in text.lower():  # .item(), a bool of a meta tensor
            return None
        return library_message(err)
    return None
