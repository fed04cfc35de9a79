"""Two adjustments to a transformers causal LM that keep its compiled training step fast.

**Causal SDPA without a mask.** The VLA feeds the LM rows without padding inside
(``model._pads_to_the_end``), so plain causal attention is exact and SDPA can run its
``is_causal`` kernel with grouped K/V heads. In eager mode transformers sees that and passes no
mask. While dynamo traces, transformers releases before the torch 2.14 fix (e.g. 5.17 with torch
2.11) cannot prove the mask is plain and build a (B, 1, L, L) mask instead; SDPA then loses
``is_causal`` and ``enable_gqa``, K/V are expanded to every query head, and cuDNN runs its masked
kernel. On an H100 at the reference shapes (B 64, 14/2 heads, 245 positions) one LM layer's
attention took 491 us forward + backward that way vs 290 us on the causal path (4.8 ms of a
113 ms step over 24 layers). The fix is transformers' own extension point: an attention
implementation registered under :data:`NAME` that is SDPA itself, with a mask function that
returns ``None`` (SDPA's ``is_causal``) exactly when the mask asked for is the plain causal one
over a full, unpadded prefill, and defers to transformers' SDPA mask otherwise (padding, packed
sequences, sliding windows, a KV cache). The name never reaches a saved config.

**Rotary tables computed once per forward.** The LM computes its rotary cos/sin tables (B, L, d)
once and hands them to every layer; inductor inlines that cheap-looking pointwise producer into
each consumer, so every layer's query/key rotation, forward and backward, recomputes ``cos`` and
``sin`` per element (about 14 M elements of Q per layer at the reference shapes): those kernels
ran compute-bound at ~40% of the memory bandwidth. :func:`compute_rotary_once` passes the tables
through an opaque identity op, so they are materialised once and the rotations only load them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

NAME = "vla_ft_sdpa"


def use_causal_sdpa(lm: nn.Module) -> None:
    """Switch an LM built with ``sdpa`` to :data:`NAME`, in place, where transformers can register it
    and the model picks its attention function by name from transformers' AttentionInterface
    (``_can_set_attn_implementation``). Models that dispatch on the literal name ``"sdpa"``
    (Falcon's attention-class table) keep ``sdpa``; building them as :data:`NAME` fails."""
    can_set = getattr(lm, "_can_set_attn_implementation", None)
    if getattr(lm.config, "_attn_implementation", None) != "sdpa" or can_set is None or not can_set():
        return
    if _register():
        lm.set_attn_implementation(NAME)


def _register() -> bool:
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError:
        return False
    if NAME not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(NAME, ALL_ATTENTION_FUNCTIONS["sdpa"])
    if NAME not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(NAME, causal_or_sdpa_mask)
    return True


def causal_or_sdpa_mask(**kwargs: Any) -> Any:
    """transformers' mask-interface call -> ``None`` for a plain causal prefill, else SDPA's mask."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    if is_plain_causal_prefill(kwargs):
        return None
    return ALL_MASK_ATTENTION_FUNCTIONS["sdpa"](**kwargs)


def is_plain_causal_prefill(kwargs: dict[str, Any]) -> bool:
    """Whether the mask asked for is causal over queries 0..L-1 and keys 0..L-1, with nothing
    masked besides: no padding mask, transformers' causal function unwrapped (packing, sliding
    windows and ``or``/``and`` masks wrap it), no cache offset.

    Reads shapes and Python ints only, never tensor values, so it holds while tracing. Handles
    both transformers signatures: ``q_length``/``q_offset`` (5.x) and ``cache_position`` (4.5x).
    """
    from transformers.masking_utils import causal_mask_function

    if kwargs.get("attention_mask") is not None or kwargs.get("mask_function") is not causal_mask_function:
        return False
    if not kwargs.get("allow_is_causal_skip", True) or kwargs.get("local_size") is not None:
        return False
    if "q_length" in kwargs:
        q_length, q_offset = kwargs["q_length"], kwargs.get("q_offset", 0)
    else:
        cache_position = kwargs.get("cache_position")
        if cache_position is None:
            return False
        q_length, q_offset = cache_position.shape[0], 0
    offsets = (q_offset, kwargs.get("kv_offset", 0))
    return all(isinstance(o, int) and o == 0 for o in offsets) and q_length == kwargs.get("kv_length")


@torch.library.custom_op("vla_ft::materialized", mutates_args=(), schema="(Tensor x) -> Tensor")
def materialized(x: torch.Tensor) -> torch.Tensor:
    """A copy of ``x`` that compilers cannot see through, so ``x`` is computed once, not inlined."""
    return x.clone()


@materialized.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


materialized.register_autograd(lambda ctx, grad: grad)  # an identity (tables carry no gradient today)


class RotaryOnce(nn.Module):
    """An LM's rotary embedding whose floating-point outputs (cos, sin: (B, L, d)) are materialised tensors.

    Calls the wrapped module every forward with whatever arguments the decoder passes (Gemma 3 and
    Olmo 3 add a ``layer_type``), so dynamic RoPE variants stay exact; attributes the decoder reads
    from its rotary module (``layer_types``, ``config``, ...) are the wrapped module's.
    """

    def __init__(self, rotary: nn.Module):
        super().__init__()
        self.rotary = rotary

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.rotary(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            return _materialized_if_float(out)
        if type(out) is tuple:
            return tuple(_materialized_if_float(t) for t in out)
        return out

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "rotary" or name.startswith("__"):
                raise
            return getattr(self.rotary, name)


def _materialized_if_float(t: Any) -> Any:
    return materialized(t) if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def compute_rotary_once(decoder: nn.Module) -> None:
    """Wrap ``decoder.rotary_emb`` (transformers' shared rotary module) in :class:`RotaryOnce`, in place.

    Only a rotary module with no state-dict entries (transformers' are non-persistent buffers) is
    wrapped, so the model's state-dict keys never change (Mistral Large 3's rotary has a persistent
    ``alpha``, which wrapping would rename).
    """
    rotary = getattr(decoder, "rotary_emb", None)
    if isinstance(rotary, nn.Module) and not isinstance(rotary, RotaryOnce) and not rotary.state_dict():
        decoder.rotary_emb = RotaryOnce(rotary)
