"""Where and how a run executes: device, precision, seeding, and the process group.

One code path for CPU and GPU, one process or many: under torchrun (``RANK``/``WORLD_SIZE``
set) the process group is initialised here and every other module asks this object, never
the environment.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from vla_ft.config import Recipe, RecipeError


@dataclass
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # None = fp32, no autocast
    param_dtype: torch.dtype | None = None  # bf16: weights in bf16, fp32 masters (vla_ft.master_weights)
    rank: int = 0
    world_size: int = 1
    owns_group: bool = False  # this runtime joined the process group, so its shutdown leaves it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def all_true(self, flag: bool) -> bool:
        """Every rank agrees on a stop/skip decision: true only if true everywhere."""
        if not self.distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def all_true_each(self, flags: list[bool]) -> list[bool]:
        """:meth:`all_true` for several flags in one collective."""
        if not self.distributed:
            return list(flags)
        t = torch.tensor([1.0 if f else 0.0 for f in flags], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return [bool(v) for v in t.tolist()]

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the ranks (in place; queued on the device, no host wait)."""
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def gather_objects(self, obj: Any) -> list[Any]:
        """``obj`` (picklable host data) of every rank, in rank order."""
        if not self.distributed:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def any_true(self, flag: bool) -> bool:
        return not self.all_true(not flag)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def is_main_process() -> bool:
    """Rank 0 of a torchrun launch, or the only process. Asks the launcher's ``RANK`` rather than a
    :class:`Runtime`: data loading and the sweep runner speak before the process group exists or
    after it is gone."""
    return os.environ.get("RANK", "0") == "0"


def say(message: str) -> None:
    """Print on rank 0 only."""
    if is_main_process():
        print(message, flush=True)


def init_runtime(recipe: Recipe) -> Runtime:
    """Pick the device and precision; join the process group when launched by torchrun."""
    t = recipe.train
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())
    if t.device == "cuda" and not torch.cuda.is_available():
        raise RecipeError("train.device: cuda requested but no CUDA device is available")
    device = torch.device("cuda", local) if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    precision = t.precision if t.precision != "auto" else ("bf16" if want_cuda else "fp32")
    if precision == "fp16" and not want_cuda:
        raise RecipeError("train.precision: fp16 needs CUDA (use bf16 or fp32 on CPU)")
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    param_dtype = resolve_param_dtype(recipe, precision, world)
    if t.threads > 0:
        torch.set_num_threads(t.threads)
    joins = world > 1 and not dist.is_initialized()  # else a sweep (vla-ft ablate) holds one for all its runs
    if joins:
        backend = recipe.distributed.backend
        backend = ("nccl" if want_cuda else "gloo") if backend == "auto" else backend
        timeout = datetime.timedelta(minutes=recipe.distributed.timeout_min)
        dist.init_process_group(backend=backend, device_id=device if backend == "nccl" else None, timeout=timeout)
    return Runtime(device, amp, param_dtype, rank, world, owns_group=joins)


def resolve_param_dtype(recipe: Recipe, precision: str, world: int) -> torch.dtype | None:
    """``train.param_dtype`` for this process: bf16 (weights in bf16, fp32 masters) or None (fp32).

    Several processes: FSDP's policy already computes with bf16 weights over fp32 shards, and
    DDP would all-reduce bf16 gradients, so bf16 masters are a single-process path.
    """
    want = recipe.train.param_dtype
    if want == "bf16" and precision != "bf16":
        raise RecipeError(
            f"train.param_dtype: bf16 needs train.precision bf16 (this run resolves precision to {precision}; "
            "'auto' is fp32 on CPU)"
        )
    if want == "bf16" and world > 1 and recipe.distributed.strategy == "ddp":
        raise RecipeError(
            "train.param_dtype: bf16 under DDP would all-reduce bf16 gradients; use distributed.strategy=fsdp "
            "(fp32 shards, bf16 compute, fp32 reduction) or train.param_dtype=fp32"
        )
    bf16 = want == "bf16" or (want == "auto" and precision == "bf16")
    return torch.bfloat16 if bf16 and world == 1 else None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def shutdown(rt: Runtime) -> None:
    """Leave the process group if ``rt`` joined it (a group made and destroyed per run of a sweep
    races with gloo's rendezvous: the next run's connections fail or hang)."""
    if rt.owns_group and dist.is_initialized():
        dist.destroy_process_group()
