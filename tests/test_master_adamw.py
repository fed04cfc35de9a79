"""``MasterAdamW``: the one-pass AdamW over fp32 masters (bf16 gradients in, bf16 weights out)
against torch's own AdamW stepping fp32 copies of the masters on the fp32 sums of the same
gradients. On a GPU the Triton kernels run compiled; on CPU through Triton's interpreter (a
subprocess, since ``TRITON_INTERPRET`` must be set before the kernels are defined)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SHAPES = [(3, 5), (9000,), (7,), (2, 8200), (33, 17)]  # odd sizes, one tensor > 2 chunks


def check(device: str) -> None:
    from vla_ft.master_adamw import MasterAdamW

    exact = device == "cuda"  # the interpreter rounds fp32 -> bf16 by truncation, the GPU to nearest
    g = torch.Generator().manual_seed(0)
    masters = [torch.nn.Parameter(torch.randn(s, generator=g).to(device)) for s in SHAPES]
    weights = [torch.nn.Parameter(m.detach().bfloat16()) for m in masters[:-1]]  # the last is its own weight
    weight_of = {id(m): w for m, w in zip(masters, weights, strict=False)}
    copies = [torch.nn.Parameter(m.detach().clone()) for m in masters]

    def groups(ps):
        return [{"params": ps[:2], "weight_decay": 0.1}, {"params": ps[2:], "weight_decay": 0.0, "lr": 3e-3}]

    opt = MasterAdamW(groups(masters), lambda p: weight_of.get(id(p)), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    ref = torch.optim.AdamW(groups(copies), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    # step 1 plain; 2 clipped (grad_scale); 3 skipped on the device (found_inf); 4 with two
    # masters holding accumulated fp32 gradients (earlier micro-batches) next to bf16 ones
    for step, (scale, inf) in enumerate([(None, 0.0), (2.5, 0.0), (None, 1.0), (1.5, 0.0)], 1):
        grads = [torch.randn(s, generator=g).to(device) for s in SHAPES]
        for i, (m, grad) in enumerate(zip(masters, grads, strict=True)):
            if i == len(weights) or (step == 4 and i in (1, 3)):
                m.grad = grad.bfloat16().float() if i < len(weights) else grad
            else:
                weights[i].grad = grad.bfloat16()
        exact_grads = [m.grad if m.grad is not None else weight_of[id(m)].grad.float() for m in masters]
        norm = opt.grad_norm()
        want = torch.linalg.vector_norm(torch.cat([x.flatten() for x in exact_grads]).double())
        torch.testing.assert_close(norm.double(), want, rtol=1e-6, atol=0)
        opt.grad_scale = torch.tensor(scale, device=device) if scale else None
        opt.found_inf = torch.tensor(inf, device=device)
        before = [m.detach().clone() for m in masters]
        opt.step()
        assert all(w.grad is None for w in weights)  # the bf16 gradients were read and freed
        if inf:
            assert all(torch.equal(m, b) for m, b in zip(masters, before, strict=True))
        else:
            for c, grad in zip(copies, exact_grads, strict=True):
                c.grad = grad / (scale or 1.0)
            ref.step()
        for m in masters:
            m.grad = None
        for m, c in zip(masters, copies, strict=True):
            torch.testing.assert_close(m.detach(), c.detach(), rtol=2e-6, atol=1e-7)
        for m, w in zip(masters, weights, strict=False):
            bf16 = m.detach().bfloat16()
            if exact:
                assert torch.equal(w.detach(), bf16)
            else:
                torch.testing.assert_close(w.detach().float(), bf16.float(), rtol=1 / 64, atol=0)
    assert all(opt.state[m]["step"].item() == 3 for m in masters)  # the skipped step does not count
    for m, c in zip(masters, copies, strict=True):  # same state: checkpoints move between the two
        torch.testing.assert_close(opt.state[m]["exp_avg"], ref.state[c]["exp_avg"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.state[m]["exp_avg_sq"], ref.state[c]["exp_avg_sq"], rtol=1e-5, atol=1e-6)
    fused = torch.optim.AdamW(groups(masters), lr=1e-2, fused=True)
    fused.load_state_dict(opt.state_dict())
    assert fused.state[masters[0]]["step"].device == masters[0].device

    # late steps, where beta**step underflows in fp32 (0.9**step from step ~830): same update
    for count in (2_000, 100_000):
        for state in [*opt.state.values(), *ref.state.values()]:
            state["step"].fill_(count)
        grads = [torch.randn(s, generator=g).to(device) for s in SHAPES]
        for m, c, grad in zip(masters, copies, grads, strict=True):
            w = weight_of.get(id(m))
            (w if w is not None else m).grad = grad.bfloat16() if w is not None else grad
            c.grad = grad.bfloat16().float() if w is not None else grad
        opt.grad_scale = opt.found_inf = None
        opt.step()
        ref.step()
        for m, c in zip(masters, copies, strict=True):
            m.grad = None
            assert torch.isfinite(m).all()
            torch.testing.assert_close(m.detach(), c.detach(), rtol=2e-6, atol=1e-7)

    # a state saved by a non-fused AdamW (step counts on the CPU) resumes on the masters' device
    resumed = MasterAdamW(groups(masters), lambda p: weight_of.get(id(p)), lr=1e-2, betas=(0.9, 0.95))
    resumed.load_state_dict(ref.state_dict())
    assert all(s["step"].device == m.device and s["step"].dtype == torch.float32 for m, s in resumed.state.items())

    # beta1 = 0 (no momentum) is valid AdamW
    p0 = torch.nn.Parameter(torch.randn(100, generator=g).to(device))
    c0 = torch.nn.Parameter(p0.detach().clone())
    no_momentum = MasterAdamW([p0], lambda p: None, lr=1e-2, betas=(0.0, 0.99))
    ref0 = torch.optim.AdamW([c0], lr=1e-2, betas=(0.0, 0.99))
    for _ in range(2):
        p0.grad = torch.randn(100, generator=g).to(device)
        c0.grad = p0.grad.clone()
        no_momentum.step()
        ref0.step()
    torch.testing.assert_close(p0.detach(), c0.detach(), rtol=2e-6, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_master_adamw_equals_torch_adamw_on_gpu():
    check("cuda")


def test_master_adamw_equals_torch_adamw_in_the_triton_interpreter():
    pytest.importorskip("triton")
    root = str(Path(__file__).parents[1])  # vla_ft importable without an install
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
    }
    code = "from test_master_adamw import check; check('cpu')"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=Path(__file__).parent, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
