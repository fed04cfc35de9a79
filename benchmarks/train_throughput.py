"""Training throughput of the reference VLA: the textbook loop, HF Trainer, and vla-ft's own step.

    python benchmarks/train_throughput.py                          # GPU: every row (~9 min on an H100)
    python benchmarks/train_throughput.py --rows vla_full,hf_compile --loss-steps 200 --out results.json
    python benchmarks/train_throughput.py --smoke                  # CPU, tiny model, seconds (tests run it)

The model is ``recipes/bench/reference.yaml`` (SigLIP-B/16-class ViT at 224, Qwen2.5-0.5B-class LM,
random init), built with 8-D state and 7-D actions (gripper = dim 6), batch 64. Every contender
gets the same ``--batches`` fixed synthetic batches (random pixels, prompts of 12-20 and targets
of 4-12 tokens, collated as the library collates), already on the GPU, cycled in the same order
from the same initial weights: data loading is measured elsewhere (``vla-ft train`` logs
``perf/data_wait_frac``).

Rows:
  textbook        fp32, eager attention, default (foreach) AdamW, ``loss.item()`` every step
  vla_bf16_eager  vla-ft step, bf16 autocast (fp32 master weights), eager attention, foreach AdamW
  vla_bf16_sdpa   + SDPA attention
  vla_fused       + fused AdamW (vla-ft as a recipe with train.compile=false)
  vla_full        + torch.compile of the forward and the loss terms: the recipe as is (full fine-tune)
  vla_all_logits  ablation of vla_full: LM logits over every position (B, L, V), as a stock causal-LM
                  forward computes them, the loss still at the target rows
  hf_eager        HF Trainer: bf16, sdpa, adamw_torch_fused, the same model and loss in compute_loss
  hf_compile      the same with ``torch_compile=True``
  hf_compile_stock  hf_compile on the model as transformers and timm build it: transformers' own
                  "sdpa", the LM's rotary module and timm's patch conv, without vla-ft's rewrites
                  (``vla_ft.lm_compile``, ``backbones.PatchifyConv``); what a user of HF Trainer gets
  vla_frozen      recipe + freeze.vision_encoder=true
  vla_lora        recipe + LoRA on every LM linear (r=32) + frozen vision encoder
  vla_lora_peft   ablation of vla_lora: peft's own LoRA forward (``model.lora.fused=false``)
  vla_qlora       vla_lora on a 4-bit (nf4) LM base: QLoRA (``model.language.quantize=nf4``)
  vla_dora        vla_lora with DoRA (``model.lora.use_dora=true``): a trained magnitude per row of each weight
  vla_full_adamw8bit  vla_full with bitsandbytes' AdamW on 8-bit moments (``optim.name=adamw8bit``)
  vla_head        head-only: the heads on readout features of the frozen trunk, computed once (what
                  ``train.cache_features`` feeds the step)

Per row: median step time from CUDA events between consecutive step ends (after the warm-up
steps, compilation included there), samples/s, model TFLOP/s and MFU (``vla_ft.flops``: trained
6N, frozen 2N, gradient-through 4N, causal attention, non-padding tokens only; peak = dense bf16),
peak memory, and the time from building the model to the end of the first step. ``--loss-steps``
rows also record every step's loss (HF Trainer vs vla-ft).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import vla_ft.train as train_mod  # noqa: E402
from robot_data import collate  # noqa: E402
from vla_ft import extensions, flops, optim  # noqa: E402
from vla_ft.backbones import PatchifyConv  # noqa: E402
from vla_ft.config import Recipe, load_recipe  # noqa: E402
from vla_ft.ema import weight_average  # noqa: E402
from vla_ft.lm_compile import RotaryOnce  # noqa: E402
from vla_ft.losses import CompositeLoss  # noqa: E402
from vla_ft.model import VLA, build_model  # noqa: E402
from vla_ft.model import _take as take  # noqa: E402
from vla_ft.run_setup import Run  # noqa: E402
from vla_ft.runtime import init_runtime, seed_everything  # noqa: E402
from vla_ft.signals import StopRequest  # noqa: E402
from vla_ft.tracking import MetricsLogger, Progress  # noqa: E402
from vla_ft.train import StepLoop  # noqa: E402

RECIPE = ROOT / "recipes" / "bench" / "reference.yaml"
STATE_DIM, ACTION_DIM, GRIPPER_DIM, VOCAB = 8, 7, 6, 284  # token ids stay inside the built-in vocabulary
# What every benchmark run overrides: 7-D actions, no validation or checkpoints inside the timing,
# a constant LR (HF's warmup starts at LR 0, ours at LR/warmup: with none, both see the same LRs).
COMMON = [
    "loss.gripper.dims=[6]",
    "train.steps=1000000000",
    "train.val_every=0",
    "logging.every=50",
    "logging.tensorboard=false",
    "logging.progress=none",
    "optim.scheduler=constant",
    "optim.warmup_steps=0",
]
REGIMES = {
    "full": [],
    "frozen": ["freeze.vision_encoder=true"],
    "lora": ["model.lora.enabled=true", "freeze.vision_encoder=true"],
    "head": [
        f"freeze.{m}=true"
        for m in ("vision_encoder", "projector", "proprio_encoder", "language_model", "action_queries")
    ]
    + ["loss.weights.language=0"],
}
SMOKE = [  # a tiny model and batch for the CPU smoke mode
    "model.vision.name=vit_tiny_patch16_224",
    "model.vision.img_size=32",
    "model.vision.kwargs={patch_size: 16, embed_dim: 32, depth: 1, num_heads: 2}",
    "model.language.config.vocab_size=512",
    "model.language.config.hidden_size=32",
    "model.language.config.intermediate_size=64",
    "model.language.config.num_hidden_layers=1",
    "model.language.config.num_attention_heads=2",
    "model.language.config.num_key_value_heads=1",
    "model.projector_hidden=0",
    "model.action_head_hidden=32",
    "model.lora.r=4",
    "train.batch_size=4",
    "train.compile=false",
    "train.precision=fp32",
    "train.threads=1",
]
ROWS = (
    "textbook",
    "vla_bf16_eager",
    "vla_bf16_sdpa",
    "vla_fused",
    "vla_full",
    "vla_all_logits",
    "vla_masked_attn",
    "vla_conv_patchify",
    "vla_rotary_inline",
    "vla_fp32_weights",
    "vla_torch_adamw",
    "hf_eager",
    "hf_compile",
    "hf_compile_stock",
    "vla_frozen",
    "vla_lora",
    "vla_lora_peft",
    "vla_qlora",
    "vla_dora",
    "vla_lora_graphs",
    "vla_full_graphs",
    "vla_full_autotune",
    "vla_full_ema",
    "vla_full_adamw8bit",
    "vla_full_vision_ckpt",
    "vla_full_film",
    "vla_head",
)
SMOKE_ROWS = (
    "textbook",
    "vla_bf16_sdpa",
    "vla_all_logits",
    "vla_masked_attn",
    "vla_conv_patchify",
    "vla_rotary_inline",
    "vla_fp32_weights",
    "vla_fused",
    "hf_eager",
    "vla_frozen",
    "vla_lora",
    "vla_lora_peft",
    "vla_qlora",
    "vla_dora",
    "vla_lora_graphs",
    "vla_full_graphs",
    "vla_full_ema",
    "vla_full_adamw8bit",
    "vla_full_vision_ckpt",
    "vla_full_film",
    "vla_head",
)


@dataclass
class Bench:
    """What every row shares: device, sizes, batches, step counts."""

    device: torch.device
    overrides: list[str]
    batches: list[dict[str, torch.Tensor]]
    warmup: int
    steps: int
    loss_steps: int
    loss_rows: tuple[str, ...]
    peak: float | None
    workdir: Path
    diagnose: bool = False
    trace: str = ""  # --diagnose: write the profiled steps' Chrome trace here (gzipped)

    def recipe(self, *extra: str) -> Recipe:
        return load_recipe(RECIPE, [*COMMON, *self.overrides, f"output_dir={self.workdir / 'run'}", *extra])

    def steps_for(self, row: str) -> int:
        return max(self.warmup + self.steps, self.loss_steps if row in self.loss_rows else 0)


@dataclass
class Row:
    name: str
    steps_ms: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    first_step_s: float = math.nan
    peak_gb: float = math.nan
    tflop_per_step: float = math.nan
    batch: int = 0
    note: str = ""
    extra: dict = field(default_factory=dict)

    def summary(self, warmup: int, peak: float | None) -> dict[str, float | str]:
        timed = self.steps_ms[warmup:] or self.steps_ms
        ms = statistics.median(timed) if timed else math.nan
        tflops = self.tflop_per_step / (ms / 1e3) if timed else math.nan
        return {
            "row": self.name,
            "step_ms": ms,
            "samples_s": self.batch / (ms / 1e3),
            "tflops": tflops,
            "mfu": tflops / peak if peak else math.nan,
            "peak_gb": self.peak_gb,
            "first_step_s": self.first_step_s,
            "note": self.note,
        }


# ----------------------------------------------------------------------------- inputs
def make_batches(n: int, batch_size: int, img: int, chunk: int, device: torch.device, seed: int = 0):
    """``n`` fixed batches in the library's sample format, collated (padding to multiples of 8)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        samples = []
        for i in range(batch_size):
            lp, lt = int(torch.randint(12, 21, (1,), generator=g)), int(torch.randint(4, 13, (1,), generator=g))
            actions = torch.randn(chunk, ACTION_DIM, generator=g)
            actions[:, GRIPPER_DIM] = (torch.rand(chunk, generator=g) > 0.5).float()
            samples.append(
                {
                    "images": torch.randint(0, 256, (1, 3, img, img), dtype=torch.uint8, generator=g),
                    "state": torch.randn(1, STATE_DIM, generator=g),
                    "actions": actions,
                    "action_mask": torch.ones(chunk, dtype=torch.bool),
                    "prompt_ids": torch.randint(4, VOCAB, (lp,), generator=g),
                    "target_ids": torch.randint(4, VOCAB, (lt,), generator=g),
                    "episode_index": torch.tensor(0),
                    "frame_index": torch.tensor(i),
                    "index": torch.tensor(i),
                    "source": torch.tensor(0),
                }
            )
        batches.append({k: v.to(device) for k, v in collate(samples, pad_id=0, pad_to_multiple=8).items()})
    return batches


def build_vla(recipe: Recipe, device: torch.device) -> tuple[VLA, CompositeLoss]:
    """The model and loss exactly as ``run_setup.build_components`` makes them, for 7-D actions."""
    seed_everything(recipe.train.seed)
    model = build_model(
        recipe, state_dim=STATE_DIM, action_dim=ACTION_DIM, n_cameras=1, vocab_size=VOCAB, device=device
    )
    loss_fn = CompositeLoss(recipe.loss, ACTION_DIM, recipe.data.chunk, recipe.model.gripper_head)
    model.set_frozen(optim.frozen_at(recipe, model, 0))
    return model.to(device), loss_fn.to(device)


def count_flops(model: VLA, batch: dict[str, torch.Tensor], want_text: bool) -> float:
    """Model TFLOPs of one training step on ``batch`` (coefficients from an eager forward on 1 sample)."""
    model.train()
    model.wants_language = want_text
    with torch.autocast(batch["actions"].device.type, dtype=torch.bfloat16, enabled=model.master_weights is not None):
        coeffs = flops.measure_step_flops(model, {k: v[:1] for k, v in batch.items()})
    return float(coeffs.total(batch, flops.want_text(model, batch))) / 1e12


# ----------------------------------------------------------------------------- timing
class StepClock:
    """Step-end marks: CUDA events on a GPU (no sync inside the loop), host time on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:], strict=False)]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:], strict=False)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_loop(bench: Bench, row: Row, step: Callable[[dict], torch.Tensor | float], n: int, t0: float) -> None:
    """Run ``n`` steps over the cycled batches; fill the row's step times, losses and first-step time."""
    clock, losses = StepClock(bench.device), []
    clock.mark()
    for i in range(n):
        losses.append(step(bench.batches[i % len(bench.batches)]))
        clock.mark()
        if i == 0:
            sync(bench.device)
            row.first_step_s = time.perf_counter() - t0
    row.steps_ms = clock.intervals_ms()
    row.losses = [float(v) for v in losses]


def reset_memory(device: torch.device) -> None:
    gc.collect()
    torch._dynamo.reset()  # drop compiled graphs (and their memory) of the previous row
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else math.nan


def set_tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


# ----------------------------------------------------------------------------- contenders
def textbook(bench: Bench, name: str) -> Row:
    """(a) What a tutorial writes: fp32, eager attention, default AdamW, print the loss every step.

    Torch's defaults (no TF32). If batch 64 does not fit, two micro-batches of 32 (what one does next).
    """
    for accumulation in (1, 2):
        reset_memory(bench.device)
        set_tf32(False)
        try:
            return _textbook_attempt(bench, name, accumulation)
        except torch.OutOfMemoryError:
            pass  # the failed attempt's tensors are freed with its frame, here
        finally:
            set_tf32(True)
    raise RuntimeError("textbook loop: out of memory even with two micro-batches")


def _textbook_attempt(bench: Bench, name: str, accumulation: int) -> Row:
    recipe = bench.recipe("train.precision=fp32", "model.language.attn_implementation=eager")
    row, t0 = Row(name, batch=recipe.train.batch_size), time.perf_counter()
    model, loss_fn = build_vla(recipe, bench.device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.optim.lr, weight_decay=recipe.optim.weight_decay)
    model.train()

    def step(batch: dict[str, torch.Tensor]) -> float:
        opt.zero_grad()
        size, total = batch["actions"].shape[0] // accumulation, 0.0
        for k in range(accumulation):
            micro = {key: v[k * size : (k + 1) * size] for key, v in batch.items()}
            loss, _ = loss_fn(model(micro), micro)
            (loss / accumulation).backward()
            total += loss.item() / accumulation
        torch.nn.utils.clip_grad_norm_(params, recipe.optim.grad_clip)
        opt.step()
        return total

    timed_loop(bench, row, step, bench.steps_for(name), t0)
    row.peak_gb = peak_gb(bench.device)
    row.tflop_per_step = count_flops(model, bench.batches[0], True)
    row.note = "fp32, eager attn, foreach AdamW" + (", 2 x 32 (64 did not fit)" if accumulation == 2 else "")
    return row


def vla_run(
    recipe: Recipe, bench: Bench, stock_adamw: str | None = None, patch: Callable[[VLA], None] | None = None
) -> Run:
    """vla-ft's Run as ``run_setup.setup`` assembles it (without a dataset), extensions installed;
    ``stock_adamw`` ("foreach" or "fused") replaces the recipe's optimizer by torch's AdamW."""
    rt = init_runtime(recipe)
    model, loss_fn = build_vla(recipe, rt.device)
    if patch is not None:
        patch(model)
    opt = optim.make_optimizer(recipe, model, list(loss_fn.no_decay_parameters()), rt.device, rt.param_dtype)
    if stock_adamw is not None:  # ablations: torch's AdamW, foreach (the default) or fused
        o = recipe.optim
        # the groups without the recipe optimizer's implementation flags (a group's own "fused" wins)
        flags = set(opt.defaults) - {"lr", "weight_decay"}
        groups = [{k: v for k, v in g.items() if k not in flags} for g in opt.param_groups]
        opt = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=stock_adamw == "fused")
        if model.master_weights is not None:
            model.master_weights.attach(opt)
    run_dir = Path(recipe.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    run = Run(
        recipe=recipe,
        rt=rt,
        run_dir=run_dir,
        model=model,
        loss_fn=loss_fn,
        optimizer=opt,
        scaler=None,
        data=None,
        sampler=None,
        train_loader=None,
        val_loader=None,
        logger=MetricsLogger(run_dir, False),
        progress=Progress(recipe.train.steps, 0, "none"),
        tokenizer=None,
        gripper_dims=recipe.loss.gripper.dims,
        ema=weight_average(model, opt, recipe.train),
    )
    optim.set_lr(recipe, opt, 0)
    loss_fn.watch(run.shared_params)
    extensions.install(run)
    return run


def vla(
    bench: Bench,
    name: str,
    regime: str,
    extra: tuple[str, ...] = (),
    stock_adamw: str | None = None,
    note: str = "",
    patch: Callable[[VLA], None] | None = None,
) -> Row:
    """(c) vla-ft's step from a recipe: ``fit``'s ``StepLoop`` (prepare, step, log; a step's finite
    flags read while the next one is queued). ``patch`` changes the model before it is compiled
    (ablations of the model's own choices)."""
    reset_memory(bench.device)
    recipe = bench.recipe(*REGIMES[regime], *extra)
    row, t0 = Row(name, batch=recipe.train.batch_size, note=note), time.perf_counter()
    run = vla_run(recipe, bench, stock_adamw, patch)
    if regime == "head":
        bench = _with_readout(bench, run)
    loop = StepLoop(run, StopRequest())

    def step(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return loop.advance(iter([[batch]])).parts["loss"]

    timed_loop(bench, row, step, bench.steps_for(name), t0)
    row.peak_gb = peak_gb(bench.device)
    if name in ("vla_full", "vla_lora") and bench.device.type == "cuda":
        row.note += f"; GPU idle {gpu_idle_fraction(step, bench.batches):.1%} of the step"
        if bench.diagnose:
            row.extra = diagnose(run, step, bench)
    run.hooks.flop_meter.remove()
    want = recipe.data.language_target != "none" and run.loss_fn.wants("language")
    row.tflop_per_step = count_flops(run.model, bench.batches[0], want)
    return row


def stock_model(model: VLA) -> None:
    """The model as transformers and timm build it: none of vla-ft's kernel-level rewrites."""
    plain_sdpa(model)
    rotary_inline(model)
    conv_patchify(model)


def plain_sdpa(model: VLA) -> None:
    """Ablation: the LM on transformers' own "sdpa" instead of :mod:`vla_ft.lm_compile`. While
    compiling, transformers 5.17 with torch 2.11 then builds a (B, 1, L, L) causal mask, so SDPA
    runs the masked kernel with K/V expanded to every query head."""
    model.language_model.config._attn_implementation = "sdpa"


def conv_patchify(model: VLA) -> None:
    """Ablation: the ViT's patch embedding as the strided ``nn.Conv2d`` timm builds (cuDNN), not
    :class:`vla_ft.backbones.PatchifyConv`'s matmul."""
    for m in model.vision_encoder.modules():
        if isinstance(m, PatchifyConv):
            m.__class__ = torch.nn.Conv2d


def rotary_inline(model: VLA) -> None:
    """Ablation: the LM's own rotary module, without :class:`vla_ft.lm_compile.RotaryOnce`."""
    decoder = model.decoder
    if isinstance(decoder.rotary_emb, RotaryOnce):
        decoder.rotary_emb = decoder.rotary_emb.rotary


def logits_everywhere(model: VLA) -> None:
    """Ablation: LM logits at every position, as a stock causal-LM forward computes them
    (B, L, V), with the loss still on the target rows only: what vla-ft saves by applying the
    LM head at the supervised positions alone."""

    def forward(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        hidden, q0 = model.lm_hidden(batch)
        out = model.heads(take(hidden, q0 + torch.arange(model.chunk, device=q0.device)))
        logits = model.lm_head(hidden)  # (B, L, V)
        labels = batch["target_ids"].masked_fill(~batch["target_mask"], -100)
        out["lm_logits"] = take(logits, model.target_positions(q0, batch)).flatten(0, 1)
        out["lm_labels"] = labels.flatten()
        return out

    model.forward = forward  # type: ignore[method-assign]


@torch.no_grad()
def _with_readout(bench: Bench, run: Run) -> Bench:
    """The batches as the feature cache serves them: the frozen trunk's readout instead of inputs."""
    model = run.model
    model.eval()
    batches = []
    for batch in bench.batches:
        with run.rt.autocast():
            readout = model.trunk(batch)["readout"]
        batches.append({"readout": readout, "actions": batch["actions"], "action_mask": batch["action_mask"]})
    return Bench(**{**bench.__dict__, "batches": batches})


def hf_trainer(bench: Bench, name: str, compile_: bool, patch: Callable[[VLA], None] | None = None) -> Row:
    """(b) HF Trainer set up well: bf16, sdpa, adamw_torch_fused, the same model and loss via compute_loss;
    ``patch`` changes the model first (``stock_model``)."""
    from accelerate.state import AcceleratorState
    from torch.utils.data import DataLoader, Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    reset_memory(bench.device)
    recipe = bench.recipe()
    row, t0 = Row(name, batch=recipe.train.batch_size), time.perf_counter()
    model, loss_fn = build_vla(recipe, bench.device)
    if patch is not None:
        patch(model)
    model.wants_language = True
    n, cuda = bench.steps_for(name), bench.device.type == "cuda"
    clock, losses = StepClock(bench.device), []

    class Batches(Dataset):
        def __len__(self) -> int:
            return n

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return bench.batches[i % len(bench.batches)]

    class StepEnds(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock.mark()

        def on_step_end(self, args, state, control, **kwargs):
            clock.mark()
            if state.global_step == 1:
                sync(bench.device)
                row.first_step_s = time.perf_counter() - t0

    class VLATrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = model(inputs)
            total, _ = loss_fn(outputs, inputs)
            losses.append(total.detach())
            return (total, outputs) if return_outputs else total

        def get_train_dataloader(self) -> DataLoader:
            return DataLoader(Batches(), batch_size=None, shuffle=False)

    o = recipe.optim
    # Accelerate's state is a singleton: a second Trainer would keep the first one's compile setting;
    # reset before TrainingArguments, which sets up its device (use_cpu) in that state
    AcceleratorState._reset_state(True)
    args = TrainingArguments(
        output_dir=str(bench.workdir / name),
        max_steps=n,
        per_device_train_batch_size=recipe.train.batch_size,
        learning_rate=o.lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.betas[0],
        adam_beta2=o.betas[1],
        adam_epsilon=o.eps,
        max_grad_norm=o.grad_clip,
        lr_scheduler_type="constant",
        warmup_steps=0,
        bf16=cuda,
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        torch_compile=compile_,
        logging_steps=n,
        logging_nan_inf_filter=False,
        save_strategy="no",
        report_to="none",
        dataloader_pin_memory=False,
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=recipe.train.seed,
        use_cpu=not cuda,
    )
    trainer = VLATrainer(model=model, args=args, callbacks=[StepEnds()])
    trainer.train()
    compiled = isinstance(trainer.model_wrapped, torch._dynamo.eval_frame.OptimizedModule)
    row.steps_ms, row.losses = clock.intervals_ms(), [float(v) for v in losses]
    row.peak_gb = peak_gb(bench.device)
    row.tflop_per_step = count_flops(model, bench.batches[0], True)
    row.note = "bf16, sdpa, adamw_torch_fused" + (", torch_compile" if compiled else "")
    row.note += ", stock model" if patch is stock_model else ""
    if compile_ != compiled:
        row.note += " (torch_compile asked, model NOT compiled)"
    return row


def gpu_idle_fraction(step: Callable[[dict], object], batches: list[dict], n: int = 5) -> float:
    """Share of wall time with no kernel running over ``n`` steps (host syncs, launch gaps)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(n):
            step(batches[i % len(batches)])
        torch.cuda.synchronize()
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA)
    busy, end = 0.0, -math.inf
    for a, b in spans:
        busy += max(0.0, b - max(a, end))
        end = max(end, b)
    return 1.0 - busy / max(spans[-1][1] - spans[0][0], 1e-9) if spans else math.nan


# ----------------------------------------------------------------------------- diagnostics (--diagnose)
def median_ms(step: Callable[[dict], object], batches: list[dict], n: int = 20, warm: int = 3) -> float:
    clock = StepClock(batches[0]["actions"].device)
    for i in range(warm + n):
        step(batches[i % len(batches)])
        if i >= warm - 1:
            clock.mark()
    return statistics.median(clock.intervals_ms())


def diagnose(run: Run, step: Callable[[dict], object], bench: Bench) -> dict:
    """What the vla-ft step spends (kernel table) and what two of its choices buy, measured in
    the same process on the same graphs: the fused step path (queued before the host sync,
    clipping inside the update) vs the plain one, each step's flags read before the next step is
    queued vs after, and the compiled loss terms vs eager ones."""
    from torch.profiler import ProfilerActivity, profile

    out: dict = {"as_is_ms": median_ms(step, bench.batches)}
    queues = train_mod.queues_step
    train_mod.queues_step = lambda run: False
    try:
        out["plain_step_ms"] = median_ms(step, bench.batches)  # host sync, then clip_grad_norm_, then the update
    finally:
        train_mod.queues_step = queues
    defers = train_mod.can_defer
    train_mod.can_defer = lambda run, stop: False
    try:
        out["read_at_once_ms"] = median_ms(step, bench.batches)  # each step's flags read before the next is queued
    finally:
        train_mod.can_defer = defers
    evaluate = run.loss_fn.evaluate
    if hasattr(evaluate, "eager"):
        run.loss_fn.evaluate = evaluate.eager
        try:
            out["loss_eager_ms"] = median_ms(step, bench.batches)
        finally:
            run.loss_fn.evaluate = evaluate
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(3):
            step(bench.batches[i % len(bench.batches)])
        torch.cuda.synchronize()
    if bench.trace:
        prof.export_chrome_trace(bench.trace)
        subprocess.run(["gzip", "-f", bench.trace], check=True)
    averages = prof.key_averages()
    out["kernels"] = averages.table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=70)
    out["cpu_ops"] = averages.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70)
    print(out["kernels"], out["cpu_ops"], sep="\n", flush=True)
    print(json.dumps({k: v for k, v in out.items() if k not in ("kernels", "cpu_ops")}), flush=True)
    return out


ROW_FUNCS: dict[str, Callable[[Bench, str], Row]] = {
    "textbook": textbook,
    "vla_bf16_eager": lambda b, n: vla(
        b,
        n,
        "full",
        ("train.compile=false", "model.language.attn_implementation=eager"),
        stock_adamw="foreach",
        note="bf16 autocast, eager attn, foreach AdamW",
    ),
    "vla_bf16_sdpa": lambda b, n: vla(b, n, "full", ("train.compile=false",), stock_adamw="foreach", note="+ sdpa"),
    "vla_fused": lambda b, n: vla(b, n, "full", ("train.compile=false",), note="+ fused AdamW"),
    "vla_full": lambda b, n: vla(b, n, "full", note="+ compiled forward and loss (the recipe)"),
    "vla_all_logits": lambda b, n: vla(
        b, n, "full", note="ablation: LM logits at every position", patch=logits_everywhere
    ),
    "vla_masked_attn": lambda b, n: vla(
        b, n, "full", note="ablation: transformers' plain sdpa (a causal mask built while compiling)", patch=plain_sdpa
    ),
    "vla_conv_patchify": lambda b, n: vla(
        b, n, "full", note="ablation: the ViT's patch embedding on cuDNN's conv", patch=conv_patchify
    ),
    "vla_rotary_inline": lambda b, n: vla(
        b, n, "full", note="ablation: rotary tables inlined into every layer by inductor", patch=rotary_inline
    ),
    "vla_torch_adamw": lambda b, n: vla(
        b, n, "full", stock_adamw="fused", note="ablation: torch's fused AdamW + gradient/weight copies"
    ),
    "vla_fp32_weights": lambda b, n: vla(
        b, n, "full", ("train.param_dtype=fp32",), note="ablation: autocast over fp32 weights"
    ),
    "hf_eager": lambda b, n: hf_trainer(b, n, False),
    "hf_compile": lambda b, n: hf_trainer(b, n, True),
    "hf_compile_stock": lambda b, n: hf_trainer(b, n, True, stock_model),
    "vla_frozen": lambda b, n: vla(b, n, "frozen", note="frozen vision encoder"),
    "vla_lora": lambda b, n: vla(b, n, "lora", note="LoRA r=32 on LM linears, frozen vision"),
    "vla_lora_peft": lambda b, n: vla(
        b, n, "lora", ("model.lora.fused=false",), note="ablation: LoRA through peft's own forward"
    ),
    "vla_qlora": lambda b, n: vla(
        b, n, "lora", ("model.language.quantize=nf4",), note="QLoRA: LoRA r=32 on a 4-bit (nf4) LM, frozen vision"
    ),
    "vla_dora": lambda b, n: vla(
        b, n, "lora", ("model.lora.use_dora=true",), note="DoRA r=32 on LM linears (peft's forward), frozen vision"
    ),
    "vla_lora_graphs": lambda b, n: vla(
        b, n, "lora", ("train.compile_mode=reduce-overhead",), note="LoRA, CUDA graphs (reduce-overhead)"
    ),
    "vla_full_graphs": lambda b, n: vla(
        b, n, "full", ("train.compile_mode=reduce-overhead",), note="full, CUDA graphs (reduce-overhead)"
    ),
    "vla_full_ema": lambda b, n: vla(
        b, n, "full", ("train.ema_decay=0.999",), note="full, + a weight average updated every step (ema_decay)"
    ),
    "vla_full_adamw8bit": lambda b, n: vla(
        b, n, "full", ("optim.name=adamw8bit",), note="full, AdamW with 8-bit moments (bitsandbytes)"
    ),
    "vla_full_autotune": lambda b, n: vla(
        b, n, "full", ("train.compile_mode=max-autotune-no-cudagraphs",), note="full, inductor max-autotune"
    ),
    "vla_full_vision_ckpt": lambda b, n: vla(
        b, n, "full", ("model.vision.gradient_checkpointing=true",), note="full, ViT blocks recomputed in backward"
    ),
    "vla_full_film": lambda b, n: vla(
        b, n, "full", ("model.vision.film=true",), note="full, + FiLM of every ViT block by the prompt"
    ),
    "vla_head": lambda b, n: vla(b, n, "head", note="heads on precomputed readout (feature cache)"),
}


# ----------------------------------------------------------------------------- ceilings
def matmul_tflops(device: torch.device, m: int, k: int, n: int, reps: int = 30) -> float:
    """Measured bf16 matmul rate (median of ``reps``, random inputs) in TFLOP/s."""
    a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    b = torch.randn(k, n, device=device, dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    clock = StepClock(device)
    clock.mark()
    for _ in range(reps):
        a @ b
        clock.mark()
    return 2 * m * k * n / (statistics.median(clock.intervals_ms()) / 1e3) / 1e12


def attention_ms(device: torch.device, b: int, heads: int, seq: int, head_dim: int) -> dict[str, float]:
    """Forward + backward of one attention layer per SDPA backend: causal, padding-masked, and none."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (
        torch.randn(b, heads, seq, head_dim, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)
    )
    keep = torch.ones(b, seq, dtype=torch.bool, device=device)
    keep[: b // 2, 200:210] = False  # left-padded prompts inside the sequence
    mask = torch.tril(torch.ones(seq, seq, dtype=torch.bool, device=device)) & keep[:, None, None, :]
    out = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        for label, kwargs in (("causal", {"is_causal": True}), ("masked", {"attn_mask": mask}), ("full", {})):
            try:
                with sdpa_kernel([backend]):
                    clock = StepClock(device)
                    for i in range(25):
                        F.scaled_dot_product_attention(q, k, v, **kwargs).sum().backward()
                        if i >= 4:
                            clock.mark()
                    out[f"{backend.name.lower()}_{label}"] = statistics.median(clock.intervals_ms())
            except RuntimeError:
                out[f"{backend.name.lower()}_{label}"] = math.nan  # backend does not support this case
    return out


# ----------------------------------------------------------------------------- report
def table(rows: list[dict]) -> str:
    head = f"{'row':<15} {'step ms':>8} {'samples/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'peak GB':>8} {'1st step s':>10}"
    head += "  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['row']:<15} {r['step_ms']:>8.1f} {r['samples_s']:>10.1f} {r['tflops']:>8.1f} "
            f"{r['mfu']:>6.1%} {r['peak_gb']:>8.1f} {r['first_step_s']:>10.1f}  {r['note']}"
        )
    return "\n".join(lines)


def loss_comparison(rows: dict[str, Row], names: tuple[str, ...]) -> str:
    have = [rows[n] for n in names if n in rows and rows[n].losses]
    lines = []
    for a in have:
        for b in have:
            if a.name < b.name:
                n = min(len(a.losses), len(b.losses))
                d = [abs(x - y) for x, y in zip(a.losses[:n], b.losses[:n], strict=True)]
                tail = max(1, n // 10)
                lines.append(
                    f"loss {a.name} vs {b.name} over {n} steps: mean |diff| {statistics.mean(d):.4f}, "
                    f"max {max(d):.4f}; last {tail}: {statistics.mean(a.losses[n - tail : n]):.4f} vs "
                    f"{statistics.mean(b.losses[n - tail : n]):.4f}; first {a.losses[0]:.4f} vs {b.losses[0]:.4f}"
                )
    return "\n".join(lines)


def data_wait(dataset: str, steps: int, workdir: Path) -> dict[str, float]:
    """Item 4: a real ``vla-ft train`` of the reference recipe on a LeRobot video dataset; the share of
    wall time the loop waited for batches (``perf/data_wait_frac``), after the first log window
    (which holds the compilation)."""
    from vla_ft.cli import main as cli

    out_dir = workdir / "data_wait"
    argv = [
        "train",
        str(RECIPE),
        f"output_dir={out_dir}",
        "data.format=lerobot",
        f"data.path={dataset}",
        "data.cameras=[observation.images.top]",
        "data.text_key=narration",
        f"train.steps={steps}",
        "train.val_every=0",
        "data.val_ratio=0",
        "checkpoint.every=0",
        "checkpoint.save_optimizer=false",
        "logging.every=10",
        "logging.tensorboard=false",
        "logging.progress=plain",
    ]
    print("vla-ft " + " ".join(argv), flush=True)
    if cli(argv) != 0:
        raise RuntimeError("vla-ft train failed")
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "perf/data_wait_frac" in r][1:]
    keys = ("perf/data_wait_frac", "perf/samples_per_s", "perf/tflops", "perf/mfu", "perf/gpu_mem_gb")
    summary = {k: statistics.mean(r[k] for r in rows) for k in keys if all(k in r for r in rows)}
    summary["max_data_wait_frac"] = max(r["perf/data_wait_frac"] for r in rows)
    print(json.dumps(summary), flush=True)
    return summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="", help=f"comma-separated subset of: {', '.join(ROWS)}")
    p.add_argument("--warmup", type=int, default=10, help="steps not timed (compilation happens here)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per row")
    p.add_argument("--loss-steps", type=int, default=200, help="steps of the loss-curve rows")
    p.add_argument("--loss-rows", default="vla_fused,vla_full,hf_compile", help="rows that run --loss-steps")
    p.add_argument("--batches", type=int, default=8, help="distinct fixed batches, cycled")
    p.add_argument("--out", default="", help="write rows, losses and ceilings as JSON here")
    p.add_argument("--data-wait", default="", help="LeRobot video dataset: run `vla-ft train` on it (item 4)")
    p.add_argument("--data-steps", type=int, default=120, help="steps of the --data-wait run")
    p.add_argument("--skip-ceilings", action="store_true", help="skip the matmul and attention micro-benchmarks")
    p.add_argument("--diagnose", action="store_true", help="vla_full, vla_lora: kernel table and step variants")
    p.add_argument("--trace", default="", help="with --diagnose: Chrome trace of the profiled steps (.json)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, 3 steps: checks the script runs")
    p.add_argument("--set", nargs="*", default=[], help="recipe overrides for every row (a smaller model)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    smoke = args.smoke
    device = torch.device("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    names = [n for n in args.rows.split(",") if n and n != "none"]
    names = names or ([] if args.rows == "none" else list(SMOKE_ROWS if smoke else ROWS))
    unknown = sorted(set(names) - set(ROWS))
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; valid: {', '.join(ROWS)}")
    workdir = Path(tempfile.mkdtemp(prefix="vla_bench_"))
    overrides = [*(SMOKE if smoke else ()), f"train.device={device.type}", *args.set]
    probe = load_recipe(RECIPE, [*COMMON, *overrides])
    bench = Bench(
        device,
        overrides,
        [],
        1 if smoke else args.warmup,
        2 if smoke else args.steps,
        0 if smoke else args.loss_steps,
        tuple(args.loss_rows.split(",")),
        flops.peak_tflops(device),
        workdir,
        args.diagnose,
        args.trace,
    )
    bench.batches = make_batches(
        2 if smoke else args.batches, probe.train.batch_size, probe.model.vision.img_size, probe.data.chunk, device
    )
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "peak_bf16_tflops": bench.peak,
    }
    if device.type == "cuda" and not args.skip_ceilings:
        info["matmul_8192_tflops"] = matmul_tflops(device, 8192, 8192, 8192)
        tokens = probe.train.batch_size * 256
        info["matmul_lm_mlp_tflops"] = matmul_tflops(device, tokens, 896, 4864)
        info["attention_lm_layer_ms"] = attention_ms(device, probe.train.batch_size, 14, 248, 64)
        info["attention_vit_layer_ms"] = attention_ms(device, probe.train.batch_size, 12, 196, 64)
    print(json.dumps(info), flush=True)
    if args.data_wait:
        info["data_wait"] = data_wait(args.data_wait, args.data_steps, workdir)
    done: dict[str, Row] = {}
    for name in names:
        try:
            done[name] = ROW_FUNCS[name](bench, name)
            print(table([done[name].summary(bench.warmup, bench.peak)]).splitlines()[-1], flush=True)
            if args.out:
                write_json(args.out, info, done, bench)
        except Exception as err:  # one broken contender must not lose the other rows
            if smoke:
                raise
            traceback.print_exc()
            print(f"{name}: FAILED {type(err).__name__}: {err}", flush=True)
    summaries = [done[n].summary(bench.warmup, bench.peak) for n in names if n in done]
    print("\n" + table(summaries))
    print(loss_comparison(done, bench.loss_rows))
    return summaries


def write_json(path: str, info: dict, done: dict[str, Row], bench: Bench) -> None:
    """Everything measured so far (written after each row, so a cut-off run keeps its rows)."""
    payload = {
        "info": info,
        "rows": [r.summary(bench.warmup, bench.peak) for r in done.values()],
        "losses": {n: r.losses for n, r in done.items()},
        "steps_ms": {n: r.steps_ms for n, r in done.items()},
        "extra": {n: r.extra for n, r in done.items() if r.extra},
    }
    Path(path).write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
