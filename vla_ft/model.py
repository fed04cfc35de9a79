"""VLA assembly: a timm vision encoder, a projector, a transformers causal LM, action readout.

Sequence fed to the LM (one row of the batch)::

    [vision tokens | state token | prompt | action queries (C) | target | padding]

``robot_data.collate`` left-pads prompts and right-pads targets; the trunk moves each row's
prompt padding to the end (one gather), so causal attention alone keeps padding out of view
and the LM needs no padding mask (SDPA's fast causal kernels). The queries' positions differ
per row by the prompt length: the readout is a per-row gather. Queries see the image, state
and prompt but never the language target (causal attention); the target sees everything
before it. The LM's hidden states at the query positions feed the action head ``(B, C, A)``
and the gripper head ``(B, C, G)``; LM logits are computed only at the target positions
``(B * Lt, V)``, never over the whole sequence.

Named children (freezing, LR groups, LoRA and reports all use these names):
``vision_encoder, projector, proprio_encoder, film, language_model, action_queries, action_head,
gripper_head``. ``film`` (``model.vision.film``) turns the prompt into a scale and shift of every
ViT block's output (:mod:`vla_ft.film`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vla_ft.backbones import build_language_model, build_vision_encoder
from vla_ft.config import ModelConfig, Recipe, RecipeError
from vla_ft.film import FiLM

if TYPE_CHECKING:
    from vla_ft.master_weights import MasterWeights

# Upstream modules of each trunk module: a frozen module may run without autograd only
# when everything feeding it is frozen too.
UPSTREAM = {
    "film": (),  # its input, the prompt's token embeddings, is detached (vla_ft.film)
    "vision_encoder": ("film",),
    "projector": ("vision_encoder", "film"),
    "proprio_encoder": (),
    "action_queries": (),
    "language_model": ("vision_encoder", "projector", "film", "proprio_encoder", "action_queries"),
}


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Module:
    if d_hidden <= 0:
        return nn.Linear(d_in, d_out)
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))


class ActionQueries(nn.Module):
    """C learnable query embeddings, one per chunk step: (C, D)."""

    def __init__(self, chunk: int, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(chunk, width) * 0.02)

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.weight.unsqueeze(0).expand(batch_size, -1, -1)


class VLA(nn.Module):
    """Vision-language-action policy network; see the module docstring for the layout."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        state_dim: int,
        action_dim: int,
        chunk: int,
        n_cameras: int,
        n_history: int,
        vocab_size: int,
        n_gripper: int,
        pretrained: bool = True,
        lm_config: Any = None,
    ):
        """``pretrained=False`` / ``lm_config`` rebuild the architecture only (weights come from a
        checkpoint next): no hub or local weights are read, see :mod:`vla_ft.model_files`."""
        super().__init__()
        self.cfg, self.chunk, self.action_dim, self.n_gripper = cfg, chunk, action_dim, n_gripper
        self.dims = {
            "state_dim": state_dim,
            "action_dim": action_dim,
            "chunk": chunk,
            "n_cameras": n_cameras,
            "n_history": n_history,
            "vocab_size": vocab_size,
            "n_gripper": n_gripper,
        }
        self.vision_encoder = build_vision_encoder(cfg, n_cameras, pretrained)
        self.language_model = build_language_model(cfg, vocab_size, lm_config)
        width = self.language_model.get_input_embeddings().embedding_dim
        self.projector = _mlp(self.vision_encoder.width, cfg.projector_hidden, width)
        self.proprio_encoder = _mlp(state_dim * n_history, width, width) if cfg.proprio else None
        vis = self.vision_encoder
        self.film = FiLM(vis.film_blocks, width, vis.residual_width) if cfg.vision.film else None
        self.action_queries = ActionQueries(chunk, width)
        self.action_head = _mlp(width, cfg.action_head_hidden, action_dim)
        self.gripper_head = _mlp(width, cfg.action_head_hidden, n_gripper) if cfg.gripper_head else None
        self.frozen: set[str] = set()
        self.lora_modules: set[str] = set()  # filled by vla_ft.lora.apply_lora
        self._trainable: set[str] | None = None  # cache of trainable_modules
        self._walked: dict[str, tuple[nn.Module, bool]] = {}  # child name -> (the child, the mode train() gave it)
        self.wants_language = True  # set by the trainer from the loss (zero-weight terms are skipped)
        self.master_weights: MasterWeights | None = None  # train.param_dtype=bf16: fp32 masters of the bf16 weights

    # ------------------------------------------------------------------ structure
    def named_modules_of_interest(self) -> dict[str, nn.Module]:
        """The named children that exist in this model (proprio/gripper may be off)."""
        from vla_ft.config import MODULE_NAMES

        return {n: getattr(self, n) for n in MODULE_NAMES if getattr(self, n, None) is not None}

    def set_frozen(self, names: set[str]) -> None:
        """Freeze exactly ``names``: no gradients, eval mode (dropout off, norms fixed).

        A LoRA-wrapped module (``lora_modules``) trains its adapters whatever ``names`` says.
        """
        self.frozen = set(names)
        for name, module in self.named_modules_of_interest().items():
            for pname, p in module.named_parameters():
                # LoRA-wrapped modules: base weights always frozen, adapters always train.
                p.requires_grad_("lora_" in pname if name in self.lora_modules else name not in names)
        if self.master_weights is not None:
            self.master_weights.sync_requires_grad()
        self._trainable = None
        self.train(self.training)  # thawed modules leave eval mode, newly frozen ones enter it

    @property
    def trainable_modules(self) -> set[str]:
        """Named modules with at least one trainable parameter (cached; refreshed by set_frozen)."""
        if self._trainable is None:
            self._trainable = {
                n for n, m in self.named_modules_of_interest().items() if any(p.requires_grad for p in m.parameters())
            }
        return self._trainable

    def train(self, mode: bool = True) -> VLA:
        """Like nn.Module.train, but fully frozen children stay in eval mode (dropout off, norms
        fixed), and a child this method already put in its mode is not walked again: the
        trainer calls this every step, and walking the reference VLA's ~630 submodules took
        2.4 ms on a 2-core CPU, at the point of the step where the GPU waits for the host (more
        than a cached head-only step). A replaced child (a LoRA wrapper, whose base model may still be in eval
        from ``from_pretrained``) or one switched from outside is walked."""
        self.training = mode
        trainable = self.trainable_modules
        for name, child in self.named_children():
            target = mode and not (name in self.frozen and name not in trainable)
            walked, done = self._walked.get(name, (None, None))
            if walked is not child or done != target or child.training != target:
                child.train(target)
                self._walked[name] = (child, target)
        return self

    def _needs_grad(self, name: str) -> bool:
        """Whether autograd must run through module ``name`` (it or something upstream trains)."""
        return any(n in self.trainable_modules for n in (name, *UPSTREAM.get(name, ())))

    def _grad_ctx(self, name: str):
        return contextlib.nullcontext() if self._needs_grad(name) else torch.no_grad()

    @property
    def decoder(self) -> nn.Module:
        lm = self.language_model
        base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
        return base.get_decoder()

    @property
    def lm_head(self) -> nn.Module:
        lm = self.language_model
        base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
        return base.get_output_embeddings()

    def shared_layer_parameters(self) -> list[torch.Tensor]:
        """Trainable parameters of the last trunk layer (for per-term gradient norms)."""
        layers = getattr(self.decoder, "layers", None)
        module = layers[-1] if layers is not None else self.decoder
        params = [p for p in module.parameters() if p.requires_grad]
        return params or [p for p in self.action_queries.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ forward
    def embed_prefix(self, batch: dict[str, torch.Tensor], prompt: torch.Tensor) -> torch.Tensor:
        """Vision + state tokens: (B, Nv + 1, D) embeddings (never padded); ``prompt`` (B, Lp, D),
        the prompt's token embeddings, conditions the vision encoder through FiLM."""
        film = None
        if self.film is not None:
            with self._grad_ctx("film"):
                film = self.film(prompt, batch["prompt_mask"])
        with self._grad_ctx("vision_encoder"):
            vis = self.vision_encoder(batch["images"], film)
        with self._grad_ctx("projector"):
            tokens = [self.projector(vis)]
        if self.proprio_encoder is not None:
            with self._grad_ctx("proprio_encoder"):
                tokens.append(self.proprio_encoder(batch["state"].flatten(1)).unsqueeze(1))
        return torch.cat(tokens, dim=1)

    def appends_target(self, batch: dict[str, torch.Tensor]) -> bool:
        """Whether :meth:`trunk` appends the language target to the sequence for this batch."""
        target = batch.get("target_ids")
        return self.wants_language and target is not None and target.shape[1] > 0

    def lm_hidden(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The LM's last hidden states (B, L, D) over [prefix | prompt | queries | target | pads],
        and each row's first query position q0 (B, 1)."""
        embed = self.language_model.get_input_embeddings()
        prompt = embed(batch["prompt_ids"])
        prefix = self.embed_prefix(batch, prompt)
        parts = [prefix, prompt, self.action_queries(prefix.shape[0]).to(prefix.dtype)]
        if self.appends_target(batch):
            parts.append(embed(batch["target_ids"]))
        seq = _pads_to_the_end(torch.cat(parts, dim=1), prefix.shape[1], batch["prompt_mask"])
        with self._grad_ctx("language_model"):  # no padding inside: plain causal attention, default positions
            hidden = self.decoder(inputs_embeds=seq).last_hidden_state
        return hidden, prefix.shape[1] + batch["prompt_mask"].sum(1, keepdim=True)

    def trunk(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Everything up to the heads: returns ``readout`` (B, C, D) and, when the language
        term is wanted, ``target_hidden`` (B, Lt, D) at the positions predicting the target."""
        hidden, q0 = self.lm_hidden(batch)
        out = {"readout": _take(hidden, q0 + torch.arange(self.chunk, device=q0.device))}
        if self.appends_target(batch):
            out["target_hidden"] = _take(hidden, self.target_positions(q0, batch))
        return out

    def target_positions(self, q0: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, Lt) positions whose hidden states predict the target: position p predicts token
        p + 1, so the last query predicts target[0]."""
        lt = batch["target_ids"].shape[1]
        return q0 + self.chunk - 1 + torch.arange(lt, device=q0.device)

    def heads(self, readout: torch.Tensor) -> dict[str, torch.Tensor]:
        """readout (B, C, D) -> actions (B, C, A) [+ gripper_logits (B, C, G)]."""
        out = {"actions": self.action_head(readout)}
        if self.gripper_head is not None:
            out["gripper_logits"] = self.gripper_head(readout)
        return out

    def language_logits(self, target_hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Logits only at target positions: lm_logits (B * Lt, V), lm_labels (B * Lt,) with -100 at pads."""
        labels = batch["target_ids"].masked_fill(~batch["target_mask"], -100)
        return {"lm_logits": self.lm_head(target_hidden).flatten(0, 1), "lm_labels": labels.flatten()}

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """batch (see robot_data.sample) -> outputs for :class:`vla_ft.losses.CompositeLoss`.

        A batch carrying ``readout`` (cached frozen-trunk features) runs the heads only.
        """
        trunk = {"readout": batch["readout"]} if "readout" in batch else self.trunk(batch)
        out = self.heads(trunk["readout"])
        if "target_hidden" in trunk:
            out.update(self.language_logits(trunk["target_hidden"], batch))
        return out


def _pads_to_the_end(seq: torch.Tensor, n_prefix: int, prompt_mask: torch.Tensor) -> torch.Tensor:
    """seq (B, L, D) laid out [prefix | left-padded prompt | queries | target] -> each row's
    prompt padding moved to its end: [prefix | prompt | queries | target | pads].

    Why (speed): with padding only at the end, causal attention alone keeps pads out of every
    real token's view, so the LM runs without a padding mask on SDPA's causal fast path (the
    masked kernel took ~2x as long at these lengths on an H100), and the default positions
    0..L-1 equal the positions a padding mask's cumsum would give the real tokens. Outputs are unchanged.
    """
    b, length, _ = seq.shape
    n_pad = prompt_mask.shape[1] - prompt_mask.sum(1, keepdim=True)  # (B, 1)
    dest = torch.arange(length, device=seq.device).expand(b, -1)  # (B, L)
    tail = dest >= length - n_pad
    src = torch.where(dest < n_prefix, dest, torch.where(tail, dest - (length - n_pad) + n_prefix, dest + n_pad))
    return _take(seq, src)


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, L, D), index (B, K) -> (B, K, D): per-row positions."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def pad_token_id(tokenizer: Any) -> int:
    """The id prompts are padded with: the tokenizer's pad token, else eos (Llama has no pad), else 0."""
    for tok_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tok_id is not None:
            return int(tok_id)
    return 0


def build_model(
    recipe: Recipe,
    *,
    state_dim: int,
    action_dim: int,
    n_cameras: int,
    vocab_size: int,
    resume_from: Path | None = None,
    device: torch.device | str = "cpu",
) -> VLA:
    """The VLA for a recipe and the data's dimensions, with LoRA applied when asked. With
    ``model.init_from`` the LM's architecture is the source run's (read from ``resume_from`` when
    resuming, whose checkpoint also holds the weights), and a fresh run copies the source's weights
    in (:mod:`vla_ft.init_from`). ``model.language.quantize``: the LM's linears become 4-bit, their
    codes computed on ``device`` (:mod:`vla_ft.quantize`; a resume then loads the checkpoint's).
    The model is returned on the CPU but for those codes: the caller moves it."""
    from vla_ft import init_from
    from vla_ft.lora import apply_lora
    from vla_ft.quantize import quantize_linears
    from vla_ft.runtime import say

    gripper = recipe.loss.gripper.dims if recipe.model.gripper_head else []
    bad = [d for d in gripper if not 0 <= d < action_dim]
    if bad:
        raise RecipeError(f"loss.gripper.dims: {bad} out of range for {action_dim} action dims")
    source = recipe.model.init_from
    asked = recipe.model.language.config
    lm_config = None if source is None else init_from.source_lm_config(resume_from or source, asked)
    model = VLA(
        recipe.model,
        state_dim=state_dim,
        action_dim=action_dim,
        chunk=recipe.data.chunk,
        n_cameras=n_cameras,
        n_history=recipe.data.history,
        vocab_size=vocab_size,
        n_gripper=len(gripper),
        pretrained=source is None,
        lm_config=lm_config,
    )
    if source is not None and resume_from is None:
        fresh = init_from.copy_source_weights(model, source)
        say(
            f"{init_from.KEY}: weights of {init_from.source_directory(source)}"
            + (f"; fresh: {', '.join(fresh)}" if fresh else "")
        )
    if recipe.model.language.quantize != "none":
        quantize_linears(model.language_model, recipe.model.language.quantize, device)
    apply_lora(model, recipe.model)
    check_lm_adapters(model, recipe)
    return model


def check_lm_adapters(model: VLA, recipe: Recipe) -> None:
    """LoRA trains the LM only through its adapters: refuse the runs where that cannot learn what
    the recipe asks. An adapter on the output layer (``lm_head``) trains only through language
    logits; and rows added to a pretrained LM's vocabulary (a tokenizer with more tokens, action
    tokens say) stay frozen at their initial values, so a language target saying them cannot train."""
    from vla_ft.metrics import trains_language

    if "language_model" not in model.lora_modules:
        return
    lm = model.language_model.get_base_model()
    if trains_language(recipe):
        added = getattr(lm, "added_vocab_rows", 0)
        if added:
            raise RecipeError(
                f"model.lora.enabled: the tokenizer has {added} more tokens than the LM's vocabulary; LoRA keeps "
                "those new embedding rows frozen at their initial values, so the language target cannot learn "
                "them; use a tokenizer within the LM's vocabulary, or train without LoRA"
            )
    elif hasattr(lm.get_output_embeddings(), "lora_A"):
        raise RecipeError(
            "model.lora.target_modules: the LM's output layer is adapted, but this run trains no language "
            "(data.language_target none, or a language weight of 0): its adapter would never train; leave it out"
        )
