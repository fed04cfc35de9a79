"""The model's own files in a checkpoint or export, so inference rebuilds the VLA from the directory alone.

Written by :func:`write_model_files` next to ``model.safetensors`` in every checkpoint (the full
tree is drawn in :mod:`vla_ft.checkpoint`)::

    model_meta.json     dims, cameras, image size, chunk, history, the training data's control
                        rate (fps), gripper convention, prompt template and the recipe's
                        ``model`` section
    language_model/     config.json of the LM: the LM is rebuilt from it, never re-downloaded
    adapter/            LM LoRA adapters in PEFT's format (only with model.lora.enabled)
    vision_adapter*/    vision LoRA adapters in PEFT's format (only with model.lora.vision;
                        ``vision_adapter_<i>`` per camera with model.vision.per_camera)

:func:`load_model` reads a checkpoint (weights: ``model.safetensors``) or an export (merged LM
weights in ``language_model/``, everything else in ``policy.safetensors``, see
:mod:`vla_ft.export`): timm is built with ``pretrained=False`` and the LM from its config, so
no hub, no pretrained file and no dataset is read. A missing or broken file is a
:class:`~vla_ft.checkpoint.CheckpointError` naming it and saying the directory is damaged or incomplete,
never a recipe-key error: the recipe is not what is wrong.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from robot_data import load_normalizer
from vla_ft import checkpoint as ck
from vla_ft.config import LanguageConfig, LoraConfig, ModelConfig, VisionConfig, to_dict
from vla_ft.ema import load_averages
from vla_ft.lora import apply_lora
from vla_ft.model import VLA
from vla_ft.quantize import dequantize_state, load_quantized_state, quantize_linears, quantized_layers

META_FILE = "model_meta.json"
FORMAT_VERSION = 1
LM_DIR = "language_model"
ADAPTER_DIR = "adapter"
POLICY_WEIGHTS = "policy.safetensors"  # exports: every weight outside the LM
NORM_STATS = "norm_stats.json"
TOKENIZER_DIR = "tokenizer"
# The model_meta.json entries loading reads (nested ones dotted). The recipe sections' own fields
# are not listed: one added to the schema after a checkpoint was written takes its default.
META_KEYS = (
    "merged",
    "state_dim",
    "action_dim",
    "chunk",
    "history",
    "vocab_size",
    "cameras",
    "image_size",
    "prompt_template",
    "gripper.dims",
    "gripper.closed_is_high",
    "model.vision",
    "model.language",
    "model.lora",
)


def base_language_model(model: VLA) -> nn.Module:
    """The transformers LM under any peft wrapper."""
    lm = model.language_model
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


def known_fps(reader: Any) -> float | None:
    """The dataset's own control rate; None where it records none and the reader assumed its
    format's usual one (an HDF5 file without an ``fps`` attribute): no grounds to compare rates."""
    if getattr(reader, "fps_is_default", False) or getattr(reader, "fps", None) is None:
        return None
    return float(reader.fps)


def model_meta(model: VLA, recipe: Any, data: Any) -> dict[str, Any]:
    """Everything besides weights that inference needs (JSON-safe); ``data`` is the run's DataBundle."""
    d = model.dims
    gripper = recipe.loss.gripper
    return {
        "format": FORMAT_VERSION,
        "merged": False,
        "state_dim": d["state_dim"],
        "action_dim": d["action_dim"],
        "chunk": d["chunk"],
        "history": d["n_history"],
        # the control rate trained at: a chunk of actions spans chunk / fps seconds (older
        # checkpoints lack it, so it is not in META_KEYS)
        "fps": known_fps(data.reader),
        "vocab_size": d["vocab_size"],
        "cameras": list(data.cameras),
        "image_size": recipe.model.vision.img_size,
        "prompt_template": recipe.data.prompt_template,
        "prompt_prefix": data.prompt_prefix,
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
    ck.save_json(directory / META_FILE, model_meta(model, run.recipe, run.data))
    base_language_model(model).config.save_pretrained(str(directory / LM_DIR))
    if "language_model" in model.lora_modules:
        # save_embedding_layers=False: peft's "auto" would look the base model up on the hub at
        # every save; model.safetensors already holds every weight, resized embeddings included.
        model.language_model.save_pretrained(str(directory / ADAPTER_DIR), save_embedding_layers=False)
    if "vision_encoder" in model.lora_modules:
        backbones = model.vision_encoder.backbones
        for i, bb in enumerate(backbones):
            bb.save_pretrained(str(directory / ("vision_adapter" if len(backbones) == 1 else f"vision_adapter_{i}")))


def recorded_prompt_prefix(meta: dict[str, Any]) -> list[int]:
    """The ids a checkpoint's prompts started with: none in one written before they were recorded."""
    return [int(i) for i in meta.get("prompt_prefix", [])]


def read_model_meta(directory: Path) -> dict[str, Any]:
    """``model_meta.json`` of a checkpoint or export, with every :data:`META_KEYS` entry; else a clear error."""
    directory = Path(directory)
    path = directory / META_FILE
    if not path.is_file():
        hint = " (checkpoints written before model_meta.json existed cannot be loaded for inference)"
        raise ck.CheckpointError(f"{directory} is not a checkpoint or export directory: no {META_FILE}{hint}")
    meta = ck.load_json(path, directory)
    if not isinstance(meta, dict):
        raise ck.CheckpointError(f"{path}: holds {type(meta).__name__}, not a mapping: {ck.damaged(directory)}")
    if meta.get("format") != FORMAT_VERSION:
        raise ck.CheckpointError(f"{path}: format {meta.get('format')} is not supported (expected {FORMAT_VERSION})")
    missing = [key for key in META_KEYS if not _has_key(meta, key)]
    if missing:
        raise ck.CheckpointError(f"{path}: lacks {', '.join(missing)}: {ck.damaged(directory)}")
    return meta


def _has_key(meta: dict[str, Any], dotted: str) -> bool:
    node: Any = meta
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def model_config(section: dict[str, Any]) -> ModelConfig:
    """The recipe's ``model`` section (as saved by :func:`model_meta`) -> ModelConfig."""
    rest = {k: v for k, v in section.items() if k not in ("vision", "language", "lora")}
    return ModelConfig(
        vision=VisionConfig(**section["vision"]),
        language=LanguageConfig(**section["language"]),
        lora=LoraConfig(**section["lora"]),
        **rest,
    )


def read_norm_stats(directory: Path) -> dict[str, Any]:
    """``norm_stats.json`` of a checkpoint or export, checked to build a normaliser
    (:func:`robot_data.load_normalizer`: one set of statistics, or one per mixture source)."""
    path = Path(directory) / NORM_STATS
    stats = ck.load_json(path, directory)
    with ck.reading(path, directory):
        load_normalizer(stats)
    return stats


def load_saved_tokenizer(directory: Path) -> Any:
    """The tokenizer a checkpoint or export carries (``tokenizer/``, a ``save_pretrained`` directory)."""
    from transformers import AutoTokenizer

    path = Path(directory) / TOKENIZER_DIR
    with ck.reading(path, directory):
        return AutoTokenizer.from_pretrained(str(path))


def load_model(
    directory: Path, device: str | torch.device = "cpu", ema: bool = True, dequantize: bool = False
) -> tuple[VLA, dict[str, Any]]:
    """Rebuild the VLA of a checkpoint or export directory with its trained weights, in eval mode.

    ``ema``: a checkpoint of a run with ``train.ema_decay`` holds the weight average too
    (``ema.safetensors``); it replaces the trained weights unless ``ema`` is False. An export holds
    one set (its ``"ema"`` says which): ``ema`` False on an export of the average is an error.
    ``dequantize``: a 4-bit LM (``model.language.quantize``) comes back as plain fp32 linears
    holding its dequantised weights (for export and ``model.init_from``); the returned
    ``meta["model"]`` then says so."""
    directory = Path(directory)
    meta = read_model_meta(directory)
    if not ema and meta.get("ema"):
        raise ck.CheckpointError(
            f'{directory}: exported from the weight average (model_meta.json has "ema": true), so it holds no '
            f"trained weights to load with ema=False (--no-ema); load the checkpoint it came from "
            f"({meta.get('source', 'see model_meta.json')}), or export that with --no-ema"
        )
    if (directory / "model_dcp").is_dir() and not (directory / "model.safetensors").is_file():
        raise ck.CheckpointError(
            f"{directory} holds FSDP shards (model_dcp/), not one weights file: "
            f"run `vla-ft consolidate {directory}` and load what it writes"
        )
    with ck.reading(directory / META_FILE, directory):  # e.g. a model field this version does not know
        cfg = model_config(meta["model"])
    cfg.vision.pretrained = False
    if dequantize:
        cfg.language.quantize = meta["model"]["language"]["quantize"] = "none"
    dims = {
        "state_dim": meta["state_dim"],
        "action_dim": meta["action_dim"],
        "chunk": meta["chunk"],
        "n_cameras": len(meta["cameras"]),
        "n_history": meta["history"],
        "vocab_size": meta["vocab_size"],
        "n_gripper": len(meta["gripper"]["dims"]),
    }
    model = _export_model(directory, cfg, dims) if meta["merged"] else _checkpoint_model(directory, cfg, dims)
    if ema:
        load_averages(model, directory)
    model.wants_language = False
    return model.to(device).eval(), meta


def _checkpoint_model(directory: Path, cfg: ModelConfig, dims: dict[str, int]) -> VLA:
    """A checkpoint's VLA: the LM built from its saved config, every weight from ``model.safetensors``."""
    model = VLA(cfg, pretrained=False, lm_config=load_lm_config(directory), **dims)
    if cfg.language.quantize != "none":  # 4-bit layers whose codes the weights file holds
        # DoRA's adapters read their base weight when built, so it must hold codes (replaced by the file's)
        quantize_linears(model.language_model, cfg.language.quantize, "cpu" if cfg.lora.use_dora else None)
    apply_lora(model, cfg)  # same module tree as in training, so the load below is strict
    with ck.reading(directory / "model.safetensors", directory):
        load_weights(model, directory / "model.safetensors")
    return model


def load_weights(model: nn.Module, path: Path) -> None:
    """``model.safetensors`` into ``model``, strictly (tied tensors are stored once). A 4-bit layer's
    codes and statistics go into the model's 4-bit layer, or, in a model built without
    quantisation, are dequantised into its plain one (:mod:`vla_ft.quantize`)."""
    state = load_file(str(path))
    filled = load_quantized_state(model, state) if quantized_layers(model) else set()
    dequantize_state(state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied, loaded = _shared_names(model), set(state) | filled
    missing = [k for k in missing if k not in filled and not tied.get(k, set()) & loaded]
    if missing or unexpected:
        raise RuntimeError(
            f"{path} does not match the model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )


def _shared_names(model: nn.Module) -> dict[str, set[str]]:
    """State-dict name -> the other names of the same tensor (tied weights, saved once)."""
    by_tensor: dict[int, set[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        by_tensor.setdefault(id(tensor), set()).add(name)
    return {name: names - {name} for names in by_tensor.values() for name in names}


def _export_model(directory: Path, cfg: ModelConfig, dims: dict[str, int]) -> VLA:
    """An export's VLA: the merged LM is a plain save_pretrained directory, the rest ``policy.safetensors``."""
    _check_export_lm(directory)
    cfg.language.name, cfg.language.config = str(directory / LM_DIR), {}
    model = VLA(cfg, pretrained=False, **dims)
    _load_policy_weights(model, directory)
    return model


def load_lm_config(directory: Path) -> Any:
    """The LM's ``PretrainedConfig`` from ``language_model/config.json``."""
    from transformers import AutoConfig

    path = directory / LM_DIR / "config.json"
    with ck.reading(path, directory):
        return AutoConfig.from_pretrained(str(path.parent))


def _check_export_lm(directory: Path) -> None:
    """Name a missing or truncated file of an export's ``language_model/`` here: transformers'
    loader would report it as a failure of the recipe key ``model.language.name``."""
    load_lm_config(directory)
    lm_dir = directory / LM_DIR
    index = lm_dir / "model.safetensors.index.json"  # save_pretrained shards a large LM
    names = ["model.safetensors"]
    if index.is_file():
        with ck.reading(index, directory):
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    for name in names:
        with ck.reading(lm_dir / name, directory), safe_open(str(lm_dir / name), "pt"):
            pass  # opening reads the header, which checks that the file is whole


def _load_policy_weights(model: VLA, directory: Path) -> None:
    """Every non-LM weight of an export from ``policy.safetensors``; any other missing or extra tensor is an error."""
    path = directory / POLICY_WEIGHTS
    with ck.reading(path, directory):
        result = model.load_state_dict(load_file(str(path)), strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(LM_DIR + ".")]
    if missing or result.unexpected_keys:
        raise ck.CheckpointError(
            f"{path} does not match the model (missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}): "
            f"{ck.damaged(directory)}"
        )
