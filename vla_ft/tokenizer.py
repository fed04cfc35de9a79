"""Tokenizers: from a hub name or a local directory, or the built-in offline one.

``builtin:tiny`` is a word-level tokenizer built with the ``tokenizers`` library from the
synthetic task's vocabulary plus reserved action tokens ``<act_0> .. <act_{n-1}>`` at the
end of the vocabulary (OpenVLA maps action bins to the *last* ids, so do we). It needs no
download and is saved with every checkpoint, like any other tokenizer.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast

BUILTIN_TINY = "builtin:tiny"
BUILTIN = (BUILTIN_TINY,)  # every built-in tokenizer's name, for validation's "did you mean"
SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")


def build_tiny_tokenizer(words: list[str], n_action_tokens: int = 256) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: specials, then ``words`` (deduplicated, in order), then action tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab: dict[str, int] = {}
    for tok in [*SPECIALS, *words, *(f"<act_{i}>" for i in range(n_action_tokens))]:
        vocab.setdefault(tok, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    )


def load_tokenizer(source: str, key: str = "model.language.tokenizer"):
    """A tokenizer from ``builtin:tiny``, a local directory, or a hub name.

    Hub names resolve through the Hugging Face cache like the LM's (offline: ``HF_HUB_OFFLINE=1``
    with a filled cache, see :mod:`vla_ft.backbones`). Errors are RecipeErrors naming ``key``: a
    path that does not exist is reported as such rather than as a failed hub download.
    """
    from vla_ft.config import RecipeError

    if source == BUILTIN_TINY:
        from robot_data import SYNTHETIC_VOCAB

        return build_tiny_tokenizer(list(SYNTHETIC_VOCAB))
    if source.startswith("builtin:"):
        raise RecipeError(f"{key}: unknown built-in tokenizer '{source}'; the built-in one is '{BUILTIN_TINY}'")
    path = Path(source).expanduser()
    if not path.exists() and (source.startswith((".", "/", "~")) or source.count("/") > 1):
        raise RecipeError(f"{key}: tokenizer directory not found: {source}")
    try:
        return AutoTokenizer.from_pretrained(str(path) if path.exists() else source)
    except (OSError, ValueError) as err:
        where = "directory" if path.exists() else "hub name (no local directory by that name)"
        raise RecipeError(f"{key}: cannot load a tokenizer from {where} '{source}': {err}") from None
