"""Tiny pretrained parts for model tests, saved to disk the way real ones ship (no network).

* a timm ViT as a safetensors file, or a directory in timm's ``save_for_hf`` layout;
* a transformers causal LM, and the builtin word-level tokenizer, in the ``save_pretrained`` layout
  (in separate directories: transformers 5 reads a tokenizer next to a qwen2 config.json as
  Qwen2's BPE tokenizer, which a word-level vocabulary does not survive);
* a Hugging Face cache entry (``$HF_HOME/hub/models--org--name``) so hub names resolve offline.

Sizes match ``conftest.TINY`` so a recipe with TINY overrides accepts these weights.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from conftest import QUICKSTART, TINY

from vla_ft.config import Recipe, load_recipe

VIT = "vit_tiny_patch16_224"
VIT_KWARGS = {"depth": 1, "embed_dim": 32, "num_heads": 2, "patch_size": 16}  # as in TINY
_TINY_LM = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 256,
}
LM_CONFIGS = {"qwen2": dict(_TINY_LM), "llama": dict(_TINY_LM)}  # same sizes, two architectures
VOCAB = 284  # len() of the builtin tokenizer
FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def tiny_recipe(tmp_path: Path, *overrides: str) -> Recipe:
    """The quickstart at TINY size, writing under ``tmp_path``."""
    return load_recipe(QUICKSTART, [*TINY, f"output_dir={tmp_path / 'run'}", *overrides])


def tiny_vit(seed: int = 0, img_size: int = 64) -> torch.nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model(VIT, pretrained=False, num_classes=0, img_size=img_size, **VIT_KWARGS)


def save_vit_file(path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A ViT's weights as one safetensors file; returns them."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in tiny_vit(seed).state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return state


def save_vit_dir(directory: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A ViT in timm's save_for_hf layout (config.json + model.safetensors); returns its weights."""
    from timm.models import save_for_hf

    model = tiny_vit(seed)
    save_for_hf(model, str(directory), safe_serialization=True)
    return model.state_dict()


def save_lm_dir(
    directory: Path, model_type: str = "qwen2", dtype: torch.dtype = torch.float32, seed: int = 0, vocab: int = VOCAB
) -> dict[str, torch.Tensor]:
    """A causal LM (by default of the builtin tokenizer's vocabulary) with save_pretrained; returns its weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=vocab, tie_word_embeddings=True, **LM_CONFIGS[model_type])
    torch.manual_seed(seed)
    lm = AutoModelForCausalLM.from_config(config, dtype=dtype)
    lm.save_pretrained(str(directory))
    return lm.state_dict()


def save_tokenizer_dir(directory: Path, bos: bool = False) -> None:
    """The builtin tokenizer; ``bos``: it adds ``<bos>`` before and ``<eos>`` after a text, as Llama's
    (with add_eos_token) does, where the builtin one adds nothing, as Qwen's."""
    from tokenizers import processors

    from vla_ft.tokenizer import BUILTIN_TINY, load_tokenizer

    tokenizer = load_tokenizer(BUILTIN_TINY)
    if bos:
        specials = [(t, tokenizer.convert_tokens_to_ids(t)) for t in ("<bos>", "<eos>")]
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<bos> $A <eos>", special_tokens=specials
        )
    tokenizer.save_pretrained(str(directory))


def add_to_hf_cache(hf_home: Path, repo_id: str, files: Path) -> None:
    """Make ``repo_id`` resolve offline from ``$HF_HOME/hub``: the layout ``hf download`` leaves
    (refs/main -> a commit, snapshots/<commit>/<files>), plain files instead of blob links."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(FAKE_COMMIT)
    shutil.copytree(files, repo / "snapshots" / FAKE_COMMIT, dirs_exist_ok=True)


def fake_batch(
    model,
    batch_size: int = 2,
    prompt_lens: tuple[int, ...] = (3, 5),
    target_len: int = 2,
    n_cameras: int | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A collated batch shaped for ``model`` (see robot_data.sample): prompts left-padded, targets right-padded."""
    g = torch.Generator().manual_seed(seed)
    d = model.dims
    n_cam = d["n_cameras"] if n_cameras is None else n_cameras
    size = model.cfg.vision.img_size
    lp = max(prompt_lens)
    prompt_ids = torch.zeros(batch_size, lp, dtype=torch.long)
    prompt_mask = torch.zeros(batch_size, lp, dtype=torch.bool)
    for row, n in enumerate(prompt_lens[:batch_size]):
        prompt_ids[row, lp - n :] = torch.randint(4, 40, (n,), generator=g)
        prompt_mask[row, lp - n :] = True
    return {
        "images": torch.randint(0, 256, (batch_size, n_cam, 3, size, size), dtype=torch.uint8, generator=g),
        "state": torch.randn(batch_size, d["n_history"], d["state_dim"], generator=g),
        "actions": torch.randn(batch_size, d["chunk"], d["action_dim"], generator=g),
        "action_mask": torch.ones(batch_size, d["chunk"], dtype=torch.bool),
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "target_ids": torch.randint(4, 40, (batch_size, target_len), generator=g),
        "target_mask": torch.ones(batch_size, target_len, dtype=torch.bool),
    }
