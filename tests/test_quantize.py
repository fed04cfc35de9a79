"""bitsandbytes: the LM's linears in 4 bits (``model.language.quantize``, QLoRA) and AdamW with 8-bit
moments (``optim.name: adamw8bit``).

The reference for what a 4-bit layer computes is NF4 decoded by hand from the saved bytes with the
code table of the QLoRA paper (Dettmers et al. 2023, appendix E), not bitsandbytes' own decoder."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import WIDE_LM
from safetensors.torch import load_file
from tiny_models import fake_batch, tiny_recipe
from train_helpers import FAST, assert_same_weights, metric_rows, run_forked, train_argv

from vla_ft import VLAPolicy
from vla_ft.cli import main as cli
from vla_ft.config import RecipeError
from vla_ft.model import build_model

pytest.importorskip("bitsandbytes")

NF4 = torch.tensor(  # QLoRA's NormalFloat4 levels
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635]
    + [-0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725]
    + [0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]
)
QLORA = [*WIDE_LM, "model.language.quantize=nf4", "model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8"]
DIMS = {"state_dim": 4, "action_dim": 3, "vocab_size": 284, "n_cameras": 1}
RUN = [*FAST, *QLORA, "optim.groups.language_model.lr=0.05", "train.steps=4", "checkpoint.every=2"]
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def decode_nf4(state: dict[str, torch.Tensor], weight: str, shape: tuple[int, int]) -> torch.Tensor:
    """A 4-bit weight from a state dict: two codes per byte (high nibble first), 64 weights per block
    scaled by the block's absmax, itself stored as 8-bit codes with 256-block scales and an offset."""
    import json

    meta = json.loads(bytes(state[f"{weight}.quant_state.bitsandbytes__nf4"].tolist()))
    packed = state[weight].flatten()
    codes = torch.stack([packed >> 4, packed & 15], 1).flatten().long()
    absmax_codes = state[f"{weight}.absmax"].long()
    block = torch.arange(len(absmax_codes)) // meta["nested_blocksize"]
    absmax = state[f"{weight}.nested_quant_map"][absmax_codes] * state[f"{weight}.nested_absmax"][block]
    absmax = absmax + meta["nested_offset"]
    n = shape[0] * shape[1]
    assert meta["blocksize"] == 64 and meta["quant_type"] == "nf4"
    return (NF4[codes][:n] * absmax.repeat_interleave(meta["blocksize"])[:n]).view(shape)


def test_the_4bit_lm_computes_with_its_nf4_weights(tmp_path):
    plain_recipe = tiny_recipe(tmp_path, *WIDE_LM, "freeze.language_model=true")
    quant_recipe = tiny_recipe(tmp_path, *WIDE_LM, "freeze.language_model=true", "model.language.quantize=nf4")
    torch.manual_seed(0)
    plain = build_model(plain_recipe, **DIMS).eval()
    torch.manual_seed(0)
    quant = build_model(quant_recipe, **DIMS).eval()
    state = quant.state_dict()
    decoded = {}
    for name, module in plain.language_model.named_modules():
        if name.endswith(LINEARS):
            weight = f"language_model.{name}.weight"
            assert state[weight].dtype == torch.uint8 and state[weight].numel() == module.weight.numel() // 2
            decoded[name] = decode_nf4(state, weight, tuple(module.weight.shape))
            error = (decoded[name] - module.weight).abs()
            assert 0 < error.max() < 0.2 * module.weight.abs().max()  # rounded to 16 levels, not garbage
    assert len(decoded) == len(LINEARS)  # every linear of the one layer, and not the output head
    head = "language_model.lm_head.weight"
    torch.testing.assert_close(state[head], plain.state_dict()[head], atol=0, rtol=0)

    with torch.no_grad():
        for name, w in decoded.items():
            plain.language_model.get_submodule(name).weight.copy_(w)
        batch = fake_batch(plain)
        want, got = plain(batch), quant(batch)
    assert set(want) == set(got)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=5e-5, rtol=1e-4)  # bitsandbytes' sum order


def test_a_4bit_layer_counts_as_its_full_weight_in_flops_and_the_parameter_report(tmp_path):
    """A 4-bit weight holds two codes per element: neither the FLOP count nor the parameter count may halve."""
    from vla_ft import flops, optim
    from vla_ft.report import parameter_rows

    counts, reports = [], []
    for quantize in ("none", "nf4"):
        recipe = tiny_recipe(tmp_path, *QLORA, f"model.language.quantize={quantize}")
        torch.manual_seed(0)
        model = build_model(recipe, **DIMS)
        model.set_frozen(optim.frozen_at(recipe, model, 0))
        batch = fake_batch(model)
        counts.append(float(flops.measure_step_flops(model.train(), batch).total(batch, want_text=True)))
        reports.append({r["module"]: r for r in parameter_rows(model)}["language_model"])
    assert counts[0] == counts[1] > 0
    assert reports[0]["params"] == reports[1]["params"] and reports[0]["trainable"] == reports[1]["trainable"]
    assert reports[0]["dtype"] == "float32" and reports[1]["dtype"] == "float32,nf4"


def test_recipes_that_cannot_run_4bit_weights_name_the_key(tmp_path, monkeypatch):
    def problems(*overrides: str) -> str:
        try:
            tiny_recipe(tmp_path, "model.language.quantize=nf4", *overrides)
        except RecipeError as err:
            return str(err)
        return ""

    assert problems("model.lora.enabled=true") == problems("freeze.language_model=true") == ""
    assert "model.language.quantize: nf4 weights cannot train" in problems()
    unfreeze = problems("freeze.language_model=true", "unfreeze.language_model.at_step=2", "train.steps=4")
    assert "unfreeze.language_model: the LM is quantized" in unfreeze
    assert "FSDP cannot shard" in problems("freeze.language_model=true", "distributed.strategy=fsdp")
    assert "did you mean 'nf4'" in problems("model.language.quantize=nf5", "freeze.language_model=true")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name))
    assert "model.language.quantize: nf4: needs bitsandbytes" in problems("model.lora.enabled=true")


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory) -> Path:
    """4 QLoRA steps (LM adapters with a large LR so they move), a checkpoint every 2."""
    run_dir = tmp_path_factory.mktemp("qlora") / "run"
    argv = train_argv(run_dir, RUN)
    code = run_forked(argv, run_dir.parent / "log.txt")
    assert code == 0, (run_dir.parent / "log.txt").read_text()[-3000:]
    return run_dir


def ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:06d}"


def test_only_adapters_train_and_the_codes_never_change(qlora_run):
    first, last = (load_file(str(ckpt(qlora_run, s) / "model.safetensors")) for s in (2, 4))
    assert first.keys() == last.keys()
    changed = {k for k in first if not torch.equal(first[k], last[k])}
    codes = [k for k in first if k.endswith("q_proj.base_layer.weight")]
    assert codes and first[codes[0]].dtype == torch.uint8
    assert not {k for k in changed if k.startswith("language_model.") and "lora_" not in k}
    assert any("lora_B" in k for k in changed) and any(k.startswith("action_head.") for k in changed)


def assert_resume_reproduces(straight: Path, overrides: list[str], tmp_path: Path) -> None:
    """Resuming ``straight`` (4 steps) from its step-2 checkpoint gives its losses and final weights."""
    import shutil

    from vla_ft import checkpoint as ck

    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(ckpt(resumed, 4))
    ck.write_pointer(resumed / "checkpoints", "latest", "step_000002")
    argv = train_argv(resumed, [*overrides, "train.resume=true"])
    assert run_forked(argv, tmp_path / "log.txt") == 0, (tmp_path / "log.txt").read_text()[-3000:]
    losses = [[r["loss"] for r in metric_rows(d) if "loss" in r] for d in (straight, resumed)]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    assert_same_weights(ckpt(straight, 4), ckpt(resumed, 4))


def test_resume_reproduces_the_straight_qlora_run(qlora_run, tmp_path):
    assert_resume_reproduces(qlora_run, RUN, tmp_path)


def test_checkpoint_and_export_predict_as_the_trained_model(qlora_run, tmp_path):
    from transformers import AutoModelForCausalLM

    frames = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    state = np.random.default_rng(1).normal(size=(2, 3)).astype(np.float32)
    tasks = ["pick up the red block", "pick up the green block"]
    policy = VLAPolicy.from_pretrained(ckpt(qlora_run, 4))
    layer = policy.model.language_model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert type(layer).__name__ == "Linear4bit"  # inference runs the 4-bit weights training saw
    from_ckpt = policy.predict_action(frames, tasks, state)

    assert cli(["export", str(ckpt(qlora_run, 4)), str(tmp_path / "export")]) == 0
    from_export = VLAPolicy.from_pretrained(tmp_path / "export").predict_action(frames, tasks, state)
    np.testing.assert_allclose(from_export, from_ckpt, atol=1e-5)  # dequantised W + BA vs 4-bit W x + B(Ax)
    lm = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export" / "language_model"))
    assert lm.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32  # plain, for any loader

    trained = load_file(str(ckpt(qlora_run, 4) / "model.safetensors"))
    prefix = "language_model.base_model.model.model.layers.0.self_attn.q_proj."
    base = decode_nf4(trained, prefix + "base_layer.weight", (64, 64))
    a, b = trained[prefix + "lora_A.default.weight"], trained[prefix + "lora_B.default.weight"]
    merged = load_file(str(tmp_path / "export" / "language_model" / "model.safetensors"))
    expected = base + (8 / 4) * b @ a
    torch.testing.assert_close(merged["model.layers.0.self_attn.q_proj.weight"], expected, atol=1e-6, rtol=1e-6)


def test_qdora_checkpoint_and_export_predict_alike(tmp_path):
    """DoRA on the 4-bit base (QDoRA): the checkpoint loads (DoRA reads its base weight when built)
    and acts as its export, whose merged weight is DoRA's on the hand-decoded NF4 base."""
    run_dir = tmp_path / "run"
    argv = train_argv(run_dir, [*RUN[:-2], "model.lora.use_dora=true", "train.steps=2", "checkpoint.every=2"])
    assert run_forked(argv, tmp_path / "log.txt") == 0, (tmp_path / "log.txt").read_text()[-3000:]
    frames = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    state = np.random.default_rng(1).normal(size=(2, 3)).astype(np.float32)
    from_ckpt = VLAPolicy.from_pretrained(ckpt(run_dir, 2)).predict_action(frames, "pick", state)
    assert cli(["export", str(ckpt(run_dir, 2)), str(tmp_path / "export")]) == 0
    from_export = VLAPolicy.from_pretrained(tmp_path / "export").predict_action(frames, "pick", state)
    np.testing.assert_allclose(from_export, from_ckpt, atol=1e-5)
    trained = load_file(str(ckpt(run_dir, 2) / "model.safetensors"))
    prefix = "language_model.base_model.model.model.layers.0.self_attn.q_proj."
    base = decode_nf4(trained, prefix + "base_layer.weight", (64, 64))
    a, b = trained[prefix + "lora_A.default.weight"], trained[prefix + "lora_B.default.weight"]
    direction = base + (8 / 4) * b @ a
    expected = (trained[prefix + "lora_magnitude_vector.default.weight"] / direction.norm(dim=1))[:, None] * direction
    merged = load_file(str(tmp_path / "export" / "language_model" / "model.safetensors"))
    torch.testing.assert_close(merged["model.layers.0.self_attn.q_proj.weight"], expected, atol=1e-6, rtol=1e-5)


def test_a_qlora_second_stage_quantises_the_sources_merged_weights(qlora_run, tmp_path):
    """init_from + quantize: the source's weights are copied first, then this run quantises them."""
    import bitsandbytes as bnb

    from vla_ft.quantize import quantized_layers

    model = build_model(tiny_recipe(tmp_path, f"model.init_from={ckpt(qlora_run, 4)}", *QLORA), **DIMS)
    plain = build_model(tiny_recipe(tmp_path, f"model.init_from={ckpt(qlora_run, 4)}", *WIDE_LM), **DIMS)
    weights = plain.language_model.state_dict()
    layers = quantized_layers(model)
    assert len(layers) == len(LINEARS)
    for name, layer in layers.items():
        key = name.removeprefix("language_model.base_model.model.").removesuffix(".base_layer") + ".weight"
        ref = bnb.nn.Params4bit(weights[key], requires_grad=False, quant_type="nf4", compress_statistics=True)
        assert torch.equal(layer.weight.data, ref.to("cpu").data), name


def test_init_from_a_qlora_run_starts_from_its_dequantised_merged_weights(qlora_run, tmp_path):
    recipe = tiny_recipe(tmp_path, f"model.init_from={ckpt(qlora_run, 4)}", *WIDE_LM)
    model = build_model(recipe, **DIMS)
    exported = tmp_path / "export"
    assert cli(["export", str(ckpt(qlora_run, 4)), str(exported)]) == 0
    merged = load_file(str(exported / "language_model" / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    torch.testing.assert_close(model.language_model.state_dict()[name], merged[name], atol=0, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_qlora_trains_compiled_in_bf16_on_cuda_and_its_checkpoint_loads_there(tmp_path):
    """The codes are made on the GPU, the forward is compiled by inductor, and the checkpoint's
    codes load back bit for bit onto the GPU."""
    import math

    from train_helpers import tiny_run

    from vla_ft.quantize import quantized_layers
    from vla_ft.train import fit

    cuda = ["train.device=cuda", "train.precision=bf16", "train.compile=true", "train.steps=4", "checkpoint.every=4"]
    run = tiny_run(tmp_path / "run", *QLORA, "optim.groups.language_model.lr=0.05", *cuda)
    layers = quantized_layers(run.model)
    assert len(layers) == len(LINEARS) and all(m.weight.device.type == "cuda" for m in layers.values())
    codes = {n: m.weight.data.clone() for n, m in layers.items()}
    adapters = {n: p.detach().clone() for n, p in run.model.named_parameters() if "lora_B" in n}
    fit(run)
    rows = [r for r in metric_rows(tmp_path / "run") if "loss" in r]
    assert len(rows) == 4 and all(math.isfinite(r["loss"]) for r in rows)
    assert all(torch.equal(m.weight.data, codes[n]) for n, m in layers.items())
    assert any(not torch.equal(p, adapters[n]) for n, p in run.model.named_parameters() if "lora_B" in n)

    policy = VLAPolicy.from_pretrained(ckpt(tmp_path / "run", 4), device="cuda")
    loaded = quantized_layers(policy.model)
    assert loaded.keys() == layers.keys()
    for name, module in loaded.items():
        assert module.weight.device.type == "cuda" and torch.equal(module.weight.data, layers[name].weight.data)
        assert torch.equal(module.weight.quant_state.absmax, layers[name].weight.quant_state.absmax)


# ----------------------------------------------------------------------------- 8-bit AdamW
def test_adamw8bit_follows_adamw_group_by_group(tmp_path):
    """Same gradients into AdamW and AdamW8bit over the recipe's groups (the action head at 10x the
    LR, biases and norms without decay): the 8-bit moments of the large weights move them as fp32
    moments do, to the rounding of 8-bit block-wise quantisation."""
    from vla_ft import optim

    deltas, states = [], []
    for name in ("adamw", "adamw8bit"):
        recipe = tiny_recipe(tmp_path, f"optim.name={name}", "optim.groups.action_head.lr=3e-3", "optim.lr=3e-4")
        torch.manual_seed(0)
        model = build_model(recipe, **DIMS)
        model.set_frozen(optim.frozen_at(recipe, model, 0))
        opt = optim.make_optimizer(recipe, model, [], torch.device("cpu"))
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        g = torch.Generator().manual_seed(1)
        for step in range(5):
            optim.set_lr(recipe, opt, step + 20)  # after the warmup
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=g) if p.requires_grad else None
            opt.step()
        assert all(group["betas"] == (0.9, 0.95) and group["eps"] == 1e-8 for group in opt.param_groups)  # the recipe's
        deltas.append({n: p.detach() - start[n] for n, p in model.named_parameters()})
        states.append(opt.state)
    eight_bit = [
        n for n, p in model.named_parameters() if states[1][p].get("state1", torch.empty(0)).dtype == torch.uint8
    ]
    assert "vision_encoder.backbones.0.patch_embed.proj.weight" in eight_bit and len(eight_bit) >= 3
    head = "action_head.0.weight"
    assert deltas[0][head].abs().mean() > 5 * deltas[0]["projector.weight"].abs().mean()  # the head's own LR
    for n in deltas[0]:
        d32, d8 = deltas[0][n], deltas[1][n]
        assert (d8 - d32).norm() <= 0.05 * d32.norm() + 1e-7, n


def test_adamw8bit_resumes_exactly(tmp_path):
    overrides = [*FAST, "optim.name=adamw8bit", "train.steps=4", "checkpoint.every=2"]
    straight = tmp_path / "straight"
    assert run_forked(train_argv(straight, overrides), tmp_path / "straight.txt") == 0
    saved = torch.load(ckpt(straight, 2) / "optimizer.pt", weights_only=True)
    assert any(
        torch.is_tensor(v) and v.dtype == torch.uint8 for entry in saved["state"].values() for v in _tensors(entry)
    )
    assert_resume_reproduces(straight, overrides, tmp_path)


def _tensors(entry):
    for value in entry.values():
        yield from _tensors(value) if isinstance(value, dict) else [value]


def test_adamw8bit_refusals_name_the_key(tmp_path, monkeypatch):
    with pytest.raises(RecipeError, match="optim.name: adamw8bit: FSDP cannot shard"):
        tiny_recipe(tmp_path, "optim.name=adamw8bit", "distributed.strategy=fsdp")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name))
    with pytest.raises(RecipeError, match="optim.name: adamw8bit: needs bitsandbytes"):
        tiny_recipe(tmp_path, "optim.name=adamw8bit")


def test_a_pretrained_lm_loads_in_bf16_for_quantising_and_keeps_the_rest_fp32(tmp_path, monkeypatch):
    """Loading in bf16 halves the host memory of the load; the hub weights are bf16, so the codes are
    those of the same weights loaded in fp32, and what stays full precision is fp32 as before."""
    import bitsandbytes as bnb
    from tiny_models import save_lm_dir, save_tokenizer_dir
    from transformers import AutoModelForCausalLM

    from vla_ft.quantize import quantized_layers

    saved = save_lm_dir(tmp_path / "lm", dtype=torch.bfloat16)
    save_tokenizer_dir(tmp_path / "tok")
    dtypes, real = [], AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(
        AutoModelForCausalLM, "from_pretrained", lambda *a, **k: (dtypes.append(k["dtype"]), real(*a, **k))[1]
    )
    recipe = tiny_recipe(
        tmp_path,
        *QLORA,
        f"model.language.name={tmp_path / 'lm'}",
        "model.language.config={}",
        f"model.language.tokenizer={tmp_path / 'tok'}",
    )
    model = build_model(recipe, **DIMS)
    assert dtypes == [torch.bfloat16]
    lm = model.language_model
    rest = {n: p for n, p in lm.named_parameters() if p.is_floating_point()}
    assert rest and all(p.dtype == torch.float32 for p in rest.values())
    embed = next(p for n, p in rest.items() if n.endswith("embed_tokens.weight"))
    assert torch.equal(embed, saved["model.embed_tokens.weight"].float())
    assert len(quantized_layers(model)) == len(LINEARS)
    for name, layer in quantized_layers(model).items():
        key = name.removeprefix("language_model.base_model.model.").removesuffix(".base_layer") + ".weight"
        ref = bnb.nn.Params4bit(saved[key].float(), requires_grad=False, quant_type="nf4", compress_statistics=True)
        ref = ref.to("cpu")
        assert torch.equal(layer.weight.data, ref.data), name  # the codes of the fp32 load
