"""model.vision.film: the instruction scales and shifts every ViT block's output. Checked against
timm's blocks run by hand, at init (the plain model), for gradients and autograd under freezing,
and where a recipe uses it (errors, the feature cache, init_from, the FLOP counter)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from conftest import QUICKSTART, TINY
from safetensors.torch import load_file
from test_flops import make_batch, reference_model_flops, tiny
from tiny_models import fake_batch, tiny_recipe
from torch._dynamo.testing import CompileCounter
from train_helpers import metric_rows, tiny_run

from vla_ft import VLAPolicy, compilation, flops, optim
from vla_ft.cli import main as cli
from vla_ft.config import RecipeError, load_recipe
from vla_ft.data import to_device
from vla_ft.model import build_model
from vla_ft.model_files import load_model
from vla_ft.run_setup import setup, teardown
from vla_ft.train import fit
from vla_ft.train import main as train

DIMS = {"state_dim": 4, "action_dim": 3, "vocab_size": 284}
FILM = ("model.vision.film=true", "model.vision.kwargs.depth=2")


def _model(tmp_path, *overrides: str, n_cameras: int = 1, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(tiny_recipe(tmp_path, *overrides), n_cameras=n_cameras, **DIMS)


def _randomise(film: torch.nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in film.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _by_hand(vit, pixels: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
    """timm's VisionTransformer.forward_features written out, each block's output modulated:
    pixels (B, 3, H, W), condition (B, blocks, 2, D) -> patch tokens (B, N, D)."""
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(pixels))))
    for i, block in enumerate(vit.blocks):
        x = block.forward(x) * (1 + condition[:, i, 0, None, :]) + condition[:, i, 1, None, :]  # no hooks
    return vit.norm(x)[:, vit.num_prefix_tokens :]


@pytest.mark.parametrize("per_camera", [False, True])  # one encoder for both cameras, or one each
def test_every_block_is_scaled_and_shifted_by_its_rows_condition(tmp_path, per_camera):
    model = _model(tmp_path, *FILM, f"model.vision.per_camera={per_camera}", n_cameras=2).eval()
    enc = model.vision_encoder
    assert enc.film_blocks == 2 and model.film.shape == (2, 2, 32) and len(enc.backbones) == 1 + per_camera
    batch = fake_batch(model, batch_size=3, prompt_lens=(2, 4, 3))
    condition = torch.randn(3, 2, 2, 32)
    with torch.no_grad():
        got = enc(batch["images"], condition)  # (B, 2 cameras * N, D)
        pixels = (batch["images"].float() - enc.mean) / enc.std
        vits = [enc.backbones[cam if per_camera else 0] for cam in range(2)]
        want = torch.cat([_by_hand(vit, pixels[:, cam], condition) for cam, vit in enumerate(vits)], dim=1)
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="built with film=True, called with film=False"):
        enc(batch["images"])


def test_at_init_film_leaves_the_model_as_without_it(tmp_path):
    with_film = _model(tmp_path, *FILM).eval()
    plain = _model(tmp_path, "model.vision.kwargs.depth=2").eval()
    theirs = plain.state_dict()  # same seed: FiLM's zero init draws no random number
    ours = {k: v for k, v in with_film.state_dict().items() if not k.startswith("film.")}
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    batch = fake_batch(with_film)
    with torch.no_grad():
        torch.testing.assert_close(with_film(batch)["actions"], plain(batch)["actions"])
        _randomise(with_film.film)
        assert not torch.allclose(with_film(batch)["actions"], plain(batch)["actions"])


def test_the_condition_is_the_mean_of_the_real_prompt_tokens(tmp_path):
    model = _model(tmp_path, *FILM).eval()
    _randomise(model.film)
    embed = model.language_model.get_input_embeddings()
    ids = torch.tensor([[0, 0, 7, 9, 11], [5, 6, 7, 9, 11]])
    mask = torch.tensor([[False, False, True, True, True], [True] * 5])
    with torch.no_grad():
        got = model.film(embed(ids), mask)
        for row in range(2):
            mean = embed(ids[row][mask[row]]).mean(0)
            want = model.film.proj(mean).reshape(2, 2, 32)
            torch.testing.assert_close(got[row], want)
    assert not torch.allclose(got[0], got[1])  # two instructions, two conditions
    with torch.enable_grad():
        model.film(embed(ids), mask).sum().backward()
    assert embed.weight.grad is None  # detached: the embeddings learn through the LM only


def test_film_trains_under_a_frozen_vision_encoder(tmp_path):
    recipe = tiny_recipe(tmp_path, *FILM, "freeze.vision_encoder=true")
    torch.manual_seed(0)
    model = build_model(recipe, n_cameras=1, **DIMS)
    model.set_frozen(optim.frozen_at(recipe, model, 0))
    model.train()
    _randomise(model.film)
    assert model._needs_grad("vision_encoder")  # gradient must pass through the frozen blocks to FiLM
    model(fake_batch(model))["actions"].square().sum().backward()
    assert all(p.grad is None for p in model.vision_encoder.parameters())
    assert model.film.proj.weight.grad.abs().sum() > 0
    assert model.language_model.get_input_embeddings().weight.grad is not None  # through the LM, not FiLM

    model.set_frozen({"vision_encoder", "film"})
    assert not model._needs_grad("vision_encoder")  # everything upstream frozen: no autograd in the ViT


def test_film_errors_and_the_feature_cache(tmp_path):
    with pytest.raises(RecipeError, match="model.vision.film: needs a ViT.*'resnet10t' has none"):
        load_recipe(
            QUICKSTART, [*TINY, "model.vision.film=true", "model.vision.name=resnet10t", "model.vision.kwargs={}"]
        )
    with pytest.raises(RecipeError, match="freeze.film: model.vision.film is false"):
        load_recipe(QUICKSTART, [*TINY, "freeze.film=true"])
    head_only = [*TINY, *FILM, "train.cache_features=true", "loss.weights.language=0"]
    head_only += [f"freeze.{m}=true" for m in ("vision_encoder", "projector", "proprio_encoder", "language_model")]
    head_only += ["freeze.action_queries=true"]
    with pytest.raises(RecipeError, match="freeze.film is false"):
        load_recipe(QUICKSTART, head_only)
    load_recipe(QUICKSTART, [*head_only, "freeze.film=true"])


@pytest.mark.parametrize("frozen", [[], ["freeze.vision_encoder=true"]])
def test_flop_counter_counts_film(frozen):
    """Under a frozen encoder the first block runs forward only (its input needs no gradient) and
    the later ones pass the gradient through to FiLM (4N)."""
    model, loss_fn = tiny(*FILM, *frozen)
    _randomise(model.film)
    batch = make_batch()
    counted = flops.measure_step_flops(model, batch).total(batch, want_text=True, attention="dense")
    assert float(counted) == pytest.approx(reference_model_flops(model, loss_fn, batch), rel=1e-9)


def test_film_compiles_into_one_graph_that_trains_like_eager():
    eager, loss_fn = tiny(*FILM)
    model, compiled_loss = tiny(*FILM)
    for m in (eager, model):
        _randomise(m.film)
    counter = CompileCounter()
    compilation.compile_in_training(model, "forward", backend=counter)
    batch = make_batch(prompt_lens=(3, 5), target_lens=(4, 2))
    totals = [lf(m(batch), batch)[0] for m, lf in ((eager, loss_fn), (model, compiled_loss))]
    for total in totals:
        total.backward()
    assert counter.frame_count == 1  # the hooks' condition traced, no graph break
    torch.testing.assert_close(totals[1], totals[0])
    torch.testing.assert_close(model.film.proj.weight.grad, eager.film.proj.weight.grad)
    compiled_loss(model(batch), batch)
    assert counter.frame_count == 1


def test_a_second_stage_adds_film_to_a_source_without_it(tmp_path, capsys):
    first = tmp_path / "first"
    depth = "model.vision.kwargs.depth=2"
    train(tiny_recipe(first, depth, "train.steps=2", "checkpoint.every=2", "train.val_every=0"))
    source = first / "run"
    run = setup(tiny_recipe(tmp_path / "second", *FILM, f"model.init_from={source}"))
    assert "; fresh: film" in capsys.readouterr().out
    plain, _ = load_model(source / "checkpoints" / "step_000002")
    batch = to_device(next(iter(run.val_loader)), run.rt.device)
    run.model.eval()
    with torch.no_grad():  # FiLM starts at zero: the source's actions
        torch.testing.assert_close(run.model(batch)["actions"], plain(batch)["actions"])
    teardown(run)
    film_source = tmp_path / "film_source"  # the other way round, FiLM would be dropped: another model
    train(tiny_recipe(film_source, *FILM, "train.steps=2", "checkpoint.every=2", "train.val_every=0"))
    with pytest.raises(RecipeError, match=re.escape("it has film.proj.weight, this model not")):
        setup(tiny_recipe(tmp_path / "third", depth, f"model.init_from={film_source / 'run'}"))


def test_a_trained_film_checkpoint_loads_for_inference_and_exports(tmp_path):
    train(tiny_recipe(tmp_path, *FILM, "train.steps=3", "checkpoint.every=3", "train.val_every=0"))
    ckpt = tmp_path / "run" / "checkpoints" / "step_000003"
    saved = load_file(str(ckpt / "model.safetensors"))
    assert saved["film.proj.weight"].abs().sum() > 0  # trained away from its zero init
    policy = VLAPolicy.from_pretrained(ckpt)
    assert torch.equal(policy.model.film.proj.weight, saved["film.proj.weight"])
    frame = torch.zeros((64, 64, 3), dtype=torch.uint8)
    actions = policy.predict_action(frame, "pick up the red block", torch.zeros(3))
    assert cli(["export", str(ckpt), str(tmp_path / "export")]) == 0
    exported = VLAPolicy.from_pretrained(tmp_path / "export")
    assert torch.equal(exported.model.film.proj.weight, saved["film.proj.weight"])
    np.testing.assert_allclose(
        exported.predict_action(frame, "pick up the red block", torch.zeros(3)), actions, atol=1e-6
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("frozen_vision", [False, True])
def test_film_trains_compiled_in_bf16_on_cuda(tmp_path, frozen_vision):
    """bf16 weights with fp32 masters and the fused update, the forward compiled by inductor."""
    frozen = ["freeze.vision_encoder=true"] if frozen_vision else []
    cuda = ["train.device=cuda", "checkpoint.every=0", "train.precision=bf16", "train.compile=true", "train.steps=4"]
    run = tiny_run(tmp_path / "run", *FILM, *cuda, *frozen)
    start = run.model.film.proj.weight.detach().clone()
    fit(run)
    assert run.model.film.proj.weight.dtype == torch.bfloat16 and run.model.master_weights is not None
    assert not torch.equal(run.model.film.proj.weight, start)
    rows = [r for r in metric_rows(tmp_path / "run") if "loss" in r]
    assert len(rows) == 4 and all(math.isfinite(r["loss"]) for r in rows)


def test_vision_checkpointing_recomputes_blocks_with_their_film_and_the_same_gradients(tmp_path):
    """model.vision.gradient_checkpointing: backward reruns each block (after the forward returned)
    and must modulate it as the forward did, so every gradient equals the plain run's."""
    grads, calls = [], []
    for checkpointing in (False, True):
        model = _model(tmp_path, *FILM, f"model.vision.gradient_checkpointing={checkpointing}").train()
        _randomise(model.film)
        blocks = model.vision_encoder.backbones[0].blocks
        assert (
            blocks[0].__class__.__name__ == "Block"
            and model.vision_encoder.backbones[0].grad_checkpointing is checkpointing
        )
        calls.append(0)
        blocks[0].register_forward_pre_hook(lambda *a: calls.__setitem__(-1, calls[-1] + 1))
        model(fake_batch(model))["actions"].square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert calls == [1, 2]  # the checkpointed block ran again in backward
    assert grads[0].keys() == grads[1].keys() and "film.proj.weight" in grads[1]
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)
    from vla_ft.backbones import checkpoint_blocks

    with pytest.raises(RecipeError, match="model.vision.gradient_checkpointing: timm's 'mlp' cannot recompute"):
        checkpoint_blocks(torch.nn.Linear(2, 2), "mlp")  # no set_grad_checkpointing
