"""Prompt and language-target tokenisation.

Targets: "text" trains the LM to say the frame's narration; "action_tokens" is OpenVLA-style,
each normalised action value clipped to [-1, 1] and binned, bin b said as token id
``action_token_ids[b]``, step after step up to the chunk's first missing step; "none" trains no
language output.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

TARGETS = ("none", "text", "action_tokens")


def action_to_bins(actions: np.ndarray, n_bins: int) -> np.ndarray:
    """actions (..., A) in [-1, 1] (clipped) -> bin ids (..., A) int64 in [0, n_bins)."""
    x = (np.clip(actions, -1.0, 1.0) + 1.0) / 2.0
    return np.minimum((x * n_bins).astype(np.int64), n_bins - 1)


def bins_to_action(bins: np.ndarray, n_bins: int) -> np.ndarray:
    """Inverse of :func:`action_to_bins` up to quantisation: bin ids -> bin centres in [-1, 1]."""
    return ((np.asarray(bins, np.float32) + 0.5) / n_bins * 2.0 - 1.0).astype(np.float32)


def special_prefix(tokenizer: Any) -> list[int]:
    """The ids ``tokenizer`` itself puts before a text: Llama's and Gemma's BOS, nothing for Qwen.

    A pretrained LM saw them at the start of every sequence (Gemma's outputs degrade without its
    BOS), so every prompt starts with them. What the tokenizer appends (an EOS) is not kept: the
    prompt is followed by the image tokens and the target, not ended.
    """
    probe = "a"
    bare = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return [int(i) for i in full[:start]]
    return []


class PromptTokenizer:
    """Turns (instruction, text, actions) into (prompt_ids (Lp,), target_ids (Lt,)), both int64.

    ``tokenizer`` is any HF tokenizer: it is called as ``tokenizer(text, add_special_tokens=False)``
    and its ``eos_token_id`` (possibly None: then no eos) ends every non-empty target. Prompts start
    with ``prefix`` (default: :func:`special_prefix`, the tokenizer's own BOS if it adds one).
    """

    def __init__(
        self,
        tokenizer: Any,
        template: str,
        target: str,
        action_token_ids: Sequence[int] = (),
        prefix: Sequence[int] | None = None,
    ):
        if "{instruction}" not in template:
            raise ValueError(f"prompt_template: {template!r} has no {{instruction}} placeholder")
        if target not in TARGETS:
            raise ValueError(f"language_target: unknown target '{target}'; valid: {', '.join(TARGETS)}")
        if target == "action_tokens" and not len(action_token_ids):
            raise ValueError("language_target: action_tokens needs the token id of each bin")
        self.tokenizer, self.template, self.target = tokenizer, template, target
        self.action_token_ids = np.asarray(action_token_ids, np.int64)
        eos = getattr(tokenizer, "eos_token_id", None)
        self._eos = [] if eos is None else [int(eos)]
        self.prefix = special_prefix(tokenizer) if prefix is None else [int(i) for i in prefix]

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def __call__(
        self, instruction: str, text: str | None, actions_norm: np.ndarray, action_mask: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """actions_norm: (chunk, A) normalised; action_mask: (chunk,) bool (False steps are not tokenised).

        ``text`` None (a frame without narration) gives an empty "text" target: nothing to learn
        there, not even eos. Whether the dataset has text at all is :class:`RobotDataset`'s check.
        """
        prompt = np.asarray(self.prefix + self._encode(self.template.format(instruction=instruction)), np.int64)
        if self.target == "none" or (self.target == "text" and text is None):
            target: list[int] = []
        elif self.target == "text":
            target = self._encode(text) + self._eos
        else:  # the steps before the first missing one: a gap would shift every later step's tokens
            valid = np.asarray(action_mask, bool)
            steps = int(valid.argmin()) if not valid.all() else len(valid)
            bins = action_to_bins(np.asarray(actions_norm)[:steps], len(self.action_token_ids))
            target = self.action_token_ids[bins.reshape(-1)].tolist() + self._eos if steps else []
        return prompt, np.asarray(target, np.int64)
