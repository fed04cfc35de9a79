"""``train.param_dtype: bf16``: the model computes with bf16 weights, the optimizer updates fp32 masters.

Why (speed): autocast over fp32 weights casts every weight to bf16 in every forward, and the
residual streams of the ViT and the LM stay fp32 (fp32 embeddings plus bf16 matmul outputs
promote to fp32), so every norm, residual add and activation kernel moves fp32 activations.
With bf16 weights the streams are bf16. Reference VLA on an H100, full fine-tune: 122.2 vs
126.5 ms per step and 27.6 vs 29.1 GB (``benchmarks/RESULTS.md``).

Precision stays where it matters. Every parameter the optimizer updates has an fp32 master
copy; after each micro-batch's backward the trainer moves the bf16 gradients into the masters'
fp32 ``.grad`` (:meth:`MasterWeights.collect_grads`: one foreach pass, not a kernel per
parameter), so micro-batches accumulate in fp32; clipping and the update run on the masters;
an optimizer step post-hook writes the updated masters back into the bf16 weights.
Checkpoints hold the masters (:func:`full_precision`), so resuming is exact and exported
weights are fp32. On a GPU with AdamW, :class:`vla_ft.master_adamw.MasterAdamW` folds the
gradient copy and the write-back into its update kernel (the last micro-batch's bf16 gradients
stay where autograd left them, ``collect_grads(keep_bf16=True)``). Parameters that never
train (a frozen encoder, LoRA base weights) are bf16 only: no master, half the memory.
Buffers (rotary frequencies, pixel statistics) stay fp32.

Single process only: FSDP's ``MixedPrecisionPolicy`` does the same with sharded masters, and
DDP would all-reduce bf16 gradients (``vla_ft.runtime`` decides).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn


class MasterWeights:
    """fp32 masters of ``trained`` (parameters of ``model`` that train at some point); every
    floating parameter of ``model`` is converted to ``dtype``."""

    def __init__(self, model: nn.Module, trained: Sequence[nn.Parameter], dtype: torch.dtype):
        self.params = list(trained)
        self.masters = [nn.Parameter(p.detach().float().clone(), requires_grad=p.requires_grad) for p in self.params]
        self._master = {id(p): m for p, m in zip(self.params, self.masters, strict=True)}
        self._weight = {id(m): p for p, m in zip(self.params, self.masters, strict=True)}
        cast_parameters(model, dtype)

    def master(self, p: torch.Tensor) -> torch.Tensor:
        """What the optimizer updates for ``p``: its master, or ``p`` itself (not a model weight)."""
        return self._master.get(id(p), p)

    def weight_of(self, master: torch.Tensor) -> torch.Tensor | None:
        """The bf16 model weight of ``master`` (None: not a master)."""
        return self._weight.get(id(master))

    def param_groups(self, groups: list[dict]) -> list[dict]:
        """Optimizer groups over the masters instead of the model's parameters."""
        return [{**g, "params": [self.master(p) for p in g["params"]]} for g in groups]

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Write the masters back after every ``optimizer.step()`` (also a step the fused kernel
        skipped on the device: the masters are then unchanged and so are the weights), unless
        the optimizer writes the weights itself (:class:`vla_ft.master_adamw.MasterAdamW`)."""
        if not getattr(optimizer, "writes_weights", False):
            optimizer.register_step_post_hook(lambda *_: self.write_back(trainable_only=True))

    @torch.no_grad()
    def collect_grads(self, keep_bf16: bool = False) -> None:
        """Add the bf16 gradients of the last backward to the masters' fp32 ``.grad`` (the first
        micro-batch of a step copies into fresh ones) and free the bf16 gradients.

        ``keep_bf16`` (the last micro-batch, for an optimizer that reads bf16 gradients): a
        gradient with no fp32 one to add to stays where it is, and the optimizer reads it."""
        copy_dst, copy_src, add_dst, add_src = [], [], [], []
        for p, m in zip(self.params, self.masters, strict=True):
            if p.grad is None or (keep_bf16 and m.grad is None):
                continue
            if m.grad is None:
                m.grad = torch.empty_like(m)
                copy_dst.append(m.grad)
                copy_src.append(p.grad)
            else:
                add_dst.append(m.grad)
                add_src.append(p.grad)
            p.grad = None
        if copy_dst:
            torch._foreach_copy_(copy_dst, copy_src)
        if add_dst:
            torch._foreach_add_(add_dst, add_src)

    def sync_requires_grad(self) -> None:
        """Masters follow their parameters' ``requires_grad`` (freeze plans flip the parameters)."""
        for p, m in zip(self.params, self.masters, strict=True):
            m.requires_grad_(p.requires_grad)

    @torch.no_grad()
    def write_back(self, trainable_only: bool = False) -> None:
        both = zip(self.params, self.masters, strict=True)
        pairs = [(p, m) for p, m in both if p.requires_grad or not trainable_only]
        if pairs:
            torch._foreach_copy_([p for p, _ in pairs], [m for _, m in pairs])

    @contextlib.contextmanager
    def full_precision(self) -> Iterator[None]:
        """The model's parameters are the fp32 masters inside the block (saving writes them, loading
        fills them); on exit the bf16 weights come back, refreshed from the masters."""
        low = [p.data for p in self.params]
        for p, m in zip(self.params, self.masters, strict=True):
            p.data = m.data
        try:
            yield
        finally:
            for p, data in zip(self.params, low, strict=True):
                p.data = data
            self.write_back()


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Floating-point parameters to ``dtype``, in place; buffers keep theirs (the rotary frequencies
    and pixel statistics stay fp32: in bf16 the rotary phase is off by ~0.2 rad at position 230)."""
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype)


def full_precision(model: nn.Module) -> contextlib.AbstractContextManager:
    """:meth:`MasterWeights.full_precision` of ``model``'s masters; a no-op without them."""
    masters = getattr(model, "master_weights", None)
    return masters.full_precision() if masters is not None else contextlib.nullcontext()


def optimized(model: nn.Module, p: torch.Tensor) -> torch.Tensor:
    """The tensor the optimizer updates for ``model``'s parameter ``p``."""
    masters = getattr(model, "master_weights", None)
    return masters.master(p) if masters is not None else p
