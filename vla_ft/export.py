"""``vla-ft export CHECKPOINT OUT``: a deployable policy directory with LoRA merged.

::

    OUT/
      language_model/       the LM with every LoRA adapter merged (save_pretrained: config.json +
                            model.safetensors), loadable by AutoModelForCausalLM on its own; a
                            4-bit LM (model.language.quantize) is stored dequantised, in fp32
      policy.safetensors    every other weight: vision encoder (adapters merged), projector, FiLM,
                            proprio encoder, action queries, action and gripper heads
      model_meta.json       as in checkpoints, with "merged": true and LoRA off, and "ema": whether
                            the weights are the checkpoint's weight average (``ema``, the default)
      norm_stats.json       normalisation statistics (the policy inverts with these)
      tokenizer/            the tokenizer
      config.yaml           the recipe the checkpoint was trained with: ``vla-ft eval OUT`` reads
                            its data section, as for a checkpoint

``VLAPolicy.from_pretrained(OUT)`` loads it and predicts the same actions as from the checkpoint.
The directory is written under a temporary name (``.tmp_<OUT>``), fsync'ed and renamed into place
when complete (:func:`vla_ft.checkpoint.write_dir_atomically`), so it needs no ``COMPLETE`` file as
checkpoints do.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from vla_ft import checkpoint as ck
from vla_ft.ema import EMA_FILE
from vla_ft.lora import merge_lora
from vla_ft.model_files import LM_DIR, META_FILE, NORM_STATS, POLICY_WEIGHTS, TOKENIZER_DIR, load_model
from vla_ft.policy import resolve_directory

COPIED = (NORM_STATS, TOKENIZER_DIR, "config.yaml")  # from the checkpoint, as they are


def export_policy(checkpoint: str | Path, out: str | Path, ema: bool = True) -> Path:
    """Write the export of ``checkpoint`` (any path :func:`~vla_ft.policy.resolve_directory` takes) to ``out``.

    ``ema``: export the weight average of a run with ``train.ema_decay`` (what validation measured
    and the policy acts with), else the trained weights; an export holds one of the two."""
    source, out = resolve_directory(checkpoint), Path(out)
    if out.exists() and not out.is_dir():
        raise ck.CheckpointError(f"{out}: is a file; choose a new OUT directory")
    if out.exists() and any(out.iterdir()):
        raise ck.CheckpointError(f"{out}: exists and is not empty; choose a new OUT directory")
    missing = [source / name for name in COPIED if not (source / name).exists()]
    if missing:
        raise ck.CheckpointError(f"{', '.join(map(str, missing))} missing: {ck.damaged(source)}")
    model, meta = load_model(source, ema=ema, dequantize=True)  # a 4-bit LM leaves as a plain fp32 one
    merge_lora(model)
    meta.update(merged=True, source=str(source.resolve()), ema=holds_average(source, meta, ema))
    meta["model"]["lora"].update(enabled=False, vision=False)

    def write_files(tmp: Path) -> None:
        model.language_model.save_pretrained(str(tmp / LM_DIR))
        others = {
            k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith(LM_DIR + ".")
        }
        save_file(others, str(tmp / POLICY_WEIGHTS))
        ck.save_json(tmp / META_FILE, meta)
        for name in COPIED:
            copy = shutil.copytree if (source / name).is_dir() else shutil.copy2
            copy(source / name, tmp / name)

    return ck.write_dir_atomically(out, write_files)


def holds_average(source: Path, meta: dict[str, Any], ema: bool) -> bool:
    """Whether the weights ``load_model(source, ema=ema)`` gave are a weight average: asked for, and
    there (a checkpoint's ``ema.safetensors``, or an export of an average). Recorded, so that loading
    the export with ``ema=False`` is refused instead of acting with the average unawares."""
    return ema and ((source / EMA_FILE).is_file() or bool(meta.get("ema")))
