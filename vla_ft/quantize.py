"""4-bit LM weights through bitsandbytes (QLoRA): ``model.language.quantize: nf4 | fp4``.

Why: with LoRA or a frozen LM, the LM's base weights never change, yet in bf16 they are most of a
VLA's memory (a 7B LM: 14 GB). Stored as block-wise 4-bit codes (64 weights per block, their
absmax quantised again, as QLoRA does) they take about a quarter of that (0.52 bytes per weight with
the statistics). The matmuls dequantise the weight to the input's dtype, in forward and in backward:
memory for time (``benchmarks/RESULTS.md``).

Every linear layer of the LM is quantised except the output head: it usually shares its weight with
the input embeddings (a lookup, not a matmul) and runs only at the supervised positions
(:meth:`vla_ft.model.VLA.language_logits`). The codes depend on the device that made them
(bitsandbytes' CPU and CUDA kernels gave different absmax codes for the same weights), so the run
quantises on its own device, and checkpoints store the codes and their statistics as bitsandbytes serialises them
(``<layer>.weight`` plus ``<layer>.weight.absmax``, ``.quant_map``, ...): resuming and inference
run against the very weights training saw, without the hub. Exports and ``model.init_from``
read them dequantised (:func:`dequantize_state`) into a model built without quantisation: an
export's LM is a plain fp32 LM that any transformers loader opens.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vla_ft.config import RecipeError

KEY = "model.language.quantize"
QUANT_STATE = ".quant_state.bitsandbytes__"  # in the key bitsandbytes saves a 4-bit weight's state under


def bitsandbytes(key: str = KEY) -> Any:
    """The bitsandbytes module, or a RecipeError naming the recipe key that needs it."""
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise RecipeError(f"{key}: needs bitsandbytes (pip install 'vla-ft[quant]'): {err}") from None
    return bnb


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> every bitsandbytes 4-bit linear under ``model`` (none when bitsandbytes is not loaded)."""
    import sys

    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return {}
    return {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def weight_count(p: torch.Tensor) -> int:
    """Weights a parameter holds: a 4-bit one packs two in each of its bytes (its shape is the codes')."""
    state = getattr(p, "quant_state", None)
    return state.shape.numel() if state is not None else p.numel()


def dtype_name(p: torch.Tensor) -> str:
    """'nf4' / 'fp4' for a 4-bit weight, else the dtype ('bfloat16')."""
    state = getattr(p, "quant_state", None)
    return state.quant_type if state is not None else str(p.dtype).removeprefix("torch.")


def quantize_linears(lm: nn.Module, quant_type: str, device: torch.device | str | None) -> int:
    """Replace every ``nn.Linear`` of ``lm`` but its output head with a 4-bit one, in place; returns
    how many. ``device``: where the codes are computed (the weights move there); None leaves the
    weights unquantised, for a checkpoint's codes to replace (:func:`load_quantized_state`)."""
    bnb = bitsandbytes()
    head = lm.get_output_embeddings()
    targets = [(name, m) for name, m in lm.named_modules() if type(m) is nn.Linear and m is not head]
    for name, linear in targets:
        parent, _, leaf = name.rpartition(".")
        q = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=None,  # the first input's dtype: bf16 under bf16 weights, fp32 on a CPU run
            compress_statistics=True,
            quant_type=quant_type,
            device="meta",
        )
        weight = bnb.nn.Params4bit(
            linear.weight.data, requires_grad=False, compress_statistics=True, quant_type=quant_type, module=q
        )
        q.weight = weight if device is None else weight.to(device)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.data.to(q.weight.device), requires_grad=False)
        q.requires_grad_(False)
        # bitsandbytes >= 0.48 repacks the codes in place on an AVX512-BF16 CPU at the first eval-mode,
        # no-grad forward (validation, a policy) and computes in bf16 from then on: the layer's weight
        # no longer dequantises to what it trained with (peft's DoRA norms, the saved codes)
        q.support_avx512bf16_for_cpu = False
        setattr(lm.get_submodule(parent) if parent else lm, leaf, q)
    for p in lm.parameters():  # a LM loaded in bf16 for quantising: what stays full precision is fp32
        if p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
    return len(targets)


def load_quantized_state(model: nn.Module, state: dict[str, torch.Tensor]) -> set[str]:
    """Put a checkpoint's 4-bit codes into ``model``'s 4-bit layers; pops their keys from ``state``
    (what is left is ordinary tensors) and returns the weight names it filled."""
    bnb = bitsandbytes()
    filled = set()
    for name, module in quantized_layers(model).items():
        key = f"{name}.weight"
        if key not in state:
            continue
        stats = {k[len(key) + 1 :]: state.pop(k) for k in [k for k in state if k.startswith(key + ".")]}
        device = module.weight.device
        module.weight = bnb.nn.Params4bit.from_prequantized(
            state.pop(key), stats, requires_grad=False, device=device, module=module
        )
        filled.add(key)
    return filled


def dequantize_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A weights file's 4-bit layers as fp32 weights (``<layer>.weight``, its statistics' keys
    dropped), in place, for a model built without quantisation; other tensors are left as they are."""
    for key in [k for k in state if QUANT_STATE in k]:
        weight = key[: key.index(QUANT_STATE)]
        stats = {k[len(weight) + 1 :]: state.pop(k) for k in [k for k in state if k.startswith(weight + ".")]}
        bnb = bitsandbytes()
        packed = bnb.nn.Params4bit.from_prequantized(state[weight], stats, requires_grad=False, device="cpu")
        state[weight] = bnb.functional.dequantize_4bit(packed.data, packed.quant_state).float()
    return state
