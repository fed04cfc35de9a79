"""Parameter groups, the LR schedule, and freezing (what trains, in which mode, with or without autograd)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import QUICKSTART, TINY

from vla_ft import optim
from vla_ft.config import load_recipe
from vla_ft.losses import CompositeLoss
from vla_ft.run_setup import build_components, setup
from vla_ft.train import fit

STAGED = [
    *TINY,
    "freeze.vision_encoder=true",
    "unfreeze.vision_encoder.at_step=4",
    "unfreeze.vision_encoder.warmup_steps=3",
    "optim.groups.vision_encoder.lr=5.0e-4",
    "freeze.proprio_encoder=true",  # frozen for the whole run: in no group
]
# 2-D parameters that are lookup tables, not maps (everything 1-D is no-decay too)
TABLES = {
    "vision_encoder.backbones.0.cls_token",
    "vision_encoder.backbones.0.pos_embed",
    "language_model.model.embed_tokens.weight",  # also the tied LM head
    "action_queries.weight",
}


def recipe(*overrides: str):
    return load_recipe(QUICKSTART, list(overrides))


def test_every_trainable_parameter_is_in_exactly_one_named_group():
    r = recipe(*STAGED, "optim.groups.action_head.weight_decay=0.05", "loss.strategy=uncertainty")
    model, loss_fn, opt, _ = build_components(r, torch.device("cpu"))
    group_of = {}
    for g in opt.param_groups:
        for p in g["params"]:
            assert id(p) not in group_of, f"in {group_of[id(p)]} and {g['name']}"
            group_of[id(p)] = g["name"]

    for name, p in model.named_parameters():
        module = name.split(".")[0]
        if module == "proprio_encoder":
            assert id(p) not in group_of, name
        else:
            twin = "/no_decay" if p.ndim < 2 or name in TABLES else ""
            assert group_of.get(id(p)) == module + twin, name
    assert all(group_of[id(p)] == "loss_weights" for p in loss_fn.no_decay_parameters())

    settings = {
        g["name"]: (g["base_lr"], g["weight_decay"], g["start_step"], g["warmup_steps"]) for g in opt.param_groups
    }
    assert settings["vision_encoder"] == (5e-4, 0.01, 4, 3)
    assert settings["vision_encoder/no_decay"] == (5e-4, 0.0, 4, 3)
    assert settings["action_head"] == (2e-3, 0.05, 0, 2)  # quickstart's action-head LR, own weight decay
    assert settings["action_head/no_decay"] == (2e-3, 0.0, 0, 2)
    assert settings["projector"] == (1e-3, 0.01, 0, 2)
    assert settings["action_queries/no_decay"] == (1e-3, 0.0, 0, 2)
    assert "action_queries" not in settings
    assert settings["loss_weights"] == (1e-3, 0.0, 0, 2)  # decay would pull the log-variances to 0


def test_a_trainable_parameter_outside_every_group_is_caught():
    model, _, opt, _ = build_components(recipe(*TINY, "freeze.projector=true"), torch.device("cpu"))
    model.set_frozen(set())  # the projector now requires grad but has no group
    with pytest.raises(AssertionError, match="projector.weight"):
        optim.check_trainable_covered(model, opt)


def test_lr_factor_against_hand_computed_values():
    cos = recipe(*TINY, "train.steps=12", "optim.warmup_steps=2", "optim.min_lr_ratio=0.1")
    f = optim.lr_factor
    assert [f(cos, s, 0, 2) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert f(cos, 7, 0, 2) == pytest.approx(0.55)  # halfway through the decay: 0.1 + 0.9 * 0.5
    assert f(cos, 12, 0, 2) == pytest.approx(0.1)
    assert f(cos, 3, 4, 3) == 0.0  # before its start
    assert f(cos, 5, 4, 3) == pytest.approx(2 / 3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.3))))
    lin = recipe(*TINY, "train.steps=12", "optim.warmup_steps=2", "optim.scheduler=linear", "optim.min_lr_ratio=0.0")
    assert f(lin, 7, 0, 2) == pytest.approx(0.5)
    const = recipe(*TINY, "train.steps=12", "optim.warmup_steps=4", "optim.scheduler=constant")
    assert [f(const, s, 0, 4) for s in (0, 3, 11)] == [0.25, 1.0, 1.0]


@pytest.mark.parametrize(
    ("name", "cls"), [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam), ("sgd", torch.optim.SGD)]
)
def test_optimizers_by_name(name, cls):
    settings = ["optim.momentum=0.7"] if name == "sgd" else ["optim.betas=[0.8,0.9]", "optim.eps=1.0e-6"]
    _, _, opt, _ = build_components(recipe(*TINY, f"optim.name={name}", *settings), torch.device("cpu"))
    assert type(opt) is cls
    for g in opt.param_groups:  # the recipe's settings, not torch's defaults
        assert (g["momentum"] == 0.7) if name == "sgd" else (g["betas"] == (0.8, 0.9) and g["eps"] == 1e-6)
    # Adam(W) fused also on the CPU: one code path, with the update skipped on the device (train.queue_update)
    assert bool(opt.defaults.get("fused")) == (name != "sgd")


def has_grad(module: torch.nn.Module) -> bool:
    return any(p.grad is not None for p in module.parameters())


def train_run(tmp_path, *overrides: str):
    """A run without validation (its forwards would mix with the training ones in the hooks)."""
    common = ["checkpoint.every=0", "data.val_ratio=0", "logging.tensorboard=false", f"output_dir={tmp_path / 'run'}"]
    return setup(recipe(*overrides, *common))


def test_staged_unfreeze_schedule_modes_and_gradients_through_a_run(tmp_path):
    steps = 8
    run = train_run(tmp_path, *STAGED, f"train.steps={steps}")
    vision = run.model.vision_encoder
    seen = []  # per forward: (vision in train mode, autograd on inside it, output needs grad)
    # only training forwards: the FLOP meter records one eager eval-mode forward when what trains changes
    vision.register_forward_hook(
        lambda m, i, o: (
            seen.append((m.training, torch.is_grad_enabled(), o.requires_grad)) if run.model.training else None
        )
    )
    grads = []  # per update, before the optimizer step: which modules have gradients
    names = ("vision_encoder", "projector", "proprio_encoder", "action_head")
    run.optimizer.register_step_pre_hook(lambda *_: grads.append({n: has_grad(getattr(run.model, n)) for n in names}))
    start = [p.detach().clone() for p in vision.parameters()]
    fit(run)

    frozen, thawed = [(False, False, False)] * 4, [(True, True, True)] * 4
    assert seen == frozen + thawed  # eval + no autograd while frozen (nothing upstream trains)
    assert [g["vision_encoder"] for g in grads] == [False] * 4 + [True] * 4
    assert all(g["projector"] and g["action_head"] and not g["proprio_encoder"] for g in grads)
    assert not run.model.proprio_encoder.training  # frozen all run: eval, even after model.train()
    assert any(not torch.equal(a, p) for a, p in zip(start, vision.parameters(), strict=True))

    # the LR each update used, as logged: global warmup 2 then cosine to 0.1 over steps 2..8;
    # the vision encoder from update index 4 with its own 3-step warmup
    def cosine(s):
        p = min(1.0, max(0.0, (s - 2) / (steps - 2)))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))

    rows = [json.loads(line) for line in run.logger.path.read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for s, row in enumerate(rows):  # s: 0-based update index
        warm = min(1.0, (s + 1) / 2)
        assert row["lr/projector"] == pytest.approx(1e-3 * warm * cosine(s), rel=1e-12)
        assert row["lr/action_head"] == pytest.approx(2e-3 * warm * cosine(s), rel=1e-12)
        vis = 0.0 if s < 4 else 5e-4 * min(1.0, (s - 4 + 1) / 3) * cosine(s)
        assert row["lr/vision_encoder"] == pytest.approx(vis, rel=1e-12, abs=0)
    assert "lr/proprio_encoder" not in rows[0]


def test_gradnorm_diagnostics_follow_a_staged_unfreeze_of_the_trunk(tmp_path, monkeypatch):
    """gradnorm/* measure the last trunk layer that trains: the action queries while the LM is
    frozen, the LM's last decoder layer from its unfreeze on."""
    watched = []
    norms = CompositeLoss.term_grad_norms
    record = lambda self, terms, params: watched.append({id(p) for p in params}) or norms(self, terms, params)  # noqa: E731
    monkeypatch.setattr(CompositeLoss, "term_grad_norms", record)
    plan = ["freeze.language_model=true", "unfreeze.language_model.at_step=1", "loss.grad_norm_every=1"]
    run = train_run(tmp_path, *TINY, *plan, "train.steps=2")
    last_layer = {id(p) for p in run.model.decoder.layers[-1].parameters()}
    queries = {id(p) for p in run.model.action_queries.parameters()}
    fit(run)
    assert watched == [queries, last_layer]


def test_a_frozen_module_below_a_trained_one_runs_with_autograd_but_gets_no_gradient(tmp_path):
    run = train_run(tmp_path, *TINY, "freeze.language_model=true", "train.steps=1")
    lm, vision = run.model.language_model, run.model.vision_encoder
    seen, grads = [], []
    run.model.decoder.register_forward_hook(
        lambda m, i, o: seen.append((m.training, torch.is_grad_enabled())) if run.model.training else None
    )
    run.optimizer.register_step_pre_hook(lambda *_: grads.append((has_grad(lm), has_grad(vision))))
    fit(run)
    assert seen == [(False, True)]  # eval mode, but autograd runs through it for the vision encoder
    assert grads == [(False, True)]


def test_grad_clip_0_trains_unclipped(tmp_path):
    """optim.grad_clip=0 turns clipping off: the weights are those of a clip too large to bite."""
    after = []
    for clip in ("0", "1.0e9"):
        fit(run := train_run(tmp_path / clip, *TINY, f"optim.grad_clip={clip}", "train.steps=2"))
        after.append([p.detach().clone() for p in run.model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*after, strict=True))


@pytest.mark.parametrize("clip", [0.5, 1e6])  # clipping active / inactive
def test_clipping_inside_the_fused_update_equals_clip_grad_norm(clip):
    """The fused path divides gradients by clip_divisor inside the AdamW kernel instead of a
    separate clip_grad_norm_ pass; both must give the same weights (fused AdamW also runs on CPU)."""
    from vla_ft.train import clip_divisor, total_grad_norm

    torch.manual_seed(0)
    plain = [torch.nn.Parameter(torch.randn(40, 30)) for _ in range(3)]
    folded = [torch.nn.Parameter(p.detach().clone()) for p in plain]
    opt_plain, opt_folded = (torch.optim.AdamW(ps, lr=1e-2, fused=True) for ps in (plain, folded))
    for _ in range(3):
        for p, q in zip(plain, folded, strict=True):
            p.grad = torch.randn_like(p) * 3
            q.grad = p.grad.clone()
        norm = torch.nn.utils.clip_grad_norm_(plain, clip)
        opt_plain.step()
        torch.testing.assert_close(total_grad_norm(folded), norm)
        opt_folded.grad_scale = clip_divisor(total_grad_norm(folded), clip)
        opt_folded.step()
        del opt_folded.grad_scale
        for p, q in zip(plain, folded, strict=True):
            torch.testing.assert_close(q, p, atol=1e-6, rtol=1e-6)
