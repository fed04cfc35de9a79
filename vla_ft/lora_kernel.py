"""LoRA computed inside its base layer's matmuls, for training speed.

peft's ``lora.Linear`` computes ``base(x) + lora_B(lora_A(x)) * s``: the adapter's full-width
output ``(tokens, out)`` is written, read back and added to the base output, and the backward
reads the full-width gradient once more for each of the adapter's GEMMs. For the LM's wide
layers (gate/up: 896 -> 4864 in a Qwen2.5-0.5B) those passes over memory cost more than the
rank-r matmuls themselves. With ``h = x A^T`` of shape (tokens, r) the same numbers come from:

    forward, out >= in:   y  = [x | h] @ [W | sB]^T        one GEMM, inner dim in + r
    forward, out <  in:   y  = x W^T + h (sB)^T            the (tokens, out) side is the small one
    backward, out >= in:  [dx_W | dh] = dy @ [W | sB]      one GEMM; dx = dx_W + dh A
    backward, out <  in:  dh = dy (sB);  dx = [dy | dh] @ [W ; A]   one GEMM, no second (tokens, in) pass
    adapters:             dA = dh^T x,  dB = s dy^T h      (the frozen W gets no gradient)

so no full-width adapter output exists and ``dy`` is read by two GEMMs instead of three
(-13.5% step time for LoRA r=32 on every LM linear on an H100; benchmarks/RESULTS.md gives the table).
The module stays peft's (same parameters, ``save_pretrained``, ``merge_and_unload``); only its
class changes, to :class:`vla_ft.lora_fused.FusedLoraLinear`, whose forward falls back to
peft's wherever the fused form does not apply (dropout, DoRA and other variants, several or
disabled adapters, merged weights, a trained base weight, mixed dtypes without autocast, extra
call arguments).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F


class _LowRankLinear(torch.autograd.Function):
    """``y = x W^T + b + s (x A^T) B^T`` for a frozen ``W``; x (..., in), W (out, in), A (r, in), B (out, r)."""

    @staticmethod
    def forward(ctx: Any, x, weight, bias, lora_a, lora_b, scaling: float):  # noqa: ANN001, ANN205
        x2 = x.reshape(-1, x.shape[-1])
        h = x2 @ lora_a.t()  # (T, r)
        sb = lora_b * scaling  # (out, r)
        if weight.shape[0] >= weight.shape[1]:
            y = F.linear(torch.cat([x2, h], dim=1), torch.cat([weight, sb], dim=1), bias)
        else:
            y = F.linear(x2, weight, bias) + h @ sb.t()
        ctx.save_for_backward(x2, h, weight, lora_a, lora_b)
        ctx.scaling, ctx.x_shape = scaling, x.shape
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, dy):  # noqa: ANN001, ANN205
        x2, h, weight, lora_a, lora_b = ctx.saved_tensors
        s, n_in = ctx.scaling, weight.shape[1]
        dy = dy.reshape(-1, weight.shape[0])  # (T, out)
        sb = lora_b * s
        if not ctx.needs_input_grad[0]:
            dh, dx = dy @ sb, None  # (T, r)
        elif weight.shape[0] >= n_in:
            g = dy @ torch.cat([weight, sb], dim=1)  # (T, in + r)
            dh = g[:, n_in:]
            dx = torch.addmm(g[:, :n_in], dh, lora_a).reshape(ctx.x_shape)
        else:
            dh = dy @ sb  # (T, r)
            dx = (torch.cat([dy, dh], dim=1) @ torch.cat([weight, lora_a], dim=0)).reshape(ctx.x_shape)
        d_a = dh.t() @ x2  # (r, in)
        d_b = (dy.t() @ h) * s  # (out, r)
        d_bias = dy.sum(0) if ctx.needs_input_grad[2] else None
        return dx, None, d_bias, d_a, d_b, None


def low_rank_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """``x W^T + b + scaling * (x A^T) B^T`` (see the module docstring); x (..., in) -> (..., out).

    Under autocast every operand is cast to the autocast dtype first (what autocast does for
    the matmuls of peft's path), so the custom function's ops see one dtype.
    """
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight, lora_a, lora_b = (t.to(dtype) for t in (x, weight, lora_a, lora_b))
        bias = None if bias is None else bias.to(dtype)
    return _LowRankLinear.apply(x, weight, bias, lora_a, lora_b, scaling)


_peft_forward = False  # set by peft_forward()


@contextlib.contextmanager
def peft_forward() -> Iterator[None]:
    """Run peft's own forward inside the block: its sub-layers (base, ``lora_A``, ``lora_B``) are
    then called as modules, so module hooks see them (:func:`vla_ft.flops.record_forward`)."""
    global _peft_forward
    before, _peft_forward = _peft_forward, True
    try:
        yield
    finally:
        _peft_forward = before


def peft_forward_forced() -> bool:
    """Whether a :func:`peft_forward` block is open."""
    return _peft_forward
