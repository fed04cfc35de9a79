"""``vla-ft export CHECKPOINT OUT``: a deployable policy directory with LoRA merged.

::

    OUT/
      language_model/       the LM with every LoRA adapter merged (save_pretrained: config.json +
                            model.safetensors), loadable by AutoModelForCausalLM on its own
      policy.safetensors    every other weight: vision encoder (adapters merged), projector,
                            proprio encoder, action queries, action and gripper heads
      model_meta.json       as in checkpoints, with "merged": true and LoRA off
      norm_stats.json       normalisation statistics (the policy inverts with these)
      tokenizer/            the tokenizer

``VLAPolicy.from_pretrained(OUT)`` loads it and predicts the same actions as from the checkpoint.
The directory is written under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from safetensors.torch import save_file

from vla_ft import checkpoint as ck
from vla_ft.lora import merge_lora
from vla_ft.model_files import LM_DIR, META_FILE, POLICY_WEIGHTS, load_model
from vla_ft.policy import resolve_directory


def export_policy(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the export of ``checkpoint`` (or of a run directory's newest checkpoint) to ``out``."""
    source, out = resolve_directory(checkpoint), Path(out)
    if out.exists() and any(out.iterdir()):
        raise ck.CheckpointError(f"export: {out} exists and is not empty; choose a new OUT directory")
    model, meta = load_model(source)
    merge_lora(model)
    meta.update(merged=True, source=str(source.resolve()))
    meta["model"]["lora"].update(enabled=False, vision=False)
    tmp = out.with_name(f".tmp_{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        model.language_model.save_pretrained(str(tmp / LM_DIR))
        others = {
            k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith(LM_DIR + ".")
        }
        save_file(others, str(tmp / POLICY_WEIGHTS))
        ck.save_json(tmp / META_FILE, meta)
        shutil.copy2(source / "norm_stats.json", tmp / "norm_stats.json")
        shutil.copytree(source / "tokenizer", tmp / "tokenizer")
        if out.exists():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
