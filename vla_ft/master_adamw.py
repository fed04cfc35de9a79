"""AdamW on fp32 masters in one pass: bf16 gradient in, fp32 master and moments updated, bf16
weight out (``train.param_dtype: bf16`` on a GPU).

Why: with bf16 weights the stock path makes four passes over every trained parameter per
step: copy the bf16 gradient into an fp32 one (6 bytes per parameter), norm it (4), the fused
AdamW (28) and copy the master back into the bf16 weight (6): 44 bytes per parameter. Here the
norm reads the bf16 gradient (2) and one kernel does the rest (28): 30 bytes.

The update of ``torch.optim.AdamW(fused=True)`` (decoupled decay, bias corrections,
``grad_scale`` dividing the gradient, ``found_inf`` skipping the update on the device) in fp32
math, equal to torch's to ~1e-6 relative (not bitwise), and the same state (``step`` on the
device, ``exp_avg``, ``exp_avg_sq``), so checkpoints move freely between the two. A master
whose fp32 ``.grad`` exists (accumulated micro-batches, or a parameter that is not a model
weight, such as learned loss weights) is read from there.

Kernel layout (multi-tensor, like ``torch._foreach``): each tensor is cut into chunks of
``CHUNK`` elements; program ``i`` finds its tensor and first element in a chunk table (built
once per set of tensors) and the tensor's addresses in an address table (int64 ``data_ptr``
values, uploaded once per step: autograd allocates new gradients every backward). Nothing in
a step waits for the GPU, except building the chunk table when the set of tensors changes
(the first step, a freeze change).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None

CHUNK = 8192  # elements per program
BLOCK = 1024  # elements per inner iteration


def available(device: torch.device) -> bool:
    """Whether the one-pass step can run on ``device`` (a CUDA GPU with Triton)."""
    return triton is not None and device.type == "cuda"


if triton is not None:

    @triton.jit
    def _address(table, row, stride, t, dtype: tl.constexpr):
        """Tensor ``t``'s address in row ``row`` of the address table, as a ``dtype`` pointer."""
        return tl.load(table + row * stride + t).to(tl.pointer_type(dtype))

    @triton.jit
    def _one_minus_pow(log_beta, step):
        """1 - beta**step in fp32 without cancellation: Kahan's expm1, (u - 1) * x / ln(u), where
        u = beta**step is near 1 (beta near 1, early steps); plain 1 - u once u < 1/2, also after
        u underflows to 0 (beta 0.9 from step ~830), where Kahan's form would give 0."""
        x = step * log_beta
        u = tl.exp(x)
        kahan = tl.where(u == 1.0, -x, -(u - 1.0) * x / tl.log(u))
        return tl.where(u < 0.5, 1.0 - u, kahan)

    @triton.jit
    def _sumsq_kernel(
        chunks, table, stride, base, out, GRAD_BF16: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr
    ):
        """out[pid] = the sum of squares of chunk ``pid``'s gradient elements, in fp32."""
        pid = tl.program_id(0)
        t, start, n = tl.load(chunks + 3 * pid), tl.load(chunks + 3 * pid + 1), tl.load(chunks + 3 * pid + 2)
        g_ptr = _address(table, 0, stride, base + t, tl.bfloat16 if GRAD_BF16 else tl.float32)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for off in range(0, CHUNK, BLOCK):
            idx = start + off + tl.arange(0, BLOCK)
            g = tl.load(g_ptr + idx, mask=idx < n, other=0.0).to(tl.float32)
            acc += g * g
        tl.store(out + pid, tl.sum(acc, axis=0))

    @triton.jit
    def _adamw_kernel(
        chunks,
        table,
        stride,
        base,
        grad_scale,
        found_inf,
        lr,
        weight_decay,
        beta1,
        beta2,
        eps,
        log_beta1,
        log_beta2,
        GRAD_BF16: tl.constexpr,
        WRITE_WEIGHT: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        HAS_INF: tl.constexpr,
        CHUNK: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """One AdamW update of chunk ``pid`` (torch's fused formula, fp32 math); the step count
        was already advanced."""
        pid = tl.program_id(0)
        t, start, n = tl.load(chunks + 3 * pid), tl.load(chunks + 3 * pid + 1), tl.load(chunks + 3 * pid + 2)
        t = base + t
        if HAS_INF:  # a skipped step: every element masked, nothing read or written
            n = tl.where(tl.load(found_inf) == 0, n, 0)
        inv_scale = 1.0
        if HAS_SCALE:
            inv_scale = 1.0 / tl.load(grad_scale)
        step = tl.load(_address(table, 4, stride, t, tl.float32))
        step_size = lr / _one_minus_pow(log_beta1, step)
        bias2_sqrt = tl.sqrt(_one_minus_pow(log_beta2, step))
        decay = 1.0 - lr * weight_decay
        g_ptr = _address(table, 0, stride, t, tl.bfloat16 if GRAD_BF16 else tl.float32)
        p_ptr = _address(table, 1, stride, t, tl.float32)
        m_ptr = _address(table, 2, stride, t, tl.float32)
        v_ptr = _address(table, 3, stride, t, tl.float32)
        for off in range(0, CHUNK, BLOCK):
            idx = start + off + tl.arange(0, BLOCK)
            mask = idx < n
            g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32) * inv_scale
            p = tl.load(p_ptr + idx, mask=mask, other=0.0) * decay
            m = tl.load(m_ptr + idx, mask=mask, other=0.0)
            v = tl.load(v_ptr + idx, mask=mask, other=0.0)
            m = beta1 * m + (1.0 - beta1) * g
            v = beta2 * v + (1.0 - beta2) * g * g
            p = p - step_size * m / (tl.sqrt(v) / bias2_sqrt + eps)
            tl.store(p_ptr + idx, p, mask=mask)
            tl.store(m_ptr + idx, m, mask=mask)
            tl.store(v_ptr + idx, v, mask=mask)
            if WRITE_WEIGHT:
                w_ptr = _address(table, 5, stride, t, tl.bfloat16)
                tl.store(w_ptr + idx, p.to(tl.bfloat16), mask=mask)


@dataclass
class _Launch:
    """The tensors of one kernel launch: one param group, one gradient dtype, bf16 weights or none."""

    group: dict
    grad_bf16: bool
    write_weight: bool
    base: int = 0  # its first column in the address table
    masters: list[torch.Tensor] = field(default_factory=list)
    weights: list[torch.Tensor | None] = field(default_factory=list)
    steps: list[torch.Tensor] = field(default_factory=list)
    chunks: torch.Tensor | None = None  # (chunks, 3): tensor index, first element, numel


@dataclass
class _Layout:
    """Which gradient each master reads and what the kernels need besides the gradients'
    addresses: the same from step to step until a freeze change or accumulation changes it."""

    key: list[int]  # per master: 0 its fp32 .grad, 1 its bf16 weight's .grad, 2 none
    launches: list[_Launch]
    sources: list[torch.Tensor]  # per table column: the tensor whose .grad the kernel reads
    static: np.ndarray  # (5, columns) table rows 1-5: master, exp_avg, exp_avg_sq, step, weight addresses


@dataclass
class _Plan:
    """One step: the layout and the (6, columns) int64 address table on the device."""

    layout: _Layout
    table: torch.Tensor


def _chunk_table(sizes: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """(chunks, 3) int64: tensor index, first element, tensor numel for every chunk of ``CHUNK``."""
    numels = torch.tensor(sizes, dtype=torch.int64)
    counts = (numels + CHUNK - 1) // CHUNK
    first = torch.cumsum(counts, 0) - counts
    owner = torch.repeat_interleave(torch.arange(len(sizes)), counts)
    start = (torch.arange(int(counts.sum())) - first[owner]) * CHUNK
    return torch.stack([owner, start, numels[owner]], 1).contiguous().to(device)


class MasterAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW(fused=True)`` over fp32 masters that reads the bf16 weights'
    gradients and writes the bf16 weights in the same pass.

    ``weight_of(master)`` is the bf16 model weight of a master (None for a parameter that is
    its own weight). A master's gradient is its fp32 ``.grad`` if it has one, else its bf16
    weight's ``.grad``, which the step frees; a master with neither is skipped. ``grad_norm()``
    before ``step()`` (the trainer's clipping) reads the same gradients.
    """

    writes_weights = True  # MasterWeights needs no write-back hook

    def __init__(self, params, weight_of: Callable[[torch.Tensor], torch.Tensor | None], **kwargs):
        super().__init__(params, fused=True, **kwargs)
        for group in self.param_groups:
            if group["amsgrad"] or group["maximize"]:
                raise ValueError("MasterAdamW implements AdamW without amsgrad or maximize")
        self.weight_of = weight_of
        self._chunks: dict[tuple, torch.Tensor] = {}
        self._plan: _Plan | None = None
        self._pairs_cache: list[tuple[torch.Tensor, torch.Tensor | None]] | None = None
        self._layout: _Layout | None = None

    @torch.no_grad()
    def grad_norm(self) -> torch.Tensor:
        """The L2 norm of all gradients the next step reads (fp32, deterministic): what
        ``clip_grad_norm_`` returns over the masters' gradients."""
        plan = self.plan()
        parts = []
        for launch in plan.layout.launches:
            chunks = launch.chunks
            out = torch.empty(len(chunks), dtype=torch.float32, device=chunks.device)
            grid = (len(chunks),)
            stride = plan.table.shape[1]
            _sumsq_kernel[grid](chunks, plan.table, stride, launch.base, out, launch.grad_bf16, CHUNK, BLOCK)
            parts.append(out.sum())
        if not parts:
            return torch.zeros((), device=self.param_groups[0]["params"][0].device)
        return torch.stack(parts).sum().sqrt()

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MasterAdamW.step takes no closure")
        plan = self.plan()
        scale, inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        advance = None if inf is None else 1.0 - inf  # a skipped step does not count (as in torch's fused AdamW)
        for launch in plan.layout.launches:
            if advance is None:
                torch._foreach_add_(launch.steps, 1.0)
            else:  # a list of 0-dim tensors: the single-tensor overload would read it on the host
                torch._foreach_add_(launch.steps, [advance] * len(launch.steps))
            self._launch(plan, launch, scale, inf)
        self._plan = None
        self._free_bf16_grads()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Always sets gradients to None: a zeroed fp32 master gradient left in place would be
        read instead of the next step's bf16 one."""
        super().zero_grad(set_to_none=True)
        self._plan = None
        self._free_bf16_grads()

    def plan(self) -> _Plan:
        """This step's launches and address table. It runs on the host between the backward
        and the update, while the GPU waits, so per parameter it only reads the gradient's
        address; the layout is rebuilt only when which gradients exist changes. (A gradient
        has its parameter's layout, contiguous here: autograd's gradient layout contract.)"""
        if self._plan is not None:
            return self._plan
        pairs = self._pairs()
        key = [0 if m.grad is not None else 1 if w is not None and w.grad is not None else 2 for m, w in pairs]
        if self._layout is None or key != self._layout.key:
            self._layout = self._build_layout(key)
        layout = self._layout
        grads = [src.grad for src in layout.sources]
        device = self.param_groups[0]["params"][0].device
        table = torch.empty((6, len(grads)), dtype=torch.int64, pin_memory=device.type == "cuda")
        rows = table.numpy()
        rows[0] = [g.data_ptr() for g in grads]
        rows[1:] = layout.static
        self._plan = _Plan(layout, table.to(device, non_blocking=True))
        return self._plan

    def load_state_dict(self, state_dict: dict) -> None:
        """Also a state saved by torch's AdamW (a CPU run, or a non-fused one): step counts that come
        back on the CPU (torch does that for a non-fused group) move to the device the kernel reads."""
        super().load_state_dict(state_dict)
        for p, state in self.state.items():
            if "step" in state:
                state["step"] = state["step"].to(device=p.device, dtype=torch.float32)
        self._layout = None  # new state tensors, new addresses

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._pairs_cache = self._layout = None

    def _pairs(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(master, bf16 weight or None) for every parameter, group by group."""
        if self._pairs_cache is None:
            self._pairs_cache = [(p, self.weight_of(p)) for g in self.param_groups for p in g["params"]]
        return self._pairs_cache

    def _build_layout(self, key: list[int]) -> _Layout:
        launches, sources, static = [], [], [[] for _ in range(5)]
        pairs = iter(zip(self._pairs(), key, strict=True))
        for group in self.param_groups:
            by_kind: dict[tuple[bool, bool], _Launch] = {}
            for (p, w), source in itertools.islice(pairs, len(group["params"])):
                if source != 2:
                    kind = (source == 1, w is not None)
                    launch = by_kind.get(kind) or by_kind.setdefault(kind, _Launch(group, *kind))
                    launch.masters.append(p)
                    launch.weights.append(w)
                    launch.steps.append(self._state(p)["step"])
            for launch in by_kind.values():
                launch.base = len(sources)
                launch.chunks = self._chunks_for(launch.masters)
                for p, w in zip(launch.masters, launch.weights, strict=True):
                    state = self.state[p]
                    source = w if launch.grad_bf16 else p
                    tensors = (source.grad, p, state["exp_avg"], state["exp_avg_sq"], state["step"], w)
                    want = torch.bfloat16 if launch.grad_bf16 else torch.float32
                    if not all(x is None or x.is_contiguous() for x in tensors) or source.grad.dtype != want:
                        raise ValueError(
                            f"MasterAdamW needs contiguous tensors and {want} gradients here; "
                            f"a {tuple(p.shape)} parameter has {source.grad.dtype} or a strided one"
                        )
                    sources.append(source)
                    for row, x in zip(static, tensors[1:], strict=True):
                        row.append(0 if x is None else x.data_ptr())
                launches.append(launch)
        return _Layout(key, launches, sources, np.array(static, dtype=np.int64).reshape(5, -1))

    def _launch(self, plan: _Plan, launch: _Launch, scale: torch.Tensor | None, inf: torch.Tensor | None) -> None:
        group, chunks = launch.group, launch.chunks
        beta1, beta2 = group["betas"]
        _adamw_kernel[(len(chunks),)](
            chunks,
            plan.table,
            plan.table.shape[1],
            launch.base,
            scale if scale is not None else chunks,  # unused without HAS_SCALE
            inf if inf is not None else chunks,  # unused without HAS_INF
            float(group["lr"]),
            float(group["weight_decay"]),
            float(beta1),
            float(beta2),
            float(group["eps"]),
            math.log(beta1) if beta1 > 0 else -math.inf,  # beta 0: no momentum, 1 - 0**step = 1
            math.log(beta2) if beta2 > 0 else -math.inf,
            GRAD_BF16=launch.grad_bf16,
            WRITE_WEIGHT=launch.write_weight,
            HAS_SCALE=scale is not None,
            HAS_INF=inf is not None,
            CHUNK=CHUNK,
            BLOCK=BLOCK,
        )

    def _chunks_for(self, masters: list[torch.Tensor]) -> torch.Tensor:
        key = tuple(p.numel() for p in masters)
        if key not in self._chunks:  # a new set of tensors: the first step, or a freeze change
            self._chunks[key] = _chunk_table(key, masters[0].device)
        return self._chunks[key]

    def _free_bf16_grads(self) -> None:
        for _, w in self._pairs():
            if w is not None:
                w.grad = None

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:  # what torch's fused AdamW creates
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state
