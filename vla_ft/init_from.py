"""``model.init_from``: start a run from the weights of an earlier vla-ft run (a checkpoint or an
export), for a second stage on other data or another task (a base policy fine-tuned per task).

The model is built as the source's was: no hub or pretrained file is read, and the LM's
architecture comes from the source's ``language_model/config.json``. Every tensor of the source (its
weight average when it has one, a 4-bit LM dequantised, LoRA merged into the base weights) is then
copied by name, before this run quantises its LM (``model.language.quantize``) and adds its own
LoRA adapters. The modules that depend on the new data's widths (action
and gripper heads, proprio encoder, action queries) may differ in shape or be absent: they keep
their fresh initialisation and are listed, as does a FiLM projection the source lacks
(``model.vision.film`` added for the second stage). Any other difference means the recipe builds another
model than the source's, and is refused, naming the tensor. The optimizer, the schedule and the
normalisation start afresh; the tokenizer is the source's unless ``model.language.tokenizer`` names one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vla_ft import checkpoint as ck
from vla_ft.config import RecipeError
from vla_ft.lora import merge_lora
from vla_ft.model import VLA
from vla_ft.model_files import TOKENIZER_DIR, load_lm_config, load_model

KEY = "model.init_from"
DATA_SHAPED = ("action_head.", "gripper_head.", "proprio_encoder.", "action_queries.")  # may start fresh
ADDED = ("film.",)  # may be new here (a FiLM projection starts at zero: the source's model, unchanged)


def source_directory(path: str) -> Path:
    """The checkpoint or export ``model.init_from`` names (a run directory: its newest checkpoint)."""
    from vla_ft.policy import resolve_directory

    try:
        return resolve_directory(path)
    except (FileNotFoundError, ck.CheckpointError) as err:
        raise RecipeError(f"{KEY}: {str(err).removeprefix('VLAPolicy: ')}") from None


def source_tokenizer(path: str) -> str:
    return str(source_directory(path) / TOKENIZER_DIR)


def source_lm_config(path: str | Path, asked: dict[str, Any] | None = None) -> Any:
    """The LM architecture (``PretrainedConfig``) of the source, or of the run's own checkpoint on a
    resume: the LM is built from it, not from the hub. ``asked``: ``model.language.config``, whose
    every key must agree with it (else the recipe, and the config.yaml it saves, would describe
    another LM than the one trained)."""
    directory = source_directory(str(path))
    try:
        config = load_lm_config(directory)
    except ck.CheckpointError as err:
        raise RecipeError(f"{KEY}: {err}") from None
    differ = [k for k, v in (asked or {}).items() if getattr(config, k, v) != v]
    if differ:
        key = f"model.language.config.{differ[0]}"
        raise RecipeError(
            f"{key}: {asked[differ[0]]!r} here, {getattr(config, differ[0])!r} in {directory}; with {KEY} the LM "
            f"is the source's: remove {key} or set the source's value"
        )
    return config


@torch.no_grad()
def copy_source_weights(model: VLA, path: str) -> list[str]:
    """Copy the source's tensors into ``model`` (built without LoRA); returns the modules left fresh."""
    directory = source_directory(path)
    try:
        source, _ = load_model(directory, dequantize=True)
    except ck.CheckpointError as err:
        raise RecipeError(f"{KEY}: {err}") from None
    merge_lora(source)
    _untie_like(model.language_model, source.language_model)
    theirs, ours = source.state_dict(), model.state_dict()
    fits = {n: n in theirs and theirs[n].shape == t.shape for n, t in ours.items()}
    # a module that cannot take all of the source's tensors takes none: half of a head trained
    # under the source's normalisation (its output bias) is no fresh start
    fresh = {
        n.split(".")[0]
        for n, ok in fits.items()
        if not ok and (n.startswith(DATA_SHAPED) or (n.startswith(ADDED) and n not in theirs))
    }
    problems = []
    for name, tensor in ours.items():
        if name.split(".")[0] in fresh:
            continue
        if fits[name]:
            tensor.copy_(theirs[name])
        elif name in theirs:
            problems.append(f"{name} is {tuple(theirs[name].shape)} there, {tuple(tensor.shape)} here")
        else:
            problems.append(f"{name} is not in it")
    problems += [f"it has {n}, this model not" for n in theirs if n not in ours and not n.startswith(DATA_SHAPED)]
    if problems:
        raise RecipeError(
            f"{KEY}: {directory} holds another model than this recipe builds (model.vision, model.language and "
            f"model.projector_hidden must be the source's): {'; '.join(problems[:3])}"
            + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        )
    return sorted(fresh)


def _untie_like(lm: torch.nn.Module, source: torch.nn.Module) -> None:
    """Give ``lm``'s head its own weight when the source's merge untied it (an adapter on the tied
    head or input embeddings, :func:`vla_ft.lora.untie_adapted_embeddings`): ``lm`` was built tied
    from the source's saved config, and copying both tensors into one would keep only the last."""
    head, inputs = lm.get_output_embeddings(), lm.get_input_embeddings()
    if head is None or head.weight is not inputs.weight or source.config.tie_word_embeddings:
        return
    head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    lm.config.tie_word_embeddings = False
