"""One LoRA-adapted linear of the reference LM, forward + backward: peft's forward vs vla-ft's fused
form (``vla_ft.lora_kernel``) vs a fused form without the concatenations, per layer shape.

    python benchmarks/lora_layer.py                 # CUDA, bf16, 64 x 245 tokens, r=32
    python benchmarks/lora_layer.py --smoke         # CPU, tiny: checks the script runs

Per row: median time of forward + backward (CUDA events, eager, no sync inside the loop: at 4x
the reference's tokens, ``--tokens 62720``, the GPU time exceeds the host's launch time), and GPU
kernels per forward + backward (profiler): the LoRA training step is host-bound (RESULTS.md,
eighth session), so launches matter as much as GPU time. No compile: the layer as it is.
"""

from __future__ import annotations

import argparse
import copy
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn

from vla_ft.lora_fused import fuse_lora_layers

SHAPES = {"q/o": (896, 896), "k/v": (896, 128), "gate/up": (896, 4864), "down": (4864, 896)}


class _NoCat(torch.autograd.Function):
    """The fused math with separate GEMMs: y = x W^T + h (sB)^T, dx = dy W + dh A (addmm)."""

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, scaling):  # noqa: ANN001, ANN205
        h = x @ lora_a.t()
        sb = lora_b * scaling
        ctx.save_for_backward(x, h, weight, lora_a, sb)
        ctx.scaling = scaling
        return torch.addmm(F.linear(x, weight), h, sb.t())

    @staticmethod
    def backward(ctx, dy):  # noqa: ANN001, ANN205
        x, h, weight, lora_a, sb = ctx.saved_tensors
        dh = dy @ sb
        dx = torch.addmm(dy @ weight, dh, lora_a)
        return dx, None, dh.t() @ x, (dy.t() @ h) * ctx.scaling, None


class NoCatLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.lora_a, self.lora_b = nn.Parameter(lora_a.detach().clone()), nn.Parameter(lora_b.detach().clone())
        self.scaling = scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _NoCat.apply(x, self.weight, self.lora_a, self.lora_b, self.scaling)


class Proj(nn.Module):
    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.proj = nn.Linear(n_in, n_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def variants(n_in: int, n_out: int, r: int, device: torch.device, dtype: torch.dtype) -> dict[str, Callable]:
    """name -> f(x): the same adapted layer (bf16 weights, non-zero adapters) three ways."""
    torch.manual_seed(0)
    peft_model = get_peft_model(Proj(n_in, n_out), LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"]))
    peft_model.to(device, dtype)
    layer = peft_model.base_model.model.proj
    nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
    w, a, b, s = layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight, 2.0
    fused_model = copy.deepcopy(peft_model)
    fuse_lora_layers(fused_model)
    return {"peft": peft_model, "fused": fused_model, "fused_nocat": NoCatLinear(w, a, b, s)}


def time_ms(f: nn.Module, x: torch.Tensor, dy: torch.Tensor, reps: int, warm: int = 5) -> float:
    """Median of CUDA-event intervals around forward + backward, the host free to run ahead (no
    sync inside the loop): GPU time where it exceeds the host's launch time (large --tokens)."""
    times = []
    for i in range(warm + reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        f(x).backward(dy)
        end.record()
        if i >= warm:
            times.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in times)


def launches(f: Callable, x: torch.Tensor, dy: torch.Tensor) -> int:
    """GPU kernels (memsets and copies included) of one forward + backward."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        f(x).backward(dy)
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=64 * 245)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    device, dtype = (torch.device("cuda"), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
    tokens, shapes = (args.tokens, SHAPES) if cuda else (64, {k: (n // 64, m // 64) for k, (n, m) in SHAPES.items()})
    print(f"{'layer':8} {'in->out':>11} {'variant':12} {'fwd+bwd ms':>10} {'kernels':>8}")
    for name, (n_in, n_out) in shapes.items():
        fs = variants(n_in, n_out, args.rank if cuda else 4, device, dtype)
        x = torch.randn(tokens, n_in, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(tokens, n_out, device=device, dtype=dtype)
        want = fs["peft"](x)
        for v in ("fused", "fused_nocat"):  # every variant computes peft's numbers
            torch.testing.assert_close(fs[v](x), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
        for v in ("peft", "fused", "fused_nocat"):
            ms, n = (time_ms(fs[v], x, dy, args.reps), launches(fs[v], x, dy)) if cuda else (float("nan"), -1)
            print(f"{name:8} {f'{n_in}->{n_out}':>11} {v:12} {ms:10.3f} {n:8d}", flush=True)


if __name__ == "__main__":
    main()
