"""The model-FLOP counter against torch's FlopCounterMode on a tiny VLA, padding, the peak
table, and the meter that logs perf/tflops and perf/mfu during training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import QUICKSTART, TINY
from torch.utils.flop_counter import FlopCounterMode

from vla_ft import flops, optim
from vla_ft.cli import main as cli
from vla_ft.config import load_recipe
from vla_ft.losses import CompositeLoss
from vla_ft.model import build_model

TRUNK = ("vision_encoder", "projector", "proprio_encoder", "language_model", "action_queries")
REGIMES = {
    "full": [],
    "frozen_vision": ["freeze.vision_encoder=true"],
    "lora_lm": ["model.lora.enabled=true", "freeze.vision_encoder=true"],  # LoRA base: gradient passes through
    "frozen_lm_below_trained_vision": ["freeze.language_model=true"],
    "frozen_trunk": [f"freeze.{m}=true" for m in TRUNK],
}


def tiny(*overrides: str):
    torch.manual_seed(0)
    recipe = load_recipe(QUICKSTART, [*TINY, *overrides])
    model = build_model(recipe, state_dim=3, action_dim=3, n_cameras=1, vocab_size=300)
    model.set_frozen(optim.frozen_at(recipe, model, 0))
    model.train()
    loss_fn = CompositeLoss(recipe.loss, 3, recipe.data.chunk, True)
    return model, loss_fn


def make_batch(prompt_lens=(5, 5), target_lens=(4, 4), chunk: int = 3) -> dict[str, torch.Tensor]:
    """Prompts left-padded and targets right-padded to the longest, as robot_data.collate does."""
    b, lp, lt = len(prompt_lens), max(prompt_lens), max(target_lens)
    prompt_mask = torch.tensor([[j >= lp - n for j in range(lp)] for n in prompt_lens])
    target_mask = torch.tensor([[j < n for j in range(lt)] for n in target_lens])
    return {
        "images": torch.randint(0, 255, (b, 1, 3, 64, 64), dtype=torch.uint8),
        "state": torch.randn(b, 1, 3),
        "actions": torch.rand(b, chunk, 3),
        "action_mask": torch.ones(b, chunk, dtype=torch.bool),
        "prompt_ids": torch.randint(4, 300, (b, lp)) * prompt_mask,
        "prompt_mask": prompt_mask,
        "target_ids": torch.randint(4, 300, (b, lt)) * target_mask,
        "target_mask": target_mask,
    }


def reference_model_flops(model, loss_fn, batch) -> float:
    """FlopCounterMode over one forward + backward, attention on SDPA's math backend: its matmuls
    are plain bmm's the counter sees on every torch (torch 2.14 has no flop formula for the CPU
    flash kernel), and its backward computes the two products per forward product, no recomputation."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel([SDPBackend.MATH]):
        total, _ = loss_fn(model(batch), batch)
        total.backward()
    return counter.get_total_flops() - rotary_table_flops(counter)


def rotary_table_flops(counter: FlopCounterMode) -> int:
    """The LM's rotary cos/sin tables: transformers 5.17 builds them with a matmul (inv_freq
    (1, d/2, 1) @ positions (1, 1, L): 464 FLOPs here), 5.24 with a product; position encoding,
    not model work."""
    counts = counter.get_flop_counts()
    return sum(sum(ops.values()) for name, ops in counts.items() if name.endswith(".rotary_emb"))


@pytest.mark.parametrize("regime", REGIMES)
def test_counter_equals_flop_counter_mode(regime):
    model, loss_fn = tiny(*REGIMES[regime])
    batch = make_batch()  # no padding: FlopCounterMode counts what the kernels run
    counted = flops.measure_step_flops(model, batch).total(batch, want_text=True, attention="dense")
    assert float(counted) == pytest.approx(reference_model_flops(model, loss_fn, batch), rel=1e-9)


@pytest.mark.parametrize(
    "vision",
    [
        ["model.vision.name=beit_base_patch16_224"],  # qkv by F.linear on its weight, no head_dim
        ["model.vision.name=eva02_tiny_patch14_224", "model.vision.kwargs.patch_size=16"],
        [  # attention per window, no head_dim
            "model.vision.name=swin_tiny_patch4_window7_224",
            "model.vision.kwargs={embed_dim: 32, depths: [1, 1], num_heads: [2, 2], window_size: 4}",
        ],
    ],
    ids=["beit", "eva02", "swin"],
)
@pytest.mark.parametrize("frozen", [False, True], ids=["trained", "frozen"])
def test_vision_encoders_whose_attention_bypasses_its_layers_are_counted(vision, frozen):
    """timm's BEiT and EVA run qkv as F.linear on its weight (no module call, no hook), and BEiT's
    and Swin's attention keep no head_dim: their qkv products and attention went uncounted."""
    model, loss_fn = tiny(*vision, f"freeze.vision_encoder={str(frozen).lower()}")
    batch = make_batch()
    counted = flops.measure_step_flops(model, batch).total(batch, want_text=True, attention="dense")
    assert float(counted) == pytest.approx(reference_model_flops(model, loss_fn, batch), rel=1e-9)


def test_head_only_on_cached_readout_counts_the_heads():
    model, loss_fn = tiny(*REGIMES["frozen_trunk"], "loss.weights.language=0")
    batch = make_batch()
    with torch.no_grad():
        readout = model.trunk(batch)["readout"]
    cached = {"readout": readout, "actions": batch["actions"], "action_mask": batch["action_mask"]}
    counted = flops.measure_step_flops(model, cached).total(cached, want_text=False)
    assert float(counted) == pytest.approx(reference_model_flops(model, loss_fn, cached), rel=1e-9)


def test_trained_modules_cost_6n_frozen_2n_and_gradient_through_4n():
    """Whole-module ratios on the action head (2 Linears): its first layer reads a readout that
    needs no gradient (4N) when the trunk is frozen, and one that does (6N) when it trains."""
    model, _ = tiny(*REGIMES["frozen_trunk"])
    batch = make_batch()
    n1, n2 = (layer.weight.numel() for layer in (model.action_head[0], model.action_head[-1]))
    rows = 2 * 3  # batch x chunk query tokens
    g1, g2 = (layer.weight.numel() for layer in (model.gripper_head[0], model.gripper_head[-1]))
    per_query = flops.measure_step_flops(model, batch).per_query
    assert per_query * rows == 2 * rows * (2 * n1 + 3 * n2 + 2 * g1 + 3 * g2)
    model_full, _ = tiny()
    assert flops.measure_step_flops(model_full, batch).per_query * rows == 2 * rows * 3 * (n1 + n2 + g1 + g2)


def test_padding_is_not_counted():
    model, _ = tiny()
    padded = make_batch(prompt_lens=(3, 5), target_lens=(4, 2))
    coeffs = flops.measure_step_flops(model, padded)
    together = float(coeffs.total(padded, want_text=True))
    rows = [make_batch(prompt_lens=(3,), target_lens=(4,)), make_batch(prompt_lens=(5,), target_lens=(2,))]
    alone = sum(float(coeffs.total(row, want_text=True)) for row in rows)
    assert together == pytest.approx(alone, rel=1e-12)
    # the padded positions would add work: 2 prompt pads + 2 target pads in the LM, 2 in the LM head
    dense_positions = make_batch(prompt_lens=(5, 5), target_lens=(4, 4))
    assert float(coeffs.total(dense_positions, want_text=True)) > together


def test_a_target_the_trunk_does_not_append_is_not_counted():
    """Without the language target in the trunk (want_text false) its tokens are no LM rows:
    per row, prefix + prompt + chunk tokens, by hand."""
    coeffs = flops.StepFlops(per_lm_token=10.0, per_supervised=100.0, per_lm_pair=1.0, prefix_tokens=2, chunk=3)
    batch = make_batch(prompt_lens=(3, 5), target_lens=(4, 2))
    rows = [2 + 3 + 3, 2 + 5 + 3]
    got = coeffs.count(batch, want_text=False)
    assert float(got["language_model"]) == 10.0 * sum(rows)
    assert float(got["lm_attention"]) == sum(n * (n + 1) / 2 for n in rows)
    with_text = coeffs.count(batch, want_text=True)  # + 6 target tokens, each also through the LM head
    assert float(with_text["language_model"]) == 10.0 * (sum(rows) + 6) + 100.0 * 6


def test_causal_attention_counts_the_lower_triangle():
    model, _ = tiny()
    batch = make_batch(prompt_lens=(5,), target_lens=(4,))
    coeffs = flops.measure_step_flops(model, batch)
    n = coeffs.prefix_tokens + 5 + model.chunk + 4  # LM tokens of the row
    pairs = int(torch.ones(n, n).tril().sum())  # each query with itself and every earlier key
    causal = coeffs.count(batch, want_text=True)["lm_attention"]
    dense = coeffs.count(batch, want_text=True, attention="dense")["lm_attention"]
    assert float(causal) / float(dense) == pytest.approx(pairs / n**2)
    cfg = model.language_model.config
    assert float(dense) == 3 * 4 * cfg.num_hidden_layers * cfg.hidden_size * n * n  # x3: the gradient flows


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA H200", 989.4),
        ("Some Future GPU", None),
    ],
)
def test_peak_table(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert flops.peak_tflops("cuda") == peak
    assert flops.peak_tflops("cpu") is None


def test_meter_counts_training_forwards_and_recounts_after_an_unfreeze():
    model, loss_fn = tiny(*REGIMES["frozen_vision"])
    reference, _ = tiny(*REGIMES["frozen_vision"])  # the same model without the meter's hook
    meter = flops.FlopMeter(model, peak=100.0, attention="dense")
    batch = make_batch()
    expected = 0.0
    for frozen in ({"vision_encoder"}, {"vision_encoder"}, set()):  # the third step after an unfreeze
        for m in (model, reference):
            m.set_frozen(frozen)
            m.train()
        loss_fn(model(batch), batch)[0].backward()
        expected += reference_model_flops(reference, loss_fn, batch)
    model.eval()
    model(batch)  # evaluation is not training work
    out = meter.metrics(elapsed=2.0)
    assert out["perf/tflops"] == pytest.approx(expected / 2.0 / 1e12, rel=1e-9)
    assert out["perf/mfu"] == pytest.approx(out["perf/tflops"] / 100.0)
    assert meter.metrics(1.0) == {}  # reset after each log interval
    meter.remove()


def test_recording_does_not_touch_the_rng_or_the_mode():
    model, _ = tiny("model.lora.enabled=true", "model.lora.dropout=0.5")  # dropout would draw in train mode
    batch = make_batch()
    before = torch.get_rng_state()
    flops.FlopMeter(model, peak=None)._record(batch)
    assert torch.equal(torch.get_rng_state(), before)
    assert model.training


def test_training_logs_tflops_and_no_mfu_on_cpu(tmp_path: Path):
    argv = [
        "train",
        str(QUICKSTART),
        *TINY,
        f"output_dir={tmp_path / 'run'}",
        "train.steps=2",
        "train.val_every=0",
        "checkpoint.every=0",
        "logging.tensorboard=false",
    ]
    assert cli(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert train_rows and all(r["perf/tflops"] > 0 for r in train_rows)
    assert not any("perf/mfu" in r for r in rows)


def test_dora_counts_its_rows_not_the_adapter_product_it_builds_each_forward():
    """peft's DoRA builds B A each forward by running lora_A, lora_B on an identity (in x in): work per
    forward, not per token. The count is FlopCounterMode's less exactly that work, forward only (it
    only feeds the detached weight norm): 2 in (in r + r out) per adapted layer."""
    model, loss_fn = tiny(*REGIMES["lora_lm"], "model.lora.use_dora=true")
    batch = make_batch()
    counted = flops.measure_step_flops(model, batch).total(batch, want_text=True, attention="dense")
    adapted = [m for m in model.language_model.modules() if hasattr(m, "lora_magnitude_vector") and m.lora_A]
    r = adapted[0].lora_A["default"].out_features
    per_forward = sum(2 * m.in_features * (m.in_features * r + r * m.out_features) for m in adapted)
    assert adapted and per_forward > 0
    assert float(counted) == pytest.approx(reference_model_flops(model, loss_fn, batch) - per_forward, rel=1e-9)
