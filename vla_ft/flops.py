"""Model FLOPs of a training step, counted honestly, and MFU (logged as ``perf/tflops``, ``perf/mfu``).

What counts (per matmul weight of N elements, per token that goes through it):

    forward                                    2N   always
    weight gradient                            2N   when the weight trains
    input gradient                             2N   when the gradient has to flow through the layer

so a trained layer costs 6N, a frozen layer with no gradient through it (a frozen vision
encoder under ``no_grad``) 2N, and a frozen layer the gradient passes through (a LoRA base,
a frozen LM below a trained head) 4N. The first layer of a trained module whose input needs
no gradient (the patch embedding, a head's first Linear on a frozen readout) costs 4N: autograd
skips that input gradient, so counting it would flatter the MFU.

Which layers run, on how many rows, and which tensors carry gradients is read off one eager
forward on one sample (hooks on every Linear/Conv, removed after), so a module that exists but
never runs (the SigLIP attention-pool head when patch tokens are used) counts nothing.
Attention adds ``4 * heads * head_dim`` per (query, key) pair and layer (QK^T and AV), x3 when
the gradient flows through it (the backward's two products per forward product; the kernels'
recomputation of QK^T is hardware work, not model work): the LM's pairs are causal over
non-padding tokens only (``n (n + 1) / 2`` per row), a ViT's pairs are all token pairs.
Embedding lookups, norms, activations, softmax and the loss are not counted (no matmul), nor
is activation recomputation (gradient checkpointing): this is model FLOPs, not hardware FLOPs.
DoRA's work on each adapted weight (peft builds B A from an identity matrix each forward, and its row
norms) is not counted either: it is per forward, not per token.
Padding is never counted: LM rows count their non-padding tokens, the LM head its supervised
tokens.

MFU = achieved model FLOP/s / the GPU's dense bf16 peak (:data:`PEAK_BF16_TFLOPS`), also for
fp32 runs; on a CPU or an unknown GPU only ``perf/tflops`` is logged.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from vla_ft.lora_kernel import peft_forward
from vla_ft.tracking import TrainWindow

if TYPE_CHECKING:
    from vla_ft.model import VLA
    from vla_ft.run_setup import Run

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, matched in order as substrings of
# torch.cuda.get_device_name(): specific variants before the family name.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),  # SXM5 (reports as "NVIDIA H100 80GB HBM3")
    ("GH200", 989.4),
    ("H200", 989.4),
    ("H800", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L4", 121.0),
    ("RTX 4090", 165.2),
)

AttentionCount = Literal["causal", "dense"]
PER_IMAGE = ("vision_encoder", "projector")
PER_SAMPLE = ("proprio_encoder", "film")
PER_QUERY = ("action_head", "gripper_head")


def peak_tflops(device: torch.device | str) -> float | None:
    """Dense bf16 peak of ``device`` in TFLOP/s; None on a CPU or a GPU not in the table."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


# ----------------------------------------------------------------------------- what one forward runs
@dataclass
class LayerUse:
    """One matmul layer as seen in a forward: ``rows`` x ``numel`` multiply-adds."""

    owner: str  # named child of the VLA (vision_encoder, language_model, ...)
    numel: int  # weight elements (out * in [* kernel]): the N of 2N
    rows: int  # rows of the matmul in that forward (tokens, or output positions of a conv)
    weight_grad: bool
    input_grad: bool
    is_lm_head: bool = False

    @property
    def flops(self) -> int:
        """Forward + backward FLOPs of this layer in that forward."""
        return 2 * self.rows * self.numel * (1 + int(self.weight_grad) + int(self.input_grad))


@dataclass
class AttentionUse:
    """A ViT attention block as seen in a forward: (batch, tokens) and whether backward runs."""

    batch: int
    tokens: int
    width: int  # heads * head_dim
    grad: bool


@dataclass
class Recording:
    layers: list[LayerUse] = field(default_factory=list)
    vision_attention: list[AttentionUse] = field(default_factory=list)
    lm_grad: bool = False  # whether the LM's attention outputs carry a gradient
    paused: int = 0  # > 0 inside work done once per forward, not per row (DoRA's B A)


def _owners(model: VLA) -> Iterator[tuple[str, nn.Module]]:
    yield from model.named_modules_of_interest().items()


@contextlib.contextmanager
def record_forward(model: VLA) -> Iterator[Recording]:
    """Hooks every Linear/Conv (and every ViT attention block) for the forwards inside the block.

    Compiled code does not run module hooks, so the block runs eagerly (``force_eager``).
    """
    rec = Recording()
    handles = []
    lm_head = model.lm_head
    called: set[int] = set()  # layers run since the current ViT attention block began

    def on_layer(owner: str):
        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
            called.add(id(module))
            if rec.paused:
                return
            x, w = args[0], module.weight
            linear = isinstance(module, nn.Linear)
            rows = x.numel() // module.in_features if linear else output[0, 0].numel() * len(x)
            numel = module.in_features * module.out_features if linear else w.numel()  # 4-bit weights: packed
            rec.layers.append(LayerUse(owner, numel, rows, w.requires_grad, x.requires_grad, module is lm_head))
            if owner == "language_model" and module is not lm_head:
                rec.lm_grad = rec.lm_grad or output.requires_grad

        return hook

    def before_attention(module: nn.Module, args: tuple[Any, ...]) -> None:
        called.clear()

    def on_attention(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        x, qkv = args[0], module.qkv
        b, n = x.shape[:2]
        if id(qkv) not in called and not rec.paused:  # BEiT, EVA: F.linear(x, self.qkv.weight, ...)
            rows = x.numel() // qkv.in_features
            numel = qkv.in_features * qkv.out_features
            rec.layers.append(LayerUse("vision_encoder", numel, rows, qkv.weight.requires_grad, x.requires_grad, False))
        width = qkv.out_features // 3  # q, k and v: heads x head size each (BEiT and Swin keep no head_dim)
        rec.vision_attention.append(AttentionUse(b, n, width, output.requires_grad))

    for owner, module in _owners(model):
        for sub in module.modules():
            if isinstance(sub, (nn.Linear, nn.modules.conv._ConvNd)):
                handles.append(sub.register_forward_hook(on_layer(owner)))
            elif owner == "vision_encoder" and _is_vit_attention(sub):
                handles.append(sub.register_forward_pre_hook(before_attention))
                handles.append(sub.register_forward_hook(on_attention))
    try:
        with torch.compiler.set_stance("force_eager"), peft_forward(), _dora_weight_unrecorded(rec):
            yield rec  # (peft's forward: fused LoRA calls no sub-layer)
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _dora_weight_unrecorded(rec: Recording) -> Iterator[None]:
    """DoRA (peft) builds each adapted layer's B A every forward by running its adapters on an
    identity matrix: work per forward, not per row of the batch, so the hooks must not take those
    calls for rows (they would scale with the batch's tokens; see the module docstring)."""
    dora = sys.modules.get("peft.tuners.lora.dora")  # loaded with peft, which a DoRA model needs
    layer = getattr(dora, "DoraLinearLayer", None)
    if layer is None:
        yield
        return
    original = layer.get_lora_weight

    def unrecorded(self: Any, *args: Any, **kwargs: Any) -> Tensor:
        rec.paused += 1
        try:
            return original(self, *args, **kwargs)
        finally:
            rec.paused -= 1

    layer.get_lora_weight = unrecorded
    try:
        yield
    finally:
        layer.get_lora_weight = original


def _is_vit_attention(module: nn.Module) -> bool:
    # timm's self-attention blocks (one qkv linear over all tokens, or a window's); attention pooling
    # heads (q/kv) are skipped.
    return isinstance(getattr(module, "qkv", None), nn.Linear) and hasattr(module, "num_heads")


# ----------------------------------------------------------------------------- FLOPs of a batch
@dataclass
class StepFlops:
    """Per-unit FLOP coefficients of a model in one trainability state (fwd + bwd).

    Units: an image (vision encoder, projector), a sample (proprio encoder, FiLM), an LM token
    (non-padding), a supervised token (LM head), a query token (heads), and a causal
    (query, key) pair of the LM.
    """

    per_image: float = 0.0
    per_sample: float = 0.0
    per_lm_token: float = 0.0
    per_supervised: float = 0.0
    per_query: float = 0.0
    per_lm_pair: float = 0.0
    prefix_tokens: int = 0  # LM tokens per sample before the prompt (vision + state)
    chunk: int = 0

    def count(
        self, batch: dict[str, Tensor], want_text: bool, attention: AttentionCount = "causal"
    ) -> dict[str, Tensor]:
        """FLOPs of one forward + backward on ``batch``, by part, as 0-dim device tensors (no host sync).

        ``attention="dense"`` counts every (query, key) pair of the LM, as attention kernels and
        ``FlopCounterMode`` do; the default counts the causal half, the work that is needed.
        """
        actions = batch["actions"]
        b = actions.shape[0]

        def scalar(value: float) -> Tensor:  # a fill kernel: new_tensor would be a blocking host-to-device copy
            return torch.full((), value, dtype=torch.float64, device=actions.device)

        out = {"heads": scalar(b * self.chunk * self.per_query)}
        if "readout" in batch:  # cached trunk features: only the heads run
            return out
        images = batch["images"].shape[0] * batch["images"].shape[1]
        prompt = batch["prompt_mask"].sum(1, dtype=torch.float64)
        target = batch["target_mask"].sum(1, dtype=torch.float64) if want_text else torch.zeros_like(prompt)
        rows = prompt + target + (self.prefix_tokens + self.chunk)  # (B,) non-padding LM tokens per row
        pairs = rows * (rows + 1) / 2 if attention == "causal" else rows * rows
        out["vision"] = scalar(images * self.per_image)
        out["per_sample"] = scalar(b * self.per_sample)
        out["language_model"] = rows.sum() * self.per_lm_token + target.sum() * self.per_supervised
        out["lm_attention"] = pairs.sum() * self.per_lm_pair
        return out

    def total(self, batch: dict[str, Tensor], want_text: bool, attention: AttentionCount = "causal") -> Tensor:
        """The sum of :meth:`count`: a 0-dim float64 device tensor."""
        return torch.stack(list(self.count(batch, want_text, attention).values())).sum()


def want_text(model: VLA, batch: dict[str, Tensor]) -> bool:
    """Whether the trunk appends the language target (``VLA.appends_target``)."""
    return model.appends_target(batch)


def step_flops(model: VLA, rec: Recording, batch: dict[str, Tensor]) -> StepFlops:
    """Coefficients from a recorded forward on ``batch`` (the rows it ran), for any later batch."""
    b = batch["actions"].shape[0]
    sf = StepFlops(chunk=model.chunk)
    sums: dict[str, float] = {}
    lm_rows = 0
    for layer in rec.layers:
        key = "lm_head" if layer.is_lm_head else layer.owner
        sums[key] = sums.get(key, 0.0) + layer.flops
        if layer.owner == "language_model" and not layer.is_lm_head:
            lm_rows = max(lm_rows, layer.rows)  # decoder layers see every position (B * L)
    if "readout" not in batch:
        images = batch["images"].shape[0] * batch["images"].shape[1]
        vit = sum(4 * a.batch * a.tokens**2 * a.width * (3 if a.grad else 1) for a in rec.vision_attention)
        sf.per_image = (sum(sums.get(k, 0.0) for k in PER_IMAGE) + vit) / images
        sf.per_sample = sum(sums.get(k, 0.0) for k in PER_SAMPLE) / b
        lp, lt = batch["prompt_ids"].shape[1], batch["target_ids"].shape[1] if want_text(model, batch) else 0
        sf.per_lm_token = sums.get("language_model", 0.0) / max(lm_rows, 1)
        sf.per_supervised = sums.get("lm_head", 0.0) / max(b * lt, 1)
        sf.prefix_tokens = lm_rows // b - lp - lt - model.chunk if lm_rows else 0
        sf.per_lm_pair = _lm_pair_flops(model) * (3 if rec.lm_grad else 1)
    sf.per_query = sum(sums.get(k, 0.0) for k in PER_QUERY) / (b * model.chunk)
    return sf


def _lm_pair_flops(model: VLA) -> int:
    """Forward FLOPs of one (query, key) pair over all LM layers: QK^T and AV, 2 * width each."""
    cfg = model.language_model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 4 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim


def measure_step_flops(model: VLA, batch: dict[str, Tensor]) -> StepFlops:
    """Run one eager forward on ``batch`` (no backward) and return its coefficients (benchmarks, tests)."""
    with record_forward(model) as rec:
        model(batch)
    return step_flops(model, rec, batch)


# ----------------------------------------------------------------------------- logging during training
class FlopMeter:
    """Counts the model FLOPs of every training forward, without a host sync inside the step.

    A forward pre-hook on the model adds the batch's FLOPs to a device tensor. The coefficients
    come from recording an eager forward on one sample of the batch (in eval mode, with the RNG
    state restored: it changes nothing the run sees) at the first training forward and whenever
    what trains changes (staged unfreeze). Evaluation forwards (eval mode) are not counted.
    FLOPs are this process's own: ``perf/tflops`` and ``perf/mfu`` are per GPU. They add up in
    ``window`` (the run's :class:`~vla_ft.tracking.TrainWindow`), which a checkpoint saves with the
    samples and seconds they go with: after a resume the first row's TFLOP/s is not diluted.
    """

    def __init__(
        self, model: VLA, peak: float | None, attention: AttentionCount = "causal", window: TrainWindow | None = None
    ):
        self.model, self.peak, self.attention = model, peak, attention
        self.window = window if window is not None else TrainWindow()
        self.coeffs: StepFlops | None = None
        self._key: tuple | None = None
        # prepend: the recording forward runs before a wrapper's own pre-forward hooks (FSDP2)
        self._handle = model.register_forward_pre_hook(self._before, prepend=True)

    def _state_key(self, batch: dict[str, Tensor]) -> tuple:
        # The coefficients change with what trains and with what the forward computes. The
        # model's cached trainable set changes only through set_frozen (no per-step parameter walk).
        return frozenset(self.model.trainable_modules), want_text(self.model, batch), "readout" in batch

    def _before(self, model: nn.Module, args: tuple[Any, ...]) -> None:
        if not model.training:  # evaluation, and the recording forward below
            return
        batch = args[0]
        key = self._state_key(batch)
        if key != self._key:
            self.coeffs, self._key = self._record(batch), key
        flops = self.coeffs.total(batch, key[1], self.attention)
        self.window.flops = flops if self.window.flops is None else self.window.flops + flops

    def _record(self, batch: dict[str, Tensor]) -> StepFlops:
        one = {k: v[:1] for k, v in batch.items()}
        devices = [batch["actions"].device] if batch["actions"].is_cuda else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), record_forward(self.model) as rec:
            self.model.eval()
            try:
                self.model(one)
            finally:
                self.model.train()  # VLA.train keeps frozen modules in eval
        return step_flops(self.model, rec, one)

    def metrics(self, elapsed: float) -> dict[str, float]:
        """``perf/tflops`` (and ``perf/mfu`` where the peak is known) over the ``elapsed`` s since the last call."""
        if self.window.flops is None:
            return {}
        tflops = float(self.window.flops) / max(elapsed, 1e-9) / 1e12  # the log interval's one sync
        self.window.flops = None
        out = {"perf/tflops": tflops}
        if self.peak:
            out["perf/mfu"] = tflops / self.peak
        return out

    def remove(self) -> None:
        self._handle.remove()


def install_meter(run: Run) -> None:
    """Extension installer: log ``perf/tflops`` and ``perf/mfu`` with the train metrics."""
    meter = FlopMeter(run.model, peak_tflops(run.rt.device), window=run.window)
    previous = run.hooks.perf_metrics

    def perf_metrics(run: Run, samples: int, elapsed: float) -> dict[str, float]:
        out = previous(run, samples, elapsed) if previous is not None else {}
        return {**out, **meter.metrics(elapsed)}

    run.hooks.perf_metrics = perf_metrics
    run.hooks.flop_meter = meter
