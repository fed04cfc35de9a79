"""``train.param_dtype=bf16``: bf16 weights in the forward, fp32 masters in the optimizer.

The reference for one step is computed independently: bf16 gradients by ``autograd.grad`` on
the same bf16 model (which accumulates nothing and fires no hook), summed in fp32, clipped by
``clip_grad_norm_`` and applied by a separate non-fused ``torch.optim.AdamW`` to fp32 copies of
the masters.
"""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import pytest
import torch
from conftest import QUICKSTART, TINY
from safetensors.torch import load_file
from train_helpers import assert_same_weights, tiny_run, weights

from vla_ft import checkpoint as ck
from vla_ft.config import RecipeError, load_recipe
from vla_ft.data import to_device
from vla_ft.master_adamw import MasterAdamW
from vla_ft.report import parameter_rows
from vla_ft.run_setup import teardown
from vla_ft.runtime import init_runtime, resolve_param_dtype
from vla_ft.train import fit, prepare_update, term_shares, train_step

BF16 = [
    "train.device=cpu",  # torch's fused AdamW on the fp32 masters (MasterAdamW on CUDA: tests/test_speed_cuda.py)
    "train.precision=bf16",
    "train.param_dtype=bf16",
]


def bf16_run(run_dir: Path, *overrides: str):
    return tiny_run(run_dir, *BF16, *overrides)


def test_weights_are_bf16_and_only_trained_ones_have_masters(tmp_path):
    run = bf16_run(tmp_path / "run", "freeze.vision_encoder=true")
    masters = run.model.master_weights
    assert all(p.dtype == torch.bfloat16 for p in run.model.parameters())
    assert all(b.dtype != torch.bfloat16 for b in run.model.buffers() if b.is_floating_point())  # rotary, pixel stats
    vision = list(run.model.vision_encoder.parameters())
    assert all(masters.master(p) is p for p in vision)  # frozen for the whole run: bf16 only
    trained = [p for p in run.model.parameters() if p.requires_grad]
    assert trained and all(masters.master(p).dtype == torch.float32 for p in trained)
    in_optimizer = {id(p) for g in run.optimizer.param_groups for p in g["params"]}
    assert all(id(masters.master(p)) in in_optimizer for p in trained)
    rows = {r["module"]: r for r in parameter_rows(run.model, run.optimizer)}
    assert rows["action_head"]["lr"] != "-" and rows["vision_encoder"]["lr"] == "-"
    teardown(run)


GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@pytest.mark.parametrize("clip", [0.0, 0.05])
@pytest.mark.parametrize(
    ("device", "accumulation"),
    [("cpu", 2), pytest.param("cuda", 2, marks=GPU), pytest.param("cuda", 1, marks=GPU)],
)
def test_one_step_equals_fp32_accumulation_clip_and_adamw_on_the_masters(tmp_path, clip, device, accumulation):
    """The queued path, which clips as the update reads the gradients (grad_scale). CPU: torch's
    fused AdamW on the fp32 masters, then the write-back; GPU: MasterAdamW (bf16 gradients of the
    last micro-batch read by the kernel)."""
    n = accumulation
    run = bf16_run(tmp_path / "run", f"optim.accumulation={n}", f"optim.grad_clip={clip}", f"train.device={device}")
    masters = run.model.master_weights
    group = [to_device(b, run.rt.device) for b in itertools.islice(iter(run.train_loader), n)]
    prepare_update(run)
    run.model.train()
    run.loss_fn.train()

    params = [p for p in masters.params if p.requires_grad]
    grads = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    shares = term_shares(run, group)[0] if n > 1 else [None]  # the step's pooling (tested in test_train_loop)
    for batch, share in zip(group, shares, strict=True):
        with run.rt.autocast():
            total, _ = run.loss_fn(run.model(batch), batch, share)
        for acc, g in zip(grads, torch.autograd.grad(total / n, params, allow_unused=True), strict=True):
            if g is not None:
                assert g.dtype == torch.bfloat16
                acc += g.float()
    assert all(p.grad is None for p in params)  # autograd.grad left nothing behind

    reference = []
    for g in run.optimizer.param_groups:
        settings = {k: v for k, v in g.items() if k != "params"}
        reference.append({**settings, "params": [m.detach().clone().requires_grad_() for m in g["params"]]})
    copies = {
        id(m): c
        for g, r in zip(run.optimizer.param_groups, reference, strict=True)
        for m, c in zip(g["params"], r["params"], strict=True)
    }
    for p, grad in zip(params, grads, strict=True):
        copies[id(masters.master(p))].grad = grad
    ref_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))  # before clipping
    o = run.recipe.optim
    ref_opt = torch.optim.AdamW(reference, lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    unclipped = [copies[id(masters.master(p))].grad.clone() for p in params]
    if clip > 0:
        norm = torch.nn.utils.clip_grad_norm_([copies[id(masters.master(p))] for p in params], clip)
        assert norm > clip  # clipping is active
    expected_grads = [copies[id(masters.master(p))].grad.clone() for p in params]  # fp32 sums, clipped
    ref_opt.step()

    seen = []  # the gradients as the optimizer step receives them: fp32 masters' or, GPU and n=1, bf16 weights'
    run.optimizer.register_step_pre_hook(
        lambda *_: seen.extend((masters.master(p).grad if p.grad is None else p.grad).clone() for p in params)
    )
    result = train_step(run, group)
    assert result.applied
    torch.testing.assert_close(result.grad_norm, ref_norm.to(result.grad_norm.device))
    expected_grads = unclipped  # the update clips as it reads them (grad_scale)
    if device == "cuda":
        assert all(g.dtype == (torch.bfloat16 if n == 1 else torch.float32) for g in seen)
    for got, want in zip(seen, expected_grads, strict=True):  # fp32 accumulation: bf16 sums would be ~1e-3 off
        torch.testing.assert_close(got.float(), want, rtol=1e-6, atol=1e-9)
    for p in params:
        expected = copies[id(masters.master(p))].detach()
        torch.testing.assert_close(masters.master(p).detach(), expected, rtol=2e-6, atol=1e-7)
        assert torch.equal(p.detach(), masters.master(p).detach().to(torch.bfloat16))  # written back
    assert all(p.grad is None for p in run.model.parameters())
    teardown(run)


@pytest.mark.parametrize(
    ("device", "accumulation"),
    [("cpu", 2), pytest.param("cuda", 2, marks=GPU), pytest.param("cuda", 1, marks=GPU)],
)
def test_checkpoints_hold_the_fp32_masters_and_resume_exactly(tmp_path, device, accumulation):
    """CPU: bitwise. GPU (MasterAdamW, whose layout changes at the unfreeze and is rebuilt from
    the loaded state on resume): within 1e-5, since some CUDA backward kernels (embedding
    gradients) add in nondeterministic order; a resume that lost the moments or step counts
    moves weights by ~lr (1e-4), far outside that."""
    steps = [
        "train.steps=4",
        "checkpoint.every=2",
        "checkpoint.keep_last=0",
        "freeze.vision_encoder=true",
        "unfreeze.vision_encoder.at_step=1",
        f"optim.accumulation={accumulation}",
        f"train.device={device}",
    ]
    run = bf16_run(tmp_path / "straight", *steps)
    assert isinstance(run.optimizer, MasterAdamW) == (device == "cuda")
    fit(run)
    masters = run.model.master_weights
    saved = load_file(str(tmp_path / "straight" / "checkpoints" / ck.step_dir_name(4) / "model.safetensors"))
    params = dict(run.model.named_parameters(remove_duplicate=False))  # the tied LM head is saved once
    assert set(saved) <= set(params) and len(saved) >= len(dict(run.model.named_parameters()))
    for name, tensor in saved.items():
        master = masters.master(params[name])
        assert tensor.dtype == master.dtype == torch.float32, name  # every weight trains in this plan
        assert torch.equal(tensor, master.detach().cpu()), name
    vision = next(iter(run.model.vision_encoder.parameters()))
    assert not torch.equal(
        saved_at(tmp_path / "straight", 2, vision, run), saved_at(tmp_path / "straight", 4, vision, run)
    )
    teardown(run)

    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight", resumed)
    shutil.rmtree(resumed / "checkpoints" / ck.step_dir_name(4))
    ck.write_pointer(resumed / "checkpoints", "latest", ck.step_dir_name(2))
    run = bf16_run(resumed, *steps, "train.resume=true")
    assert run.state.step == 2
    fit(run)
    teardown(run)
    straight_4, resumed_4 = (d / "checkpoints" / ck.step_dir_name(4) for d in (tmp_path / "straight", resumed))
    if device == "cpu":
        assert_same_weights(straight_4, resumed_4)
    else:
        want, got = weights(straight_4), weights(resumed_4)
        assert want.keys() == got.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)


def saved_at(run_dir: Path, step: int, param: torch.Tensor, run) -> torch.Tensor:
    name = next(n for n, p in run.model.named_parameters() if p is param)
    return load_file(str(run_dir / "checkpoints" / ck.step_dir_name(step) / "model.safetensors"))[name]


def test_param_dtype_errors_name_the_key():
    recipe = load_recipe(QUICKSTART, [*TINY, "train.param_dtype=bf16", "train.precision=fp32"])
    with pytest.raises(RecipeError, match=r"train\.param_dtype: bf16 needs train\.precision bf16"):
        init_runtime(recipe)
    ddp = load_recipe(QUICKSTART, [*TINY, "train.param_dtype=bf16", "distributed.strategy=ddp"])
    with pytest.raises(RecipeError, match=r"train\.param_dtype: bf16 under DDP"):
        resolve_param_dtype(ddp, "bf16", world=2)
    fsdp = load_recipe(QUICKSTART, [*TINY, "train.param_dtype=bf16", "distributed.strategy=fsdp"])
    assert resolve_param_dtype(fsdp, "bf16", world=2) is None  # FSDP's own bf16 policy
    auto = load_recipe(QUICKSTART, TINY)
    assert resolve_param_dtype(auto, "bf16", world=1) is torch.bfloat16
    assert resolve_param_dtype(auto, "fp32", world=1) is None
    assert resolve_param_dtype(auto, "bf16", world=2) is None  # DDP by default: fp32 weights
    with pytest.raises(RecipeError, match="did you mean"):
        load_recipe(QUICKSTART, [*TINY, "train.param_dtyp=bf16"])
