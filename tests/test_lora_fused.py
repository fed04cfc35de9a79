"""Fused LoRA (vla_ft.lora_kernel / lora_fused) against peft's own forward and backward: the same
outputs and gradients in float64 for both GEMM layouts, under bf16 autocast and torch.compile, and
peft's path wherever the fused form does not apply."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_lora import DIMS, _lora_model, _perturb_adapters
from tiny_models import fake_batch
from torch import nn

from vla_ft import lora_fused
from vla_ft.lora_fused import FusedLoraLinear, fuse_lora_layers
from vla_ft.lora_kernel import peft_forward
from vla_ft.losses import CompositeLoss


class Proj(nn.Module):
    def __init__(self, n_in: int, n_out: int, bias: bool):
        super().__init__()
        self.proj = nn.Linear(n_in, n_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def peft_and_fused(n_in: int, n_out: int, bias: bool = True, dtype=torch.float64, **lora):
    """Two identical peft models of one Linear (adapters non-zero); the second one fused."""
    torch.manual_seed(0)
    cfg = LoraConfig(r=lora.pop("r", 3), lora_alpha=lora.pop("alpha", 6), target_modules=["proj"], **lora)
    reference = get_peft_model(Proj(n_in, n_out, bias).to(dtype), cfg)
    _perturb_adapters(reference)
    fused = copy.deepcopy(reference)
    assert fuse_lora_layers(fused) == 1 and isinstance(fused.base_model.model.proj, FusedLoraLinear)
    return reference, fused


def forward_backward(model: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> dict[str, torch.Tensor]:
    """Output and every gradient autograd gives (x's, the adapters', a trained bias's)."""
    x = x.detach().clone().requires_grad_(x.requires_grad)
    y = model(x)
    y.backward(dy)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return {"y": y.detach(), **grads, **({"x": x.grad} if x.requires_grad else {})}


@pytest.mark.parametrize(("n_in", "n_out"), [(8, 20), (20, 8)], ids=["widening", "narrowing"])
@pytest.mark.parametrize("bias", ["trained", "frozen", "none"])
@pytest.mark.parametrize("x_grad", [True, False], ids=["x_grad", "no_x_grad"])
def test_fused_forward_and_gradients_equal_peft_in_float64(n_in, n_out, bias, x_grad):
    reference, fused = peft_and_fused(n_in, n_out, bias=bias != "none")
    for m in (reference, fused):
        if bias == "trained":
            m.base_model.model.proj.base_layer.bias.requires_grad_(True)
    x = torch.randn(2, 5, n_in, dtype=torch.float64, requires_grad=x_grad)
    dy = torch.randn(2, 5, n_out, dtype=torch.float64)
    want, got = forward_backward(reference, x, dy), forward_backward(fused, x, dy)
    assert got.keys() == want.keys()
    assert ("x" in got) == x_grad and any("lora_A" in k for k in got) and any("lora_B" in k for k in got)
    assert any("bias" in k for k in got) == (bias == "trained")  # the frozen weight gets no gradient
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=1e-12, msg=k)


def test_bf16_autocast_gives_peft_numbers_in_bf16():
    reference, fused = peft_and_fused(16, 48, dtype=torch.float32)
    x, dy = torch.randn(4, 16), torch.randn(4, 48, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = forward_backward(reference, x.requires_grad_(), dy), forward_backward(fused, x, dy)
    assert got["y"].dtype == want["y"].dtype == torch.bfloat16
    for k in want:  # bf16 operands, different summation order: bf16 resolution
        assert got[k].dtype == want[k].dtype, k
        torch.testing.assert_close(got[k], want[k], rtol=2e-2, atol=2e-2, msg=k)


def test_compiled_fused_layer_is_one_graph_with_peft_gradients():
    reference, fused = peft_and_fused(8, 20)
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)  # fullgraph: no graph break
    x, dy = torch.randn(6, 8, dtype=torch.float64, requires_grad=True), torch.randn(6, 20, dtype=torch.float64)
    want = forward_backward(reference, x, dy)
    got = {k.removeprefix("_orig_mod."): v for k, v in forward_backward(compiled, x, dy).items()}
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=1e-12, msg=k)


def _no_fused_kernel(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the fused kernel ran where peft's forward applies")

    monkeypatch.setattr(lora_fused, "low_rank_linear", refuse)


@pytest.mark.parametrize(
    "case", ["dropout", "dora", "disabled", "merged", "peft_forward_block", "trained_base", "mixed_dtypes"]
)
def test_peft_forward_runs_where_the_fused_form_does_not_apply(monkeypatch, case):
    reference, fused = peft_and_fused(8, 20, lora_dropout=0.5 if case == "dropout" else 0.0, use_dora=case == "dora")
    _no_fused_kernel(monkeypatch)
    x = torch.randn(3, 8, dtype=torch.float32 if case == "mixed_dtypes" else torch.float64)
    for m in (reference, fused):
        if case == "merged":
            m.base_model.model.proj.merge()
        if case == "trained_base":
            m.base_model.model.proj.base_layer.weight.requires_grad_(True)
        if case == "mixed_dtypes":  # float64 adapters on a float32 layer, no autocast: peft casts
            m.base_model.model.proj.base_layer.float()
    torch.manual_seed(1)  # the same dropout mask for both
    if case == "disabled":
        with fused.disable_adapter(), reference.disable_adapter():
            got, want = fused(x), reference(x)
    elif case == "peft_forward_block":
        with peft_forward():
            got = fused(x)
        want = reference(x)
    else:
        got = fused(x)
        torch.manual_seed(1)
        want = reference(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_the_fused_kernel_runs_in_the_plain_case(monkeypatch):
    """The counterpart of the fallback test: without it a fused forward that always falls back passes."""
    _, fused = peft_and_fused(8, 20)
    _no_fused_kernel(monkeypatch)
    with pytest.raises(AssertionError, match="the fused kernel ran"):
        fused(torch.randn(3, 8, dtype=torch.float64))


def test_a_vla_trains_the_same_with_and_without_fusion(tmp_path):
    """model.lora.fused=false keeps peft's modules; both give one loss and one set of gradients."""
    results = []
    for fused in ("true", "false"):
        recipe, model = _lora_model(tmp_path, f"model.lora.fused={fused}", "model.lora.target_modules=[all-linear]")
        _perturb_adapters(model.language_model)
        layers = [m for m in model.language_model.modules() if hasattr(m, "lora_A")]
        assert layers and all((type(m) is FusedLoraLinear) == (fused == "true") for m in layers)
        loss_fn = CompositeLoss(recipe.loss, DIMS["action_dim"], recipe.data.chunk, recipe.model.gripper_head)
        batch = fake_batch(model)
        total, _ = loss_fn(model(batch), batch)
        total.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((total.detach(), grads))
    (loss_f, grads_f), (loss_p, grads_p) = results
    torch.testing.assert_close(loss_f, loss_p)
    assert grads_f.keys() == grads_p.keys() and any("lora_A" in n for n in grads_f)
    for n in grads_p:
        torch.testing.assert_close(grads_f[n], grads_p[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("n_in", "n_out"), [(256, 1024), (1024, 256)], ids=["widening", "narrowing"])
def test_inductor_on_cuda_with_bf16_weights_gives_peft_numbers(n_in, n_out):
    """What a bf16 LoRA run executes: bf16 base weights, fp32 adapters under autocast, inductor."""
    reference, fused = peft_and_fused(n_in, n_out, dtype=torch.float32, r=32, alpha=64)
    for m in (reference, fused):
        m.cuda().base_model.model.proj.base_layer.to(torch.bfloat16)
    compiled = torch.compile(fused, fullgraph=True)
    x = torch.randn(512, n_in, device="cuda", requires_grad=True)
    dy = torch.randn(512, n_out, device="cuda", dtype=torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = forward_backward(reference, x, dy)
        got = {k.removeprefix("_orig_mod."): v for k, v in forward_backward(compiled, x, dy).items()}
    assert got.keys() == want.keys()
    for k in want:  # bf16 products, summed in another order: compare at bf16 resolution of the values
        scale = want[k].abs().max().item()
        torch.testing.assert_close(got[k].float(), want[k].float(), rtol=0, atol=2e-2 * scale, msg=k)
