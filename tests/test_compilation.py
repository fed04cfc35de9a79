"""train.compile: the training forward and the loss terms run through torch.compile (one graph
each per shape), evaluation runs eagerly, with the same results and the same checkpoint keys.
A counting backend stands in for inductor so the test takes a second, not minutes; one test
runs real inductor on the tiny model."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch
from conftest import QUICKSTART, TINY
from test_flops import make_batch, tiny
from torch._dynamo.testing import CompileCounter

from vla_ft import compilation
from vla_ft.config import RecipeError, load_recipe


def compiled_pair(backend):
    eager_model, loss_fn = tiny()
    model, compiled_loss = tiny()  # same seed: same weights
    compilation.compile_in_training(model, "forward", backend=backend)
    compilation.compile_in_training(compiled_loss, "evaluate", backend=backend)
    return eager_model, loss_fn, model, compiled_loss


def test_compiled_forward_and_loss_train_like_the_eager_ones_and_evaluate_eagerly():
    counter = CompileCounter()
    eager_model, loss_fn, model, compiled_loss = compiled_pair(counter)
    keys = list(model.state_dict())
    batch = make_batch(prompt_lens=(3, 5), target_lens=(4, 2))

    totals = [lf(m(batch), batch) for m, lf in ((eager_model, loss_fn), (model, compiled_loss))]
    for total, _ in totals:
        total.backward()
    assert counter.frame_count == 2  # the forward and the loss terms
    torch.testing.assert_close(totals[1][0], totals[0][0])
    assert totals[1][1].keys() == totals[0][1].keys()  # every logged part is still there
    for (name, p), q in zip(model.named_parameters(), eager_model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    compiled_loss(model(batch), batch)
    assert counter.frame_count == 2  # same shapes: no recompilation

    model.eval()
    compiled_loss.eval()
    short = make_batch(prompt_lens=(2,), target_lens=(1,))  # a short last validation batch
    compiled_loss(model(short), short)
    assert counter.frame_count == 2  # evaluation ran eagerly
    assert list(model.state_dict()) == keys  # checkpoints look the same with or without compile


@pytest.mark.skipif(not shutil.which("g++") and not shutil.which("c++"), reason="inductor on CPU needs a C++ compiler")
def test_inductor_graphs_match_eager():
    eager_model, loss_fn, model, compiled_loss = compiled_pair("inductor")
    batch = make_batch(prompt_lens=(3, 5), target_lens=(4, 2))
    (ref, ref_parts), (out, parts) = (lf(m(batch), batch) for m, lf in ((eager_model, loss_fn), (model, compiled_loss)))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for k in ("loss/language", "loss/action", "loss/gripper", "metric/token_acc"):
        torch.testing.assert_close(parts[k], ref_parts[k], atol=1e-5, rtol=1e-5, msg=k)


def test_installer_follows_the_recipe():
    model, loss_fn = tiny()
    eager_forward, eager_evaluate = model.forward, loss_fn.evaluate
    run = SimpleNamespace(recipe=load_recipe(QUICKSTART, TINY), model=model, loss_fn=loss_fn)
    compilation.install(run)
    assert (model.forward, loss_fn.evaluate) == (eager_forward, eager_evaluate)  # train.compile is off by default
    run.recipe = load_recipe(QUICKSTART, [*TINY, "train.compile=true"])
    compilation.install(run)
    assert (model.forward.eager, loss_fn.evaluate.eager) == (eager_forward, eager_evaluate)


def test_compile_mode_reaches_torch_compile(monkeypatch):
    """train.compile_mode picks torch.compile's mode (reduce-overhead: CUDA graphs); an unknown
    mode is a recipe error naming the key."""
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw["mode"]) or fn)
    model, loss_fn = tiny()
    recipe = load_recipe(QUICKSTART, [*TINY, "train.compile=true", "train.compile_mode=reduce-overhead"])
    compilation.install(SimpleNamespace(recipe=recipe, model=model, loss_fn=loss_fn))
    assert seen == ["reduce-overhead", "reduce-overhead"]
    with pytest.raises(RecipeError, match="train.compile_mode"):
        load_recipe(QUICKSTART, [*TINY, "train.compile_mode=fast"])
