"""Everything a run holds (:class:`Run`) and how it is assembled from a recipe (:func:`setup`).

Order matters for exact resume: the model is built from the seed, then the checkpoint (if
any) overwrites weights, optimizer, RNG and data position; nothing after that draws from
the global RNG.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vla_ft import checkpoint as ck
from vla_ft import optim
from vla_ft.config import Recipe, RecipeError, save_recipe, to_dict
from vla_ft.data import DataBundle, build_data, make_loader
from vla_ft.ema import WeightEMA, weight_average
from vla_ft.losses import CompositeLoss
from vla_ft.model import VLA, build_model, pad_token_id
from vla_ft.model_files import read_model_meta, read_norm_stats, recorded_prompt_prefix
from vla_ft.report import format_table, parameter_rows
from vla_ft.rollout import close_envs, training_envs
from vla_ft.run_state import (
    TrainState,
    check_resume_compatible,
    check_same_split,
    load_training_checkpoint,
    read_saved_recipe,
    read_trainer_state,
    restore_best_pointer,
    saved_validation_samples,
)
from vla_ft.runtime import Runtime, init_runtime, say, seed_everything, shutdown
from vla_ft.samplers import EpochSampler, ValidationSampler, sample_sources, validation_samples
from vla_ft.tokenizer import BUILTIN_TINY, load_tokenizer
from vla_ft.tracking import MetricsLogger, Progress, TrainWindow


@dataclass
class RunHooks:
    """What extensions plug into a run (:mod:`vla_ft.distributed`, :mod:`vla_ft.flops`); None keeps
    the one-process default of the :class:`Run` method of the same name."""

    on_freeze_change: Callable[[Run], None] | None = None
    clip_grad_norm: Callable[[Run, float], torch.Tensor] | None = None
    reduce_metrics: Callable[[Run, dict[str, float]], dict[str, float]] | None = None
    no_sync: Callable[[Run], contextlib.AbstractContextManager] | None = None  # FSDP2: no .no_sync() to call
    perf_metrics: Callable[[Run, int, float], dict[str, float]] | None = None
    stage_model_state: Callable[[Run], Any] | None = None  # FSDP: gather the shards for a checkpoint
    flop_meter: Any = None  # vla_ft.flops.FlopMeter, counting FLOPs for perf/mfu


@dataclass
class Run:
    recipe: Recipe
    rt: Runtime
    run_dir: Path
    model: VLA
    loss_fn: CompositeLoss
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    data: DataBundle
    sampler: EpochSampler
    train_loader: Any
    val_loader: Any
    logger: MetricsLogger
    progress: Progress
    tokenizer: Any
    gripper_dims: list[int]
    state: TrainState = field(default_factory=TrainState)
    window: TrainWindow = field(default_factory=TrainWindow)  # since the last train row; checkpoints keep it
    resumed_from: Path | None = None
    early_stop: bool = False
    wrapped: nn.Module | None = None  # DDP/FSDP wrapper around model, when distributed
    ema: WeightEMA | None = None  # train.ema_decay: the average validation measures and checkpoints keep
    rollout_env: tuple[list[Any], int] | None = None  # rollout.episodes: (envs, first seed)
    val_samples: int = 0  # validation samples evaluated (0: all), fixed when the run starts
    hooks: RunHooks = field(default_factory=RunHooks)

    # ------------------------------------------------------------------ hooks used by the loop
    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return (self.wrapped or self.model)(batch)

    def no_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient reduction (DDP's all-reduce, FSDP's reduce-scatter) on all but the last
        micro-batch of a step: the micro-batch's forward and backward run inside."""
        if last:
            return contextlib.nullcontext()
        if self.wrapped is not None and hasattr(self.wrapped, "no_sync"):
            return self.wrapped.no_sync()
        hook = self.hooks.no_sync
        return hook(self) if hook is not None else contextlib.nullcontext()

    def trainable_params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad]

    @property
    def shared_params(self) -> list[torch.Tensor]:
        return self.model.shared_layer_parameters()

    def on_freeze_change(self) -> None:
        """Called after a staged unfreeze; distributed wrappers re-register parameters here."""
        hook = self.hooks.on_freeze_change
        if hook is not None:
            hook(self)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip all trainable gradients by their global L2 norm; returns the norm before clipping.
        Distributed strategies replace it (sharded gradients, state outside the wrapper)."""
        hook = self.hooks.clip_grad_norm
        if hook is not None:
            return hook(self, max_norm)
        return torch.nn.utils.clip_grad_norm_(self.trainable_params(), max_norm)

    def reduce_metrics(self, values: dict[str, float]) -> dict[str, float]:
        hook = self.hooks.reduce_metrics
        return hook(self, values) if hook is not None else values

    def perf_metrics(self, samples: int, elapsed: float) -> dict[str, float]:
        out = {}
        if self.rt.device.type == "cuda":
            out["perf/gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.rt.device) / 2**30
        hook = self.hooks.perf_metrics
        if hook is not None:
            out.update(hook(self, samples, elapsed))
        return out


def _default_tokenizer(recipe: Recipe) -> str:
    lang = recipe.model.language
    if not lang.tokenizer and recipe.model.init_from:
        from vla_ft.init_from import source_tokenizer

        return source_tokenizer(recipe.model.init_from)
    return lang.tokenizer or lang.name or BUILTIN_TINY


def find_resume_checkpoint(recipe: Recipe, run_dir: Path) -> Path | None:
    if not recipe.train.resume:
        return None
    path = ck.latest_checkpoint(run_dir / "checkpoints")
    if path is None:
        say(f"train.resume: no complete checkpoint in {run_dir / 'checkpoints'}; starting from scratch")
    return path


def build_components(
    recipe: Recipe, device: torch.device, resume_from: Path | None = None, param_dtype: torch.dtype | None = None
):
    """Tokenizer, data, model, loss and optimizer, seeded: the part shared with ``inspect``.

    ``param_dtype`` (bf16): the model's weights become bf16 and the optimizer updates their fp32
    masters (:mod:`vla_ft.master_weights`). Returns (model, loss_fn, optimizer, (tokenizer, data)).
    """
    seed_everything(recipe.train.seed)
    tokenizer = load_tokenizer(str(resume_from / "tokenizer") if resume_from else _default_tokenizer(recipe))
    stats = read_norm_stats(resume_from) if resume_from else None
    prefix = recorded_prompt_prefix(read_model_meta(resume_from)) if resume_from else None
    data = build_data(recipe, tokenizer, stats, prefix)
    model = build_model(
        recipe,
        state_dim=data.state_dim,
        action_dim=data.action_dim,
        n_cameras=len(data.cameras),
        vocab_size=len(tokenizer),
        resume_from=resume_from,
        device=device,
    ).to(device)
    loss_fn = CompositeLoss(recipe.loss, data.action_dim, recipe.data.chunk, recipe.model.gripper_head).to(device)
    model.wants_language = recipe.data.language_target != "none" and loss_fn.wants("language")
    optimizer = optim.make_optimizer(recipe, model, list(loss_fn.no_decay_parameters()), device, param_dtype)
    return model, loss_fn, optimizer, (tokenizer, data)


def check_output_dir(run_dir: Path, key: str = "output_dir") -> None:
    """Refuse an output directory (``key``) that is, or lies under, a file, before the model and
    the data are built: mkdir would fail only then, with a bare OSError or a traceback."""
    blocking = next((p for p in (run_dir, *run_dir.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise RecipeError(f"{key}: {blocking} is a file, not a directory; choose another {key}")


def setup(recipe: Recipe) -> Run:
    rt = init_runtime(recipe)
    run_dir = Path(recipe.output_dir)
    check_output_dir(run_dir)
    resume_from = find_resume_checkpoint(recipe, run_dir)
    earlier = ck.latest_checkpoint(run_dir / "checkpoints") if resume_from is None else None
    if earlier is not None:  # a fresh run here would interleave its checkpoints with the old ones
        raise RecipeError(
            f"output_dir: {run_dir} holds checkpoints of an earlier run (newest: {earlier.name}); "
            "set train.resume=true to continue it, or choose a new output_dir"
        )
    saved_val_samples, saved_state = None, {}
    if resume_from is not None:
        saved_recipe = read_saved_recipe(resume_from)
        check_resume_compatible(saved_recipe, recipe, resume_from, rt.world_size)
        saved_state = read_trainer_state(resume_from)
        saved_val_samples = saved_validation_samples(saved_recipe, saved_state, recipe)
    val_samples = validation_samples(recipe, rt.world_size, saved_val_samples)
    rollout_env = training_envs(recipe, rt.world_size)
    model, loss_fn, optimizer, (tokenizer, data) = build_components(recipe, rt.device, resume_from, rt.param_dtype)
    check_same_split(resume_from, saved_state, data.train_episodes, data.val_episodes, recipe)
    gripper = recipe.loss.gripper.dims if recipe.model.gripper_head else []
    scaler = torch.amp.GradScaler("cuda") if rt.amp_dtype == torch.float16 else None
    sampler = EpochSampler(len(data.train_set), recipe.train.seed, True, rt.rank, rt.world_size, data.train_weights)
    if len(data.train_set) // rt.world_size < recipe.train.batch_size:  # every batch is dropped: no step, ever
        raise RecipeError(
            f"train.batch_size: {recipe.train.batch_size} is more than the {len(data.train_set)} training samples"
            + (f" split over {rt.world_size} processes" if rt.world_size > 1 else "")
            + " give (incomplete batches are dropped); lower it or use more episodes"
        )
    per_epoch = len(data.train_set) // rt.world_size // recipe.train.batch_size
    if per_epoch < recipe.optim.accumulation:  # an epoch would hold no whole step (leftovers are dropped)
        raise RecipeError(
            f"optim.accumulation: {recipe.optim.accumulation} micro-batches per step, but an epoch holds "
            f"{per_epoch} batches of train.batch_size {recipe.train.batch_size}; lower one of them"
        )
    pad = pad_token_id(tokenizer)
    train_loader = make_loader(data.train_set, recipe, sampler, pad, rt.device, train=True)
    val_loader = None
    if data.val_set is not None:
        val_sampler = ValidationSampler(len(data.val_set), val_samples, sample_sources(data.val_set))
        val_loader = make_loader(data.val_set, recipe, val_sampler, pad, rt.device, train=False)
    if rt.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    logger = MetricsLogger(
        run_dir, recipe.logging.tensorboard, rt.is_main, recipe.logging.wandb, to_dict(recipe) if rt.is_main else None
    )
    run = Run(
        recipe,
        rt,
        run_dir,
        model,
        loss_fn,
        optimizer,
        scaler,
        data,
        sampler,
        train_loader,
        val_loader,
        logger,
        Progress(recipe.train.steps, 0, recipe.logging.progress, rt.is_main),
        tokenizer,
        gripper,
        ema=weight_average(model, optimizer, recipe.train),
        rollout_env=rollout_env,
        val_samples=val_samples,
    )
    if resume_from is not None:
        load_training_checkpoint(run, resume_from)
        run.resumed_from = resume_from
        if rt.is_main:
            restore_best_pointer(run)
        logger.truncate_after(run.state.step, run.state.skipped)
        run.progress = Progress(recipe.train.steps, run.state.step, recipe.logging.progress, rt.is_main)
        run.progress.write(f"resumed from {resume_from} at step {run.state.step}")
    elif (moved := logger.start_fresh()) is not None:
        run.progress.write(f"starting at step 0: the earlier run's metrics in {run_dir} moved to {moved.name}")
    model.set_frozen(optim.frozen_at(recipe, model, run.state.step))
    optim.check_trainable_covered(model, optimizer)
    optim.set_lr(recipe, optimizer, run.state.step)
    loss_fn.watch(run.shared_params)  # gradnorm/* diagnostics every loss.grad_norm_every steps
    _install_extensions(run)
    if rt.is_main:
        save_recipe(recipe, run_dir / "config.yaml")
        table = format_table(parameter_rows(model, optimizer))
        (run_dir / "parameters.txt").write_text(table + "\n")
        run.progress.write(table)
    return run


def _install_extensions(run: Run) -> None:
    """Optional parts (distributed wrapping, feature cache, MFU) hook into the run here."""
    from vla_ft import extensions

    extensions.install(run)


def teardown(run: Run) -> None:
    run.logger.close()
    if run.rollout_env is not None:
        close_envs(run.rollout_env[0])
    shutdown(run.rt)
