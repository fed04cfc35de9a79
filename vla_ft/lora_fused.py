"""peft's LoRA linear switched to :func:`vla_ft.lora_kernel.low_rank_linear` (same parameters, state
dict, ``save_pretrained`` and ``merge_and_unload``; only the module's class changes).

Imported only where peft is (:func:`vla_ft.lora.wrap`): importing peft takes seconds.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn

from vla_ft.lora_kernel import low_rank_linear, peft_forward_forced


class FusedLoraLinear(PeftLoraLinear):
    """peft's LoRA linear whose plain case (one active vanilla adapter, no dropout, frozen base, one
    dtype or autocast) runs :func:`low_rank_linear`; everything else is peft's own forward."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter = self._fusable_adapter(x, args, kwargs)
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        return low_rank_linear(x, base.weight, base.bias, a, b, self.scaling[adapter])

    def _fusable_adapter(self, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
        if peft_forward_forced() or args or kwargs or self.disable_adapters or self.merged:
            return None
        if len(self.active_adapters) != 1:
            return None
        (name,) = self.active_adapters
        base = self.get_base_layer()
        plain = (
            name in self.lora_A
            and name not in getattr(self, "lora_variant", {})  # DoRA and the like (peft >= 0.15)
            and not getattr(self, "use_dora", {}).get(name, False)  # DoRA before peft 0.15
            and isinstance(self.lora_dropout[name], nn.Identity)
            and type(base) is nn.Linear
            and not self.fan_in_fan_out
            and not base.weight.requires_grad
            and (  # peft casts between mixed dtypes itself; autocast makes one dtype of them
                torch.is_autocast_enabled(x.device.type)
                or x.dtype == base.weight.dtype == self.lora_A[name].weight.dtype == self.lora_B[name].weight.dtype
            )
        )
        return name if plain else None


def fuse_lora_layers(module: nn.Module) -> int:
    """Switch every peft ``lora.Linear`` under ``module`` to :class:`FusedLoraLinear`, in place;
    returns how many. Parameters, state dict and peft's saving and merging are unchanged."""
    n = 0
    for m in module.modules():
        if type(m) is PeftLoraLinear:
            m.__class__ = FusedLoraLinear
            n += 1
    return n
