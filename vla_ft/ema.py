"""``train.ema_decay``: an exponential moving average of the trained weights, the weights a run ships.

Why: the average of the last few hundred updates is smoother than any one of them, and
fine-tuned policies act better with it (openpi fine-tunes pi0 with an EMA of 0.99). With the
average on, validation measures it (so ``checkpoints/best`` and early stopping select on it),
every checkpoint stores it in ``ema.safetensors`` next to the trained weights (which resuming
needs), and ``VLAPolicy``, ``vla-ft eval`` and ``vla-ft export`` load it. (A LoRA checkpoint's
``adapter/`` keeps the trained adapters, for peft; ``vla-ft export`` merges the averaged ones.)

After every optimizer step that counts: ``ema += (1 - decay) (w - ema)``, in fp32, for every
parameter the optimizer holds (the fp32 masters where the model computes in bf16). A module
frozen until step N averages its frozen weights until then, so its average starts from them.
The step's finite flag scales the update on the device, so a skipped step leaves the average
as it was without the host reading the flag (``vla_ft.train.queue_update``).

``train.ema_warmup`` (default on) ramps the decay of update t (0-based) as
``min(decay, (1 + t) / (10 + t))``, as TensorFlow's ExponentialMovingAverage does with
``num_updates``: with a constant 0.999 the initial weights would still hold 0.999^1000 = 37% of
the average after a 1000-step fine-tune; with the ramp they are gone within the first steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vla_ft import checkpoint as ck
from vla_ft.master_weights import optimized

if TYPE_CHECKING:
    from vla_ft.config import TrainConfig

EMA_FILE = "ema.safetensors"


class WeightEMA:
    """fp32 averages of the parameters ``optimizer`` updates, named as in ``model.state_dict()``."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, decay: float, warmup: bool = True):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay: must be in (0, 1), got {decay}")
        self.decay, self.warmup = decay, warmup
        name_of = {id(optimized(model, p)): n for n, p in model.named_parameters()}
        # the model's parameters among the optimizer's (a learned loss weighting has its own)
        self.sources = [p for g in optimizer.param_groups for p in g["params"] if id(p) in name_of]
        self.names = [name_of[id(p)] for p in self.sources]
        self.weights = [_computed_with(model, p) for p in self.sources]
        self.averages = [p.detach().float().clone() for p in self.sources]

    @torch.no_grad()
    def update(self, counts: torch.Tensor, step: int) -> None:
        """Update ``step`` (0-based) of the average, over the parameters that train now; ``counts``
        (0-dim, on their device) is 1 for a step that counted and 0 for a skipped one (then nothing
        changes, and the step's retry is update ``step`` again)."""
        live = [i for i, p in enumerate(self.sources) if p.requires_grad]
        if not live:
            return
        weight = (1.0 - self.decay_at(step)) * counts.float()  # a tensor: the host never reads the flag
        torch._foreach_lerp_([self.averages[i] for i in live], [self.sources[i] for i in live], [weight] * len(live))

    def decay_at(self, step: int) -> float:
        """The decay of update ``step`` (0-based)."""
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Inside the block the model computes with the averages (validation); after it, with the
        trained weights again, bit for bit."""
        with torch.no_grad():
            trained = [w.detach().clone() for w in self.weights]
            torch._foreach_copy_(self.weights, self.averages)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.weights, trained)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: a.detach().cpu().contiguous() for n, a in zip(self.names, self.averages, strict=True)}

    def save(self, path: Path) -> None:
        save_file(self.state_dict(), str(path))

    @torch.no_grad()
    def load(self, path: Path) -> None:
        """The averages of a checkpoint (resume); a missing file or name is a CheckpointError."""
        if not path.is_file():
            raise ck.CheckpointError(
                f"{path.parent}: no {EMA_FILE}, though train.ema_decay is set: the checkpoint was written without it"
            )
        with ck.reading(path):
            saved = load_file(str(path))
        missing = [n for n in self.names if n not in saved]
        if missing:
            raise ck.CheckpointError(
                f"{path}: lacks the average of {', '.join(missing[:3])}: {ck.damaged(path.parent)}"
            )
        for name, average in zip(self.names, self.averages, strict=True):
            average.copy_(saved[name])


def weight_average(model: nn.Module, optimizer: torch.optim.Optimizer, train: TrainConfig) -> WeightEMA | None:
    """The run's average (``train``: the recipe's ``TrainConfig``), or None when ``ema_decay`` is 0 (off)."""
    return WeightEMA(model, optimizer, train.ema_decay, train.ema_warmup) if train.ema_decay else None


def _computed_with(model: nn.Module, source: torch.Tensor) -> torch.Tensor:
    """The weight the model computes with for what the optimizer updates: a master's bf16 weight,
    else the parameter itself."""
    masters = getattr(model, "master_weights", None)
    weight = masters.weight_of(source) if masters is not None else None
    return source if weight is None else weight


def load_averages(model: nn.Module, directory: Path) -> bool:
    """Put a checkpoint's ``ema.safetensors`` into ``model`` (inference); False when it has none."""
    path = Path(directory) / EMA_FILE
    if not path.is_file():
        return False
    with ck.reading(path, directory):
        saved = load_file(str(path))
        params = dict(model.named_parameters())
        unknown = sorted(set(saved) - set(params))
        if unknown:
            raise ck.CheckpointError(f"{path}: averages of weights the model does not have: {', '.join(unknown[:3])}")
        with torch.no_grad():
            for name, average in saved.items():
                params[name].copy_(average)
    return True
