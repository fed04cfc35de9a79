"""Backbones from recipe keys: the timm vision encoder and the transformers causal LM.

Where weights come from (``model.vision.pretrained``, ``model.language.name``):

* a local path: a timm weights file or directory (``save_for_hf`` layout), or an LM directory
  (``save_pretrained`` layout);
* a hub name: resolved through the Hugging Face cache (``HF_HOME``). On a machine without network,
  fill the cache first (``hf download org/name``, or copy a cache over) and set ``HF_HUB_OFFLINE=1``;
  the same recipe then runs unchanged, nothing is fetched;
* nothing (random init): ``pretrained: false``, or an LM built from ``model.language.config``.

Every failure is a :class:`~vla_ft.config.RecipeError` naming the recipe key.
"""

from __future__ import annotations

import difflib
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from vla_ft import lm_compile
from vla_ft.config import LanguageConfig, ModelConfig, RecipeError, VisionConfig
from vla_ft.film import install_hooks, vit_blocks


class VisionEncoder(nn.Module):
    """timm backbone(s) -> tokens (B, n_cam * N, Dv), N = patch tokens or 1 pooled token per camera.

    Pixel normalisation (the backbone's own mean/std) happens here, on the device, so the
    data pipeline ships uint8. With ``film`` every ViT block's output is scaled and shifted by
    the instruction (:mod:`vla_ft.film`).
    """

    def __init__(
        self, backbones: nn.ModuleList, features: str, mean: tuple, std: tuple, n_cameras: int, film: bool = False
    ):
        super().__init__()
        self.backbones = backbones
        self.features = features
        self.n_cameras = n_cameras
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255, persistent=False)
        self.film_blocks = 0  # blocks per backbone that FiLM modulates
        self._film: torch.Tensor | None = None  # (B * n_cam, blocks, 2, D) of the latest forward
        if film:
            for bb in backbones:
                blocks = vit_blocks(bb, type(bb).__name__)
                install_hooks(blocks, lambda: self._film)
                self.film_blocks = len(blocks)

    @property
    def residual_width(self) -> int:
        """Width of the blocks' outputs, which FiLM modulates."""
        bb = self.backbones[0]
        return getattr(bb, "embed_dim", bb.num_features)

    @property
    def width(self) -> int:
        bb = self.backbones[0]
        # Pooled features come out of the head's pre-logits layer, wider than the trunk on some models.
        return getattr(bb, "head_hidden_size", bb.num_features) if self.features == "pooled" else bb.num_features

    def encode(self, backbone: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, H, W) -> (B, N, Dv)."""
        feats = backbone.forward_features(pixels)  # ViTs: (B, prefix + N, Dv); CNNs: (B, Dv, h, w) or NHWC
        if self.features == "pooled":
            return backbone.forward_head(feats, pre_logits=True).unsqueeze(1)
        if feats.ndim == 4:  # feature map -> one token per cell
            nhwc = getattr(backbone, "output_fmt", "NCHW") == "NHWC"
            return feats.flatten(1, 2) if nhwc else feats.flatten(2).transpose(1, 2)
        return feats[:, getattr(backbone, "num_prefix_tokens", 0) :]

    def forward(self, images: torch.Tensor, film: torch.Tensor | None = None) -> torch.Tensor:
        """images: uint8 (B, n_cam, 3, H, W), film (B, blocks, 2, D) or None -> (B, n_cam * N, Dv)."""
        b, n_cam = images.shape[:2]
        check_cameras(self.n_cameras, n_cam)
        pixels = (images.float() - self.mean) / self.std if images.dtype == torch.uint8 else images
        if len(self.backbones) == 1:  # shared encoder: one batched call over all cameras
            self._condition(film, n_cam)
            tokens = self.encode(self.backbones[0], pixels.flatten(0, 1))
            return tokens.reshape(b, n_cam * tokens.shape[1], -1)
        self._condition(film, 1)
        return torch.cat([self.encode(bb, pixels[:, i]) for i, bb in enumerate(self.backbones)], dim=1)

    def _condition(self, film: torch.Tensor | None, repeat: int) -> None:
        """What the blocks' hooks read: ``film`` with one row per image (each sample's row ``repeat``
        times). Kept until the next forward: with ``model.vision.gradient_checkpointing`` backward
        recomputes the blocks after the forward returned, and must modulate them as it did."""
        if (film is None) != (self.film_blocks == 0):
            built, given = bool(self.film_blocks), film is not None
            raise ValueError(f"vision encoder: built with film={built}, called with film={given}")
        self._film = None if film is None else film.repeat_interleave(repeat, dim=0) if repeat > 1 else film


def check_cameras(n_model: int, n_data: int) -> None:
    """A model built for ``n_model`` cameras refuses other counts (a shared encoder would silently
    accept them and feed the LM a sequence layout it was never trained on)."""
    if n_model != n_data:
        raise RecipeError(f"data.cameras: the model was built for {n_model} camera(s) but the data provides {n_data}")


def weights_file(pretrained: str) -> Path:
    """``model.vision.pretrained`` as a path -> the weights file: the path itself, or in a directory
    (timm's ``save_for_hf`` layout) model.safetensors / pytorch_model.bin / its only weights file."""
    path = Path(pretrained).expanduser()
    if path.is_dir():
        preferred = [path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()]
        found = preferred or sorted(f for ext in ("safetensors", "bin", "pth") for f in path.glob(f"*.{ext}"))
        if len(found) != 1 and not preferred:
            what = f"several weights files ({', '.join(f.name for f in found)})" if found else "no weights file"
            raise RecipeError(f"model.vision.pretrained: {what} in {path}; name the file")
        return found[0]
    if not path.is_file():
        raise RecipeError(f"model.vision.pretrained: path does not exist: {pretrained}")
    return path


def check_saved_normalisation(backbone: nn.Module, file: Path, name: str) -> None:
    """The pixels' mean and std come from the timm name's pretrained config (``vla_ft`` normalises
    with them, in training and at inference). A directory saved by ``save_for_hf`` (or ``hf download
    timm/<name>.<tag>``) records the ones its weights were trained with in ``config.json``: another
    tag's (``vit_small_patch16_224`` is augreg's 0.5/0.5, its ``.dino`` weights ImageNet's) would feed
    the encoder pixels it never saw. Refused, naming the tag that has them."""
    config = file.parent / "config.json"
    try:
        saved = json.loads(config.read_text()).get("pretrained_cfg") or {}
    except (OSError, ValueError, AttributeError):
        return  # no timm config next to the weights: nothing recorded to compare
    ours = backbone.pretrained_cfg
    differ = [k for k in ("mean", "std") if k in saved and ours.get(k) is not None and list(saved[k]) != list(ours[k])]
    if differ:
        tag = saved.get("tag")
        hint = f"; name the weights' tag: model.vision.name={name.split('.')[0]}.{tag}" if tag else ""
        raise RecipeError(
            f"model.vision.name: '{name}' normalises pixels with mean {list(ours['mean'])}, std {list(ours['std'])}, "
            f"but {config} records mean {saved.get('mean')}, std {saved.get('std')} for its weights{hint}"
        )


def load_backbone_weights(backbone: nn.Module, file: Path) -> None:
    """Load a local weights file into a timm backbone, strictly except for the classifier.

    The state dict goes through the model family's ``checkpoint_filter_fn`` (resamples position
    embeddings to ``img_size``, converts original-format checkpoints) as in timm's own loading;
    unlike timm's non-strict load for a headless model, weights missing from the file are an
    error, so a checkpoint of another architecture cannot silently leave the encoder random.
    """
    from timm.models import load_state_dict

    try:
        state = load_state_dict(str(file))  # safetensors, or torch.load(weights_only=True); EMA weights preferred
    except (SafetensorError, RuntimeError, OSError) as err:  # truncated by an interrupted copy, not a weights file
        raise RecipeError(f"model.vision.pretrained: {file} is damaged or not a weights file ({err})") from None
    filter_fn = getattr(sys.modules[type(backbone).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, backbone)
    classifier = backbone.pretrained_cfg.get("classifier") or "head"
    for name in [classifier] if isinstance(classifier, str) else classifier:
        state.pop(f"{name}.weight", None)
        state.pop(f"{name}.bias", None)
    try:
        result = backbone.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches: a different width, depth or patch size
        detail = " ".join(str(err).split("\n")[1:3]).strip()
        raise RecipeError(f"model.vision.pretrained: {file} does not fit this model: {detail}") from None
    if result.missing_keys:
        n, total = len(result.missing_keys), len(backbone.state_dict())
        raise RecipeError(
            f"model.vision.pretrained: {file} lacks {n} of {total} weights of this model "
            f"(e.g. {', '.join(result.missing_keys[:3])}); is it a checkpoint of model.vision.name?"
        )
    if result.unexpected_keys:
        warnings.warn(
            f"model.vision.pretrained: ignored {len(result.unexpected_keys)} extra tensors in {file} "
            f"(e.g. {', '.join(result.unexpected_keys[:3])})",
            stacklevel=2,
        )


def create_backbone(cfg: ModelConfig, pretrained: bool = True) -> nn.Module:
    """One timm backbone without classifier, weights as ``model.vision.pretrained`` says.

    ``pretrained=False`` (inference rebuilds) ignores the recipe's weights: the checkpoint's come next.
    """
    v = cfg.vision
    from_hub = pretrained and v.pretrained is True
    file = weights_file(v.pretrained) if pretrained and isinstance(v.pretrained, str) else None
    try:
        backbone = _backbone(v, from_hub)
    except (OSError, RuntimeError) as err:  # hub download, cache miss, no weights for this tag
        if not from_hub:
            raise
        raise RecipeError(f"model.vision.pretrained: cannot load hub weights of '{v.name}': {err}") from None
    if file is not None:
        check_saved_normalisation(backbone, file, v.name)
        load_backbone_weights(backbone, file)
    elif pretrained and not from_hub and v.position_init == "sincos":
        init_sincos_positions(backbone)
    patchify_as_matmul(backbone)
    if v.gradient_checkpointing:
        checkpoint_blocks(backbone, v.name)
    return backbone


def checkpoint_blocks(backbone: nn.Module, name: str) -> None:
    """timm's activation checkpointing: each block's activations are recomputed in backward."""
    try:
        backbone.set_grad_checkpointing(True)
    except (AttributeError, AssertionError, NotImplementedError) as err:
        key = "model.vision.gradient_checkpointing"
        raise RecipeError(f"{key}: timm's '{name}' cannot recompute its blocks ({err})") from None


def init_sincos_positions(backbone: nn.Module) -> None:
    """Set a random-init ViT's position embeddings (1, [prefix +] h * w, D) to 2-D sin-cos; prefix
    tokens get zeros. Backbones without a patch-grid ``pos_embed`` (CNNs, RoPE ViTs) are left alone.

    Why: timm initialises them at std 0.02 against patch embeddings of order 1, so a ViT trained from
    scratch on robot data barely knows where a patch is. On the synthetic task, the quickstart's 3-block
    ViT with one attention read-out located the named block to 0.0157 after 600 steps with sin-cos
    positions, and to 0.0538 with timm's (mean-position baseline 0.1778; benchmarks/vision_grounding.py).
    """
    from timm.layers import build_sincos2d_pos_embed

    pos = getattr(backbone, "pos_embed", None)
    grid = getattr(getattr(backbone, "patch_embed", None), "grid_size", None)
    if not isinstance(pos, nn.Parameter) or pos.ndim != 3 or grid is None or pos.shape[1] < grid[0] * grid[1]:
        return
    h, w = grid
    dim = pos.shape[-1]
    if dim % 4:
        warnings.warn(
            f"model.vision.position_init: sincos needs a width divisible by 4 (got {dim}); timm's init kept",
            stacklevel=3,
        )
        return
    with torch.no_grad():
        pos.zero_()
        pos[0, pos.shape[1] - h * w :] = build_sincos2d_pos_embed([h, w], dim).to(pos.dtype)


class PatchifyConv(nn.Conv2d):
    """A patchifying conv (stride = kernel, no padding: a ViT's patch embedding) as one matmul.

    Why: cuDNN ran the reference ViT's patch embedding (64 x 3 x 224 x 224, 16 x 16 patches) in
    0.92 ms per training step on an H100, mostly NCHW <-> NHWC layout kernels and a weight-gradient
    kernel; unfolded, it is a (B * N, 768) x (768, 768) matmul. Same parameters and state-dict keys
    as the ``nn.Conv2d`` it replaces; the output is channels-last, so timm's ``flatten(2).transpose``
    to tokens is a view.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> (B, O, H // p, W // q), as the strided conv (remainder rows and columns dropped)."""
        p, q = self.kernel_size
        b, c, h, w = x.shape
        x = x[:, :, : h // p * p, : w // q * q]
        patches = x.reshape(b, c, h // p, p, w // q, q).permute(0, 2, 4, 1, 3, 5).flatten(3)  # (B, H/p, W/q, C*p*q)
        out = nn.functional.linear(patches, self.weight.flatten(1), self.bias)  # (B, H/p, W/q, O)
        return out.permute(0, 3, 1, 2)


def patchify_as_matmul(module: nn.Module) -> None:
    """Turn every patchifying ``nn.Conv2d`` (stride = kernel > 1, no padding) inside ``module`` into a
    :class:`PatchifyConv` (in place)."""
    for m in module.modules():
        if type(m) is not nn.Conv2d or m.stride != m.kernel_size or m.padding != (0, 0) or m.kernel_size == (1, 1):
            continue  # 1 x 1 convs (CNN pointwise layers) stay: the channels-last output would spread through the CNN
        if m.dilation == (1, 1) and m.groups == 1 and m.padding_mode == "zeros":
            m.__class__ = PatchifyConv


def _backbone(v: VisionConfig, from_hub: bool) -> nn.Module:
    """``timm.create_model`` for ``model.vision``; an unknown name or arguments the model refuses
    (``model.vision.kwargs`` are passed as they are) is a RecipeError with timm's message."""
    import timm

    if not timm.is_model(v.name):
        close = difflib.get_close_matches(v.name, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise RecipeError(f"model.vision.name: unknown timm model '{v.name}'{hint}")
    kwargs = {"num_classes": 0, "img_size": v.img_size, **v.kwargs}
    try:
        return _create_timm(v.name, kwargs, from_hub)
    except (TypeError, ValueError, AssertionError, KeyError) as err:  # an unknown or ill-typed keyword, a bad size
        key = "model.vision.kwargs" if v.kwargs else "model.vision.img_size"
        call = ", ".join(f"{k}={val!r}" for k, val in kwargs.items() if k != "num_classes")
        raise RecipeError(f"{key}: timm.create_model('{v.name}', {call}) failed: {library_message(err)}") from None


def vision_skeleton(cfg: ModelConfig) -> nn.Module:
    """One vision backbone's module tree on the meta device: no weights, no memory, no download."""
    with torch.device("meta"):
        return _backbone(cfg.vision, from_hub=False)


def library_message(err: BaseException) -> str:
    """A library's exception as one line: its type and message, whitespace collapsed, at most ~400 characters."""
    text = " ".join(str(err).split()) or repr(err)
    return f"{type(err).__name__}: {text[:400]}{' ...' if len(text) > 400 else ''}"


def _create_timm(name: str, kwargs: dict[str, Any], pretrained: bool) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as err:  # CNNs take any input size and have no img_size argument
        if "img_size" not in str(err):
            raise
        return timm.create_model(name, pretrained=pretrained, **{k: v for k, v in kwargs.items() if k != "img_size"})


def build_vision_encoder(cfg: ModelConfig, n_cameras: int, pretrained: bool = True) -> VisionEncoder:
    import timm

    n_backbones = n_cameras if cfg.vision.per_camera else 1
    backbones = nn.ModuleList(create_backbone(cfg, pretrained) for _ in range(n_backbones))
    data_cfg = timm.data.resolve_data_config({}, model=backbones[0])
    return VisionEncoder(backbones, cfg.vision.features, data_cfg["mean"], data_cfg["std"], n_cameras, cfg.vision.film)


def build_language_model(cfg: ModelConfig, vocab_size: int, config: Any = None) -> nn.Module:
    """``AutoModelForCausalLM`` in float32, from one of

    * ``config``: a saved ``PretrainedConfig`` (random init): how checkpoints rebuild the LM, whose
      weights then come from the checkpoint, never from the hub;
    * ``model.language.name``: a local directory or a hub name (see the module docstring);
      validation refuses a ``model.language.config`` next to it;
    * ``model.language.config`` with a ``model_type`` when name is null (tiny models).

    ``sdpa`` becomes :data:`vla_ft.lm_compile.NAME` where the model allows (SDPA that keeps its
    causal kernel when compiled) and the rotary tables are computed once per forward (:mod:`vla_ft.lm_compile`).
    Weights stay float32 whatever the checkpoint's dtype (transformers 5 would load bf16 hub
    weights as bf16): they are the optimizer's master weights; autocast does low-precision math.
    (A pretrained LM that ``model.language.quantize`` will quantise loads in bf16; see below.)
    """
    from transformers import AutoModelForCausalLM

    lang = cfg.language
    # A LM to be quantised (model.language.quantize) loads in bf16: its linears become 4-bit codes right
    # after, so fp32 would only double the host memory of the load (28 GB for a 7B LM); the rest is made
    # fp32 again once quantised (vla_ft.quantize.quantize_linears). Hub weights are bf16: same values.
    dtype = torch.bfloat16 if lang.quantize != "none" and lang.name is not None and config is None else torch.float32
    common = {"attn_implementation": lang.attn_implementation, "dtype": dtype}
    if config is not None:
        lm = AutoModelForCausalLM.from_config(config, **common)
        lm.name_or_path = ""  # not the directory the config came from: no LM weights there (peft records it)
    elif lang.name is None:
        lm = _lm_from_config(_lm_config(lang, {"vocab_size": vocab_size}), lang, common)
    else:
        lm = _pretrained_language_model(lang, common)
    rows = lm.get_input_embeddings().num_embeddings
    if rows < vocab_size:
        lm.resize_token_embeddings(vocab_size)
    lm.added_vocab_rows = max(0, vocab_size - rows)  # rows the pretrained LM never had (vla_ft.model reads it)
    if lang.gradient_checkpointing:
        _enable_checkpointing(lm)
    lm_compile.use_causal_sdpa(lm)
    lm_compile.compute_rotary_once(lm.get_decoder())
    return lm


def _config_errors() -> tuple[type[BaseException], ...]:
    """What transformers raises for a bad config value (its dataclass validation has its own base class)."""
    from huggingface_hub.errors import StrictDataclassError

    return (ValueError, TypeError, KeyError, AssertionError, StrictDataclassError)


def _lm_config(lang: LanguageConfig, defaults: dict[str, Any]) -> Any:
    """``model.language.config`` (a model_type and its kwargs) -> a ``PretrainedConfig``."""
    from transformers import AutoConfig

    if "model_type" not in lang.config:
        raise RecipeError("model.language.config: needs model_type (e.g. qwen2) when model.language.name is null")
    try:
        return AutoConfig.for_model(**{**defaults, **lang.config})
    except _config_errors() as err:
        raise RecipeError(f"model.language.config: transformers refused it: {library_message(err)}") from None


def _lm_from_config(config: Any, lang: LanguageConfig, common: dict[str, Any]) -> nn.Module:
    """``AutoModelForCausalLM.from_config`` for ``model.language.config``; what the model refuses names the key."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_config(config, **common)
    except ImportError as err:  # an attention kernel's package (flash_attn) is missing
        raise RecipeError(f"model.language.attn_implementation: {library_message(err)}") from None
    except _config_errors() as err:
        raise RecipeError(f"model.language.config: transformers cannot build it: {library_message(err)}") from None


def language_model_skeleton(cfg: ModelConfig) -> nn.Module | None:
    """The LM's module tree on the meta device (no weights, no memory), for checks before training.

    None when its config cannot be read offline (a hub name missing from the local cache): building
    the model names that problem.
    """
    from transformers import AutoConfig

    lang = cfg.language
    common = {"attn_implementation": "eager", "dtype": torch.float32}  # module names do not depend on the kernel
    if lang.name is None:
        config = _lm_config(lang, {})
    else:
        path = Path(lang.name).expanduser()
        try:
            config = AutoConfig.from_pretrained(str(path) if path.exists() else lang.name, local_files_only=True)
        except (OSError, ValueError):
            return None
    with torch.device("meta"):
        return _lm_from_config(config, lang, common)


def _enable_checkpointing(lm: nn.Module) -> None:
    # transformers 5.23 renamed gradient_checkpointing_enable (deprecated) to activation_*; 5.17 has the old name only.
    if hasattr(lm, "activation_checkpointing_enable"):
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _pretrained_language_model(lang: LanguageConfig, common: dict[str, Any]) -> nn.Module:
    from transformers import AutoModelForCausalLM

    path = Path(lang.name).expanduser()
    if not path.exists() and (lang.name.startswith((".", "/", "~")) or lang.name.count("/") > 1):
        raise RecipeError(f"model.language.name: directory not found: {lang.name}")
    try:
        lm, info = AutoModelForCausalLM.from_pretrained(
            str(path) if path.exists() else lang.name, output_loading_info=True, **common
        )
    except ImportError as err:  # an attention kernel's package (flash_attn) is missing
        raise RecipeError(f"model.language.attn_implementation: {library_message(err)}") from None
    except (OSError, ValueError) as err:
        raise RecipeError(f"model.language.name: cannot load '{lang.name}': {err}") from None
    except SafetensorError as err:  # its message names no file
        raise RecipeError(f"model.language.name: a weights file in '{lang.name}' is damaged ({err})") from None
    if info["missing_keys"]:  # transformers would leave them randomly initialised, with a log line
        missing = sorted(info["missing_keys"])
        raise RecipeError(
            f"model.language.name: {len(missing)} weights missing from '{lang.name}' "
            f"(e.g. {', '.join(missing[:3])}); is it a checkpoint of this architecture?"
        )
    return lm
