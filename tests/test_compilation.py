"""train.compile: the trunk runs through torch.compile in training (one graph per shape), eagerly
in evaluation, with the same results and the same checkpoint keys. A counting backend stands in
for inductor so the test takes a second, not minutes."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from conftest import QUICKSTART, TINY
from test_flops import make_batch, tiny
from torch._dynamo.testing import CompileCounter

from vla_ft import compilation
from vla_ft.config import load_recipe


def test_compiled_trunk_trains_like_the_eager_one_and_evaluates_eagerly():
    eager_model, loss_fn = tiny()
    model, _ = tiny()  # same seed: same weights
    keys = list(model.state_dict())
    counter = CompileCounter()
    compilation.compile_trunk(model, backend=counter)
    batch = make_batch(prompt_lens=(3, 5), target_lens=(4, 2))

    for m in (eager_model, model):
        loss_fn(m(batch), batch)[0].backward()
    assert counter.frame_count == 1
    torch.testing.assert_close(model(batch)["actions"], eager_model(batch)["actions"])
    for (name, p), q in zip(model.named_parameters(), eager_model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    assert counter.frame_count == 1  # same shapes: no recompilation

    model.eval()
    model(make_batch(prompt_lens=(2,), target_lens=(1,)))  # a short last validation batch
    assert counter.frame_count == 1  # evaluation ran the eager trunk
    assert list(model.state_dict()) == keys  # checkpoints look the same with or without compile


def test_installer_follows_the_recipe():
    model, _ = tiny()
    eager_trunk = model.trunk
    compilation.install(SimpleNamespace(recipe=load_recipe(QUICKSTART, TINY), model=model))
    assert model.trunk == eager_trunk  # train.compile is off by default
    compilation.install(SimpleNamespace(recipe=load_recipe(QUICKSTART, [*TINY, "train.compile=true"]), model=model))
    assert model.trunk.eager == eager_trunk
