"""The model's own files in a checkpoint or export, so inference rebuilds the VLA from the directory alone.

Written by :func:`write_model_files` next to ``model.safetensors`` in every checkpoint (the full
tree is drawn in :mod:`vla_ft.checkpoint`)::

    model_meta.json     dims, cameras, image size, chunk, history, gripper convention, prompt
                        template and the recipe's ``model`` section
    language_model/     config.json of the LM: the LM is rebuilt from it, never re-downloaded
    adapter/            LM LoRA adapters in PEFT's format (only with model.lora.enabled)
    vision_adapter*/    vision LoRA adapters in PEFT's format (only with model.lora.vision;
                        ``vision_adapter_<i>`` per camera with model.vision.per_camera)

:func:`load_model` reads a checkpoint (weights: ``model.safetensors``) or an export (merged LM
weights in ``language_model/``, everything else in ``policy.safetensors``, see
:mod:`vla_ft.export`): timm is built with ``pretrained=False`` and the LM from its config, so
no hub, no pretrained file and no dataset is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import load_model as load_safetensors_model
from torch import nn

from vla_ft import checkpoint as ck
from vla_ft.config import LanguageConfig, LoraConfig, ModelConfig, VisionConfig, to_dict
from vla_ft.lora import apply_lora
from vla_ft.model import VLA

META_FILE = "model_meta.json"
FORMAT_VERSION = 1
LM_DIR = "language_model"
ADAPTER_DIR = "adapter"
POLICY_WEIGHTS = "policy.safetensors"  # exports: every weight outside the LM


def base_language_model(model: VLA) -> nn.Module:
    """The transformers LM under any peft wrapper."""
    lm = model.language_model
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


def model_meta(model: VLA, recipe: Any, cameras: list[str]) -> dict[str, Any]:
    """Everything besides weights that inference needs (JSON-safe)."""
    d = model.dims
    gripper = recipe.loss.gripper
    return {
        "format": FORMAT_VERSION,
        "merged": False,
        "state_dim": d["state_dim"],
        "action_dim": d["action_dim"],
        "chunk": d["chunk"],
        "history": d["n_history"],
        "vocab_size": d["vocab_size"],
        "cameras": list(cameras),
        "image_size": recipe.model.vision.img_size,
        "prompt_template": recipe.data.prompt_template,
        "gripper": {
            "dims": list(gripper.dims) if recipe.model.gripper_head else [],
            "closed_is_high": gripper.closed_is_high,
            "threshold": gripper.threshold,
        },
        "model": to_dict(recipe.model),
    }


def write_model_files(run: Any, directory: Path) -> None:
    """Write ``model_meta.json``, the LM config and the PEFT adapters of ``run.model`` into ``directory``."""
    model = run.model
    directory.mkdir(parents=True, exist_ok=True)
    ck.save_json(directory / META_FILE, model_meta(model, run.recipe, run.data.cameras))
    base_language_model(model).config.save_pretrained(str(directory / LM_DIR))
    if "language_model" in model.lora_modules:
        # save_embedding_layers=False: peft's "auto" would look the base model up on the hub at
        # every save; model.safetensors already holds every weight, resized embeddings included.
        model.language_model.save_pretrained(str(directory / ADAPTER_DIR), save_embedding_layers=False)
    if "vision_encoder" in model.lora_modules:
        backbones = model.vision_encoder.backbones
        for i, bb in enumerate(backbones):
            bb.save_pretrained(str(directory / ("vision_adapter" if len(backbones) == 1 else f"vision_adapter_{i}")))


def read_model_meta(directory: Path) -> dict[str, Any]:
    """``model_meta.json`` of a checkpoint or export; a clear error for anything else."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        hint = " (checkpoints written before model_meta.json existed cannot be loaded for inference)"
        raise ck.CheckpointError(f"{directory} is not a checkpoint or export directory: no {META_FILE}{hint}")
    meta = ck.load_json(path)
    if meta.get("format") != FORMAT_VERSION:
        raise ck.CheckpointError(f"{path}: format {meta.get('format')} is not supported (expected {FORMAT_VERSION})")
    return meta


def model_config(section: dict[str, Any]) -> ModelConfig:
    """The recipe's ``model`` section (as saved by :func:`model_meta`) -> ModelConfig."""
    rest = {k: v for k, v in section.items() if k not in ("vision", "language", "lora")}
    return ModelConfig(
        vision=VisionConfig(**section["vision"]),
        language=LanguageConfig(**section["language"]),
        lora=LoraConfig(**section["lora"]),
        **rest,
    )


def load_model(directory: Path, device: str | torch.device = "cpu") -> tuple[VLA, dict[str, Any]]:
    """Rebuild the VLA of a checkpoint or export directory with its trained weights, in eval mode."""
    directory = Path(directory)
    meta = read_model_meta(directory)
    if (directory / "model_dcp").is_dir() and not (directory / "model.safetensors").is_file():
        raise ck.CheckpointError(
            f"{directory} holds FSDP shards (model_dcp/), not one weights file: "
            f"run `vla-ft consolidate {directory}` and load what it writes"
        )
    cfg = model_config(meta["model"])
    cfg.vision.pretrained = False
    dims = {
        "state_dim": meta["state_dim"],
        "action_dim": meta["action_dim"],
        "chunk": meta["chunk"],
        "n_cameras": len(meta["cameras"]),
        "n_history": meta["history"],
        "vocab_size": meta["vocab_size"],
        "n_gripper": len(meta["gripper"]["dims"]),
    }
    if meta["merged"]:  # export: the merged LM is a plain save_pretrained directory
        cfg.language.name, cfg.language.config = str(directory / LM_DIR), {}
        model = VLA(cfg, pretrained=False, **dims)
        _load_policy_weights(model, directory / POLICY_WEIGHTS)
    else:
        from transformers import AutoConfig

        model = VLA(cfg, pretrained=False, lm_config=AutoConfig.from_pretrained(str(directory / LM_DIR)), **dims)
        apply_lora(model, cfg.lora)  # same module tree as in training, so the load below is strict
        with ck.reading(directory / "model.safetensors"):
            load_safetensors_model(model, str(directory / "model.safetensors"), strict=True)
    model.wants_language = False
    return model.to(device).eval(), meta


def _load_policy_weights(model: VLA, path: Path) -> None:
    """Every non-LM weight from ``path``; any other missing or extra tensor is an error."""
    with ck.reading(path):
        result = model.load_state_dict(load_file(str(path)), strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(LM_DIR + ".")]
    if missing or result.unexpected_keys:
        raise ck.CheckpointError(
            f"{path} does not match the model: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
