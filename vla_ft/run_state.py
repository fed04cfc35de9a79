"""Training state in and out of checkpoints, and the recipe-equivalence check on resume.

The directory layout is drawn in :mod:`vla_ft.checkpoint`.
"""

from __future__ import annotations

import dataclasses
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, load_model, save_file, save_model

from vla_ft import checkpoint as ck
from vla_ft.config import Recipe, RecipeError, save_recipe, to_dict

if TYPE_CHECKING:
    from vla_ft.run_setup import Run


@dataclass
class TrainState:
    step: int = 0  # optimizer updates applied (a skipped step does not count)
    epoch: int = 0
    consumed: int = 0  # samples of the current epoch already used, all ranks together
    skipped: int = 0
    consecutive_skips: int = 0
    scaler_skips: int = 0
    best_value: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0


# Keys whose change makes a resumed run a different experiment (refused), by prefix.
BREAKING = ("model.", "data.format", "data.path", "data.cameras", "data.state_key", "data.action_key", "data.chunk",
            "data.history", "data.normalize", "data.raw_dims", "data.language_target", "data.synthetic.",
            "loss.gripper.dims", "optim.accumulation", "train.batch_size", "train.seed")
IGNORED = ("train.resume", "output_dir")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def check_resume_compatible(saved: dict[str, Any], current: Recipe, where: Path) -> None:
    """Error for changes that break equivalence with the saved run; warning for the rest."""
    old, new = _flatten(saved), _flatten(to_dict(current))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and not k.startswith(IGNORED))
    breaking = [k for k in changed if k.startswith(BREAKING)]
    if breaking:
        detail = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in breaking)
        raise RecipeError(f"cannot resume from {where}: the recipe changed in ways that break equivalence: {detail}")
    if changed:
        warnings.warn(f"resuming from {where} with changed keys: {', '.join(changed)}", stacklevel=2)


def save_training_checkpoint(run: Run) -> Path | None:
    """Write ``checkpoints/step_<N>`` (rank 0), rotate, and return its path."""
    path = None
    if run.rt.is_main:
        root = run.run_dir / "checkpoints"
        model = run.model
        estimate = sum(t.numel() * t.element_size() for t in model.state_dict().values())

        def write(tmp: Path) -> None:
            save_model(model, str(tmp / "model.safetensors"))
            if model.lora_modules and "language_model" in model.lora_modules:
                model.language_model.save_pretrained(str(tmp / "adapter"))
            if run.recipe.checkpoint.save_optimizer:
                torch.save(run.optimizer.state_dict(), tmp / "optimizer.pt")
            loss_state = {k: v.detach().cpu().contiguous() for k, v in run.loss_fn.state_dict().items()}
            if loss_state:
                save_file(loss_state, str(tmp / "loss_state.safetensors"))
            torch.save(ck.rng_state(), tmp / "rng.pt")
            ck.save_json(tmp / "trainer_state.json", trainer_json(run))
            ck.save_json(tmp / "norm_stats.json", run.data.normalizer.to_dict())
            save_recipe(run.recipe, tmp / "config.yaml")
            run.tokenizer.save_pretrained(str(tmp / "tokenizer"))

        path = ck.write_checkpoint(root, run.state.step, write, estimate_bytes=estimate)
        best = root / ck.step_dir_name(run.state.best_step) if run.state.best_step is not None else None
        ck.rotate(root, run.recipe.checkpoint.keep_last, {p for p in (best, run.resumed_from) if p is not None})
    run.rt.barrier()
    return path


def trainer_json(run: Run) -> dict[str, Any]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "state": dataclasses.asdict(run.state),
        "world_size": run.rt.world_size,
        "scaler": run.scaler.state_dict() if run.scaler else None,
        "scheduler": {"step": run.state.step, "kind": run.recipe.optim.scheduler},
        "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python_rng": [py_state[0], list(py_state[1]), py_state[2]],
        "frozen": sorted(run.model.frozen),
    }


def load_training_checkpoint(run: Run, path: Path) -> None:
    """Restore weights, optimizer, loss strategy, scaler, RNG and data position from ``path``."""
    load_model(run.model, str(path / "model.safetensors"), strict=True)
    if (path / "optimizer.pt").is_file():
        run.optimizer.load_state_dict(ck.torch_load(path / "optimizer.pt"))
    elif run.recipe.checkpoint.save_optimizer:
        warnings.warn(f"{path} has no optimizer state: resuming with a fresh optimizer", stacklevel=2)
    if (path / "loss_state.safetensors").is_file():
        run.loss_fn.load_state_dict(load_file(str(path / "loss_state.safetensors")))
    meta = ck.load_json(path / "trainer_state.json")
    run.state = TrainState(**meta["state"])
    if run.scaler and meta.get("scaler"):
        run.scaler.load_state_dict(meta["scaler"])
    ck.set_rng_state(ck.torch_load(path / "rng.pt"))
    kind, keys, pos, *rest = meta["numpy_rng"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, *rest))
    version, internal, gauss = meta["python_rng"]
    random.setstate((version, tuple(internal), gauss))


def read_saved_recipe(path: Path) -> dict[str, Any]:
    return yaml.safe_load((path / "config.yaml").read_text())


def read_norm_stats(path: Path) -> dict[str, Any]:
    return ck.load_json(path / "norm_stats.json")
