"""The recipe schema: one dataclass per section, every key with its help text.

The dataclasses are the single source of truth for recipe keys; ``vla-ft keys`` prints them.
Derived values (image size from the encoder, action dims from the data) are computed at
build time, never as class-level defaults.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

MODULE_NAMES = (
    "vision_encoder",
    "projector",
    "proprio_encoder",
    "film",
    "language_model",
    "action_queries",
    "action_head",
    "gripper_head",
)
TRUNK_MODULES = ("vision_encoder", "projector", "proprio_encoder", "film", "language_model", "action_queries")


class RecipeError(ValueError):
    """A user error in a recipe: printed without a traceback by the CLI."""

    def __init__(self, problems: list[str] | str, source: str = "recipe"):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        if len(self.problems) == 1:
            super().__init__(f"{source}: {self.problems[0]}")
        else:
            super().__init__(f"{source}: {len(self.problems)} problems:\n  - " + "\n  - ".join(self.problems))


def doc(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field carrying its help text."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


# ----------------------------------------------------------------------------- model
@dataclass
class VisionConfig:
    name: str = doc("timm model name, e.g. vit_base_patch16_siglip_224", "vit_tiny_patch16_224")
    pretrained: bool | str = doc(
        "false: random init; true: weights from the hub by name; a path: local safetensors file or directory",
        False,
    )
    img_size: int = doc("input image size (square); overrides the timm default", 64)
    features: Literal["patch", "pooled"] = doc("patch tokens, or one pooled token per camera", "patch")
    per_camera: bool = doc("one encoder per camera instead of a shared one", False)
    kwargs: dict[str, Any] = doc("extra keyword arguments for timm.create_model (tiny models)", factory=dict)
    position_init: Literal["sincos", "timm"] = doc(
        "position embeddings of a ViT built from random init: 2-D sin-cos (as MAE), with which it learns where "
        "things are in fewer steps, or timm's small random init; trained either way, ignored with pretrained weights",
        "sincos",
    )
    gradient_checkpointing: bool = doc(
        "recompute the encoder's block activations in backward to save memory (timm's set_grad_checkpointing)", False
    )
    film: bool = doc(
        "the instruction scales and shifts every ViT block's output (FiLM, as OpenVLA-OFT+), through the `film` "
        "module: a projection of the prompt's mean token embedding, zero at init",
        False,
    )


@dataclass
class LanguageConfig:
    name: str | None = doc("hub name or local directory of a causal LM; null builds from `config`", None)
    config: dict[str, Any] = doc(
        "transformers config kwargs incl. model_type, to build a random-init LM; only with name null", factory=dict
    )
    tokenizer: str = doc("hub name or directory of the tokenizer; 'builtin:tiny' = the shipped offline one", "")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = doc("attention kernel", "sdpa")
    gradient_checkpointing: bool = doc("recompute LM activations in backward to save memory", False)
    quantize: Literal["none", "nf4", "fp4"] = doc(
        "store the LM's linear layers in 4 bits (QLoRA, bitsandbytes): they stay frozen, so train LoRA on them "
        "(model.lora.enabled) or freeze the LM; the output head and embeddings keep full precision",
        "none",
    )


@dataclass
class LoraConfig:
    enabled: bool = doc("wrap the LM (and optionally the vision encoder) in LoRA adapters", False)
    r: int = doc("LoRA rank", 16)
    alpha: int = doc("LoRA alpha", 32)
    dropout: float = doc("LoRA dropout", 0.0)
    target_modules: list[str] = doc(
        "LM module name patterns to adapt", factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    vision: bool = doc("also adapt the vision encoder", False)
    vision_target_modules: list[str] = doc("vision module name patterns to adapt", factory=lambda: ["qkv", "proj"])
    use_rslora: bool = doc("rank-stabilised LoRA: adapters scaled by alpha / sqrt(r), not alpha / r (peft)", False)
    use_dora: bool = doc(
        "DoRA: each adapted weight split into a trained per-row magnitude and a LoRA-adapted direction (peft; "
        "these layers run peft's forward, which recomputes the weight's row norms every step)",
        False,
    )
    fused: bool = doc(
        "compute each adapter inside its base layer's matmuls (vla_ft.lora_kernel: same numbers, no full-width "
        "adapter output; layers with dropout > 0 keep peft's forward); false = peft's own forward everywhere",
        True,
    )


@dataclass
class ModelConfig:
    vision: VisionConfig = doc("vision encoder", factory=VisionConfig)
    language: LanguageConfig = doc("causal language model", factory=LanguageConfig)
    lora: LoraConfig = doc("LoRA adapters through peft", factory=LoraConfig)
    projector_hidden: int = doc("hidden width of the vision->LM MLP projector (0 = linear)", 0)
    proprio: bool = doc("encode the robot state into one token", True)
    action_head_hidden: int = doc("hidden width of the action-head MLP", 256)
    gripper_head: bool = doc("separate gripper head with BCE logits (gripper dims leave the regression)", True)
    init_from: str | None = doc(
        "a vla-ft checkpoint, export or run directory to start from (a second stage on other data): its "
        "weights, its LM architecture and its tokenizer; heads of other widths start fresh",
        None,
    )
    action_tokens_bins: int = doc("bins for discretised action tokens (data.language_target=action_tokens)", 256)


# ----------------------------------------------------------------------------- data
@dataclass
class SyntheticConfig:
    episodes: int = doc("number of synthetic episodes", 64)
    episode_length: int = doc("frames per episode", 32)
    image_size: int = doc("rendered image size (pixels)", 64)
    seed: int = doc("seed of the synthetic task (independent of train.seed)", 0)


@dataclass
class AugmentConfig:
    enabled: bool = doc("augment training images (never validation)", False)
    crop_scale: list[float] = doc("random resized crop area range", factory=lambda: [0.8, 1.0])
    color_jitter: float = doc("brightness/contrast/saturation jitter strength (0 = off)", 0.1)


@dataclass
class MixSourceConfig:
    path: str = doc("dataset location (directory or file)", "")
    weight: float | None = doc(
        "share of the training samples drawn from this source (relative to the others'); null on every "
        "source: each in proportion to its frames",
        None,
    )


@dataclass
class DataConfig:
    format: str = doc("dataset reader: synthetic | lerobot | hdf5 | rlds", "synthetic")
    path: str | None = doc("dataset location (directory or file; hdf5 robomimic: a file, or a directory of them)", None)
    mix: dict[str, MixSourceConfig] = doc(
        "several datasets of one robot (or robots sharing an action space: normalize_per_source) trained as one, "
        "by name (instead of data.path): same format, keys, fps",
        factory=dict,
    )
    layout: str = doc("hdf5 layout: robomimic | aloha", "robomimic")
    fps: float | None = doc(
        "control rate in Hz where the dataset records none (rlds: required; hdf5: overrides the file's)", None
    )
    cameras: list[str] = doc("camera feature names (empty: all cameras of the dataset)", factory=list)
    state_key: str = doc("state feature name", "observation.state")
    action_key: str = doc("action feature name", "action")
    text_key: str | None = doc("column with per-frame language targets (language_target=text)", None)
    chunk: int = doc("future actions predicted per sample", 8)
    history: int = doc("state frames per sample (1 = current only)", 1)
    val_ratio: float = doc("fraction of episodes held out for validation", 0.1)
    split_seed: int = doc(
        "seed of the episodes val_ratio holds out (not train.seed: every seed of a sweep validates on the same ones)",
        0,
    )
    val_episodes: list[int] = doc("explicit validation episode indices (overrides val_ratio)", factory=list)
    train_filter: str | None = doc("robomimic filter key (mask/<key>) to train on, e.g. 20_percent", None)
    val_filter: str | None = doc("robomimic filter key to validate on, e.g. valid (overrides val_ratio)", None)
    normalize: Literal["mean_std", "min_max", "q01_q99", "none"] = doc("normalisation of state and action", "mean_std")
    normalize_per_source: bool = doc(
        "a mixture (data.mix, a directory of robomimic files): each source normalised with its own training "
        "statistics (robots sharing an action space, not its ranges); a policy is told which source it drives",
        False,
    )
    raw_dims: list[int] | None = doc("action dims left raw (null: the gripper dims)", None)
    delta_action_dims: list[int] = doc(
        "action dims trained as offsets from the state at the sample's frame (openpi's delta actions; "
        "the policy adds the state back); e.g. an arm's joint targets, never its gripper",
        factory=list,
    )
    delta_state_dims: list[int] | None = doc(
        "the state dim each delta action dim is taken from, in order (null: the same index)", None
    )
    prompt_template: str = doc(
        "prompt; {instruction} is replaced by the task", "what should the robot do to {instruction} ?"
    )
    language_target: Literal["none", "text", "action_tokens"] = doc("what the LM is trained to say", "text")
    augment: AugmentConfig = doc("training-image augmentation", factory=AugmentConfig)
    num_workers: int = doc("DataLoader worker processes", 0)
    pin_memory: bool = doc("pinned host memory (CUDA only)", True)
    persistent_workers: bool = doc("keep workers alive between epochs", True)
    prefetch_factor: int = doc("batches prefetched per worker", 4)
    worker_start: Literal["auto", "fork", "forkserver", "spawn"] = doc(
        "how workers start: auto = forkserver for video datasets (a worker forked from a process "
        "that decoded video may hang), fork (cheapest) otherwise",
        "auto",
    )
    frame_cache: str | None = doc(
        "directory for a decoded-frame cache of video and RLDS datasets (RLDS: also the numbers read at open)", None
    )
    skip_bad_episodes: bool = doc("skip episodes that fail checks instead of refusing the dataset", False)
    video_tolerance_s: float = doc("timestamp tolerance when locating video frames", 1e-3)
    synthetic: SyntheticConfig = doc("the embedded synthetic task", factory=SyntheticConfig)


# ----------------------------------------------------------------------------- loss
@dataclass
class TermWeights:
    language: float = doc("weight of the language cross-entropy", 0.1)
    action: float = doc("weight of the continuous-action regression", 1.0)
    gripper: float = doc("weight of the gripper BCE", 0.5)


@dataclass
class ActionLossConfig:
    type: Literal["mse", "l1", "smooth_l1"] = doc("regression loss", "l1")
    beta: float = doc("smooth_l1 (Huber) transition point", 1.0)
    dim_weights: list[float] | None = doc("per-action-dimension weights", None)
    horizon_weights: list[float] | None = doc("per-chunk-step weights (near steps count more)", None)


@dataclass
class GripperLossConfig:
    dims: list[int] = doc("action dims holding the gripper command (never assumed)", factory=list)
    threshold: float = doc("raw gripper value above which the label is 'high'", 0.5)
    closed_is_high: bool = doc("true: high value = closed (label 1 = closed)", True)
    pos_weight: float | None = doc("BCE pos_weight for the 'closed' class", None)


@dataclass
class LanguageLossConfig:
    label_smoothing: float = doc("cross-entropy label smoothing", 0.0)


@dataclass
class ScheduledWeight:
    start_step: int = doc("step (0-based update, >= 0) where the ramp starts; the ramp must move before train.steps", 0)
    end_step: int = doc("step where the ramp ends", 1000)
    start: float = doc("weight at start_step", 0.0)
    end: float = doc("weight at end_step", 1.0)
    shape: Literal["linear", "cosine"] = doc("ramp shape", "linear")


@dataclass
class LossConfig:
    weights: TermWeights = doc("static term weights", factory=TermWeights)
    strategy: Literal["static", "scheduled", "uncertainty", "dwa"] = doc("weighting strategy", "static")
    schedule: dict[str, ScheduledWeight] = doc("per-term weight ramps (strategy=scheduled)", factory=dict)
    dwa_temperature: float = doc("DWA softmax temperature", 2.0)
    dwa_window: int = doc("steps averaged per DWA loss-ratio window", 50)
    action: ActionLossConfig = doc("action regression", factory=ActionLossConfig)
    gripper: GripperLossConfig = doc("gripper classification", factory=GripperLossConfig)
    language: LanguageLossConfig = doc("language cross-entropy", factory=LanguageLossConfig)
    grad_norm_every: int = doc(
        "log each term's gradient norm on the last trunk layer every N steps (0 = off; "
        "under DDP the mean of each rank's own norm, at least the global gradient's norm)",
        0,
    )


# ----------------------------------------------------------------------------- optimisation
@dataclass
class GroupConfig:
    lr: float | None = doc("learning rate of this module's group (null: optim.lr)", None)
    weight_decay: float | None = doc("weight decay of this module's group (null: optim.weight_decay)", None)


@dataclass
class OptimConfig:
    name: Literal["adamw", "adamw8bit", "adam", "sgd"] = doc(
        "optimizer; adamw8bit: AdamW with block-wise 8-bit moments (bitsandbytes), 2 instead of 8 bytes of state "
        "per trained weight",
        "adamw",
    )
    lr: float = doc("base learning rate", 3e-4)
    weight_decay: float = doc(
        "weight decay: decoupled for adamw(8bit), L2 in the gradient for adam, sgd (biases, norms, embeddings get 0)",
        0.01,
    )
    betas: list[float] = doc("Adam betas", factory=lambda: [0.9, 0.95])
    eps: float = doc("Adam epsilon", 1e-8)
    momentum: float = doc("SGD momentum", 0.9)
    groups: dict[str, GroupConfig] = doc("per-module overrides, keyed by module name", factory=dict)
    scheduler: Literal["cosine", "linear", "constant"] = doc("LR schedule after warmup", "cosine")
    warmup_steps: int = doc("linear warmup steps", 20)
    min_lr_ratio: float = doc(
        "LR at the end of the decay as a fraction of the peak (cosine/linear; the last update is one step short)", 0.1
    )
    grad_clip: float = doc("max global gradient norm (0 = off)", 1.0)
    accumulation: int = doc("micro-batches per optimizer step", 1)


@dataclass
class UnfreezeConfig:
    at_step: int = doc("optimizer step at which the module starts training", 0)
    warmup_steps: int = doc("LR warmup of the module after it is unfrozen", 0)


@dataclass
class FreezeConfig:
    vision_encoder: bool = doc("freeze the vision encoder", False)
    projector: bool = doc("freeze the projector", False)
    proprio_encoder: bool = doc("freeze the proprio encoder", False)
    film: bool = doc("freeze the FiLM projection (model.vision.film)", False)
    language_model: bool = doc("freeze the language model (with LoRA its adapters train regardless)", False)
    action_queries: bool = doc("freeze the learnable action query tokens", False)
    action_head: bool = doc("freeze the action head", False)
    gripper_head: bool = doc("freeze the gripper head", False)


@dataclass
class EarlyStoppingConfig:
    patience: int = doc("validations without improvement before stopping (0 = off)", 0)
    min_delta: float = doc("smallest change that counts as an improvement", 0.0)


@dataclass
class TrainConfig:
    steps: int = doc("optimizer steps", 400)
    batch_size: int = doc("samples per micro-batch per process", 32)
    seed: int = doc("seed of model init, shuffling, augmentation and dropout", 0)
    device: Literal["auto", "cpu", "cuda"] = doc("where to train", "auto")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = doc("auto: bf16 on CUDA, fp32 on CPU", "auto")
    param_dtype: Literal["auto", "fp32", "bf16"] = doc(
        "dtype of the weights the forward computes with; bf16: fp32 master copies in the optimizer, gradients "
        "accumulated in fp32 (needs precision bf16, one process). auto: bf16 whenever precision is bf16 on one "
        "process (FSDP applies its own bf16 policy), else fp32",
        "auto",
    )
    compile: bool = doc("torch.compile the training forward and the loss terms", False)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = doc(
        "torch.compile mode; reduce-overhead replays CUDA graphs (no per-kernel launch cost)", "default"
    )
    val_every: int = doc("validate every N steps (0 = only at the end)", 100)
    val_batches: int = doc(
        "validation batches, their samples spread evenly over the validation set (each source of a mixture gets "
        "its share); 0 = all. The sample count is the run's: a resume with another train.batch_size keeps it",
        0,
    )
    best_metric: str = doc("validation metric selecting the best checkpoint", "val/action_l1")
    best_mode: Literal["min", "max"] = doc("max for accuracies and F1, min for losses and errors (checked)", "min")
    early_stopping: EarlyStoppingConfig = doc("stop when best_metric stalls", factory=EarlyStoppingConfig)
    resume: bool = doc("continue from the newest complete checkpoint in output_dir", False)
    max_consecutive_skips: int = doc("halt after this many consecutive non-finite steps", 5)
    ema_decay: float = doc(
        "exponential moving average of the trained weights, e.g. 0.999 (0 = off): validation, the best "
        "checkpoint, eval, export and VLAPolicy use the average",
        0.0,
    )
    ema_warmup: bool = doc(
        "ramp the average's decay as min(ema_decay, (1 + t) / (10 + t)) at update t, so the initial weights "
        "fade within the first steps (false: ema_decay from the start, as openpi)",
        True,
    )
    cache_features: bool = doc("head-only runs: cache the frozen trunk's readout features", False)
    feature_cache_dir: str | None = doc("on-disk feature cache (null: in memory)", None)
    threads: int = doc("CPU threads for torch (0 = torch default)", 0)


@dataclass
class CheckpointConfig:
    every: int = doc("save every N steps (0 = only at the end)", 200)
    keep_last: int = doc("complete checkpoints kept (the best and the resumed-from are never deleted)", 3)
    save_optimizer: bool = doc("include optimizer state (needed to resume exactly)", True)


@dataclass
class WandbConfig:
    enabled: bool = doc(
        "also log every row to Weights & Biases (pip install 'vla-ft[wandb]'; WANDB_MODE=offline keeps the run "
        "under <output_dir>/wandb for `wandb sync`)",
        False,
    )
    project: str = doc("W&B project", "vla-ft")
    entity: str | None = doc("W&B team or user (null: the logged-in default)", None)
    name: str | None = doc("run name (null: the output_dir's name)", None)
    group: str | None = doc("run group, e.g. one per ablation", None)
    tags: list[str] = doc("run tags", factory=list)


@dataclass
class LoggingConfig:
    every: int = doc("log train metrics every N optimizer steps", 10)
    tensorboard: bool = doc("write TensorBoard event files under <output_dir>/tensorboard", True)
    wandb: WandbConfig = doc(
        "Weights & Biases (the same rows as metrics.jsonl, the recipe as its config)", factory=WandbConfig
    )
    progress: Literal["auto", "bar", "plain", "none"] = doc("tqdm bar on a TTY, plain lines otherwise", "auto")


@dataclass
class DistributedConfig:
    strategy: Literal["ddp", "fsdp"] = doc("data-parallel strategy under torchrun", "ddp")
    backend: Literal["auto", "nccl", "gloo"] = doc("process-group backend (auto: nccl on CUDA, gloo on CPU)", "auto")
    find_unused_parameters: bool = doc(
        "ddp: tolerate trainable parameters without a gradient in a step (a zero-weight term's head, an unused "
        "pooling head); false saves a graph walk per step when every trainable parameter is always used",
        True,
    )
    fsdp_reshard_after_forward: bool = doc(
        "fsdp: free gathered parameters after forward (less memory, one more all-gather in backward)", True
    )
    timeout_min: float = doc(
        "minutes a collective waits for the slowest rank before the run fails (ranks wait while rank 0 writes a "
        "checkpoint or builds the feature cache; torch's own default is 10 for nccl)",
        30.0,
    )


@dataclass
class RolloutConfig:
    episodes: int = doc(
        "closed-loop episodes run at every validation (0 = off): val/rollout/success_rate, val/rollout/mean_reward",
        0,
    )
    env: str | None = doc(
        "module:callable returning a gymnasium-style env (e.g. gymnasium:make); null: the synthetic task", None
    )
    env_kwargs: dict[str, Any] = doc("keyword arguments of the env factory", factory=dict)
    start: int | None = doc(
        "first reset seed (null: synthetic: the first scene past the training episodes; else 0)", None
    )
    execute: int | None = doc("actions sent per predicted chunk (null: half a chunk unless ensemble is set)", None)
    ensemble: float | None = doc("temporal ensembling with weights exp(-m i) instead of execute (ACT)", None)
    source: str | None = doc(
        "with data.normalize_per_source: the mixture source whose statistics the env's robot uses", None
    )
    max_steps: int = doc("env steps per episode at most", 80)
    batch: int = doc(
        "episodes run at once, one env each, their chunks predicted in one batch (1: one after another)", 8
    )
    env_processes: bool = doc(
        "each of the batch's envs in its own process, all stepping at once (simulators whose step is slow)", False
    )


@dataclass
class AblationConfig:
    variants: dict[str, dict[str, Any] | None] = doc(
        "variant name -> {key.sub: value} overrides (empty or null: the recipe as is)", factory=dict
    )
    metric: str = doc("metric compared in the bar chart", "val/action_l1")
    mode: Literal["min", "max"] = doc("whether lower or higher is better", "min")


@dataclass
class Recipe:
    output_dir: str = doc("run directory", "runs/quickstart")
    model: ModelConfig = doc("model assembly", factory=ModelConfig)
    data: DataConfig = doc("robot data", factory=DataConfig)
    loss: LossConfig = doc("composite loss", factory=LossConfig)
    optim: OptimConfig = doc("optimizer and schedule", factory=OptimConfig)
    freeze: FreezeConfig = doc("modules frozen from the start", factory=FreezeConfig)
    unfreeze: dict[str, UnfreezeConfig] = doc("staged unfreezing, keyed by module name", factory=dict)
    train: TrainConfig = doc("training loop", factory=TrainConfig)
    checkpoint: CheckpointConfig = doc("checkpointing", factory=CheckpointConfig)
    logging: LoggingConfig = doc("metrics, TensorBoard, progress", factory=LoggingConfig)
    rollout: RolloutConfig = doc(
        "closed-loop evaluation in an environment (vla-ft rollout, validation)", factory=RolloutConfig
    )
    distributed: DistributedConfig = doc("multi-process training", factory=DistributedConfig)
    ablation: AblationConfig = doc("variants run by `vla-ft ablate`", factory=AblationConfig)


# Groups of dotted keys that resume, eval and ablate reason about alike.
DATA_SOURCE = (
    "data.format",
    "data.path",
    "data.mix",
    "data.layout",
    "data.cameras",
    "data.state_key",
    "data.action_key",
)
"""Which dataset and which of its features: a resume may not change them; an eval may point elsewhere."""
DATA_SPLIT = (
    "data.val_ratio",
    "data.split_seed",
    "data.val_episodes",
    "data.train_filter",
    "data.val_filter",
    "data.skip_bad_episodes",
)
"""Which episodes train and which validate."""
LOADER_KEYS = (
    "data.num_workers",
    "data.pin_memory",
    "data.persistent_workers",
    "data.prefetch_factor",
    "data.worker_start",
)
"""How batches are loaded, never what they hold."""
