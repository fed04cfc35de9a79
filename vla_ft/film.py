"""FiLM: the instruction scales and shifts the vision encoder's features, block by block.

Why: a VLA that reads the image and the instruction only inside the LM must learn to bind words
to image regions there; OpenVLA-OFT found its policies ignoring the instruction on ALOHA until
FiLM let the instruction shape the visual features themselves (OFT+, Kim, Finn & Liang 2025).
Here the mean of the prompt's token embeddings (the LM's input embeddings, B x D_lm) is projected
to a per-block scale ``gamma`` and shift ``beta`` (B x D_v each), applied to every ViT block's
output, prefix tokens included::

    x <- block(x) * (1 + gamma_i) + beta_i

The projection starts at zero, so a pretrained encoder starts out unchanged. Its input is
detached: the token embeddings learn through the LM as before, and a frozen vision encoder runs
with autograd only while the FiLM projection itself trains.

The modulation rides on forward hooks of the backbone's blocks, so parameter names, pretrained
weights, LoRA targets and FSDP units are those of the plain encoder.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from vla_ft.config import RecipeError


def vit_blocks(backbone: nn.Module, name: str) -> list[nn.Module]:
    """The transformer blocks of a timm ViT (``backbone.blocks``), in order; CNNs are refused."""
    blocks = getattr(backbone, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0:
        raise RecipeError(
            f"model.vision.film: needs a ViT whose transformer blocks are timm's `blocks`; '{name}' has none "
            "(a CNN or a hybrid): set model.vision.film: false"
        )
    return list(blocks)


class FiLM(nn.Module):
    """Prompt embedding (B, D_lm) -> per-block scale and shift (B, n_blocks, 2, D_v), zero at init."""

    def __init__(self, n_blocks: int, lang_width: int, vision_width: int):
        super().__init__()
        self.shape = (n_blocks, 2, vision_width)
        # skip_init draws no random numbers: a run with FiLM starts every other weight as the same seed without
        self.proj = nn.utils.skip_init(nn.Linear, lang_width, n_blocks * 2 * vision_width)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, prompt_embeds: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """prompt_embeds (B, Lp, D_lm), prompt_mask (B, Lp) bool -> (B, n_blocks, 2, D_v)."""
        mask = prompt_mask.unsqueeze(-1).to(prompt_embeds.dtype)
        mean = (prompt_embeds.detach() * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.proj(mean).unflatten(-1, self.shape)


def modulate(x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
    """x (B, N, D) block output, condition (B, 2, D) -> x * (1 + gamma) + beta."""
    return torch.addcmul(condition[:, 1:2], x, 1 + condition[:, 0:1])


def install_hooks(blocks: list[nn.Module], condition: Callable[[], torch.Tensor | None]) -> None:
    """Make block ``i`` modulate its output by ``condition()[:, i]`` whenever it is not None."""
    for i, block in enumerate(blocks):

        def hook(module: nn.Module, args: tuple, output: torch.Tensor, i: int = i) -> torch.Tensor | None:
            c = condition()
            return None if c is None else modulate(output, c[:, i])

        block.register_forward_hook(hook)
