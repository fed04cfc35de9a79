"""LM adjustments for compiled training: SDPA keeps its causal kernel (exact wherever a mask is
needed), and the rotary tables are computed once per forward."""

from __future__ import annotations

import re

import pytest
import torch
from tiny_models import tiny_recipe
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function

from vla_ft import lm_compile
from vla_ft.backbones import build_language_model


def tiny_lm(model_type: str, attn: str, layers: int = 2) -> torch.nn.Module:
    """A tiny LM built with ``attn`` and then treated as ``build_language_model`` treats its LM
    (``sdpa`` becomes :data:`vla_ft.lm_compile.NAME`), rotary module left as it is."""
    cfg = AutoConfig.for_model(
        model_type, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).eval()
    lm_compile.use_causal_sdpa(lm)
    return lm


def sdpa_calls(fn, *args, **kwargs) -> list[dict]:
    """The SDPA calls in the graph dynamo traces for ``fn(*args, **kwargs)``: each call's keyword arguments."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=capture, dynamic=False)(*args, **kwargs)
    sdpa = (torch.nn.functional.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
    return [dict(n.kwargs) for g in graphs for n in g.graph.nodes if n.op == "call_function" and n.target in sdpa]


def test_the_recipes_sdpa_builds_the_registered_implementation(tmp_path):
    recipe = tiny_recipe(tmp_path)
    assert recipe.model.language.attn_implementation == "sdpa"
    lm = build_language_model(recipe.model, vocab_size=284)
    assert lm.config._attn_implementation == lm_compile.NAME
    assert tiny_lm("qwen2", "eager").config._attn_implementation == "eager"  # eager attention needs its mask


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_compiled_lm_runs_lm_compile_with_grouped_kv(model_type):
    """What the reference step gets: no (B, 1, L, L) mask, is_causal, K/V not expanded.

    transformers 5.17 with torch 2.11 (the GPU machine's stack) builds the mask while tracing with
    plain "sdpa", so this fails there without :mod:`vla_ft.lm_compile`."""
    lm = tiny_lm(model_type, "sdpa").train()
    embeds = torch.randn(3, 10, 32)
    calls = sdpa_calls(lambda x: lm.model(inputs_embeds=x).last_hidden_state, embeds)
    assert len(calls) == 2
    for kw in calls:
        assert kw.get("attn_mask") is None and kw["is_causal"] is True and kw.get("enable_gqa") is True, kw


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_outputs_equal_eager_attention_with_and_without_padding(model_type):
    ours, ref = tiny_lm(model_type, "sdpa"), tiny_lm(model_type, "eager")
    ids = torch.randint(0, 64, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding: the mask function must defer to transformers' SDPA mask
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            got, want = ours(input_ids=ids, **kwargs).logits, ref(input_ids=ids, **kwargs).logits
            real = kwargs["attention_mask"].bool() if kwargs else torch.ones_like(ids, dtype=torch.bool)
            torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)


def test_generation_with_a_kv_cache_equals_eager_attention():
    ours, ref = tiny_lm("qwen2", "sdpa"), tiny_lm("qwen2", "eager")
    prompt = torch.randint(0, 64, (2, 5))
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(ours.generate(prompt, **kwargs), ref.generate(prompt, **kwargs))


@pytest.mark.parametrize(
    ("change", "plain"),
    [
        ({}, True),
        ({"attention_mask": torch.ones(2, 6, dtype=torch.bool)}, False),
        ({"mask_function": sliding_window_causal_mask_function(4)}, False),
        ({"q_offset": 2, "q_length": 4}, False),
        ({"q_length": 1}, False),
        ({"allow_is_causal_skip": False}, False),
    ],
)
def test_only_a_plain_causal_prefill_skips_the_mask(change, plain):
    kwargs = {
        "batch_size": 2, "q_length": 6, "kv_length": 6, "q_offset": 0, "kv_offset": 0,
        "mask_function": causal_mask_function, "attention_mask": None, "allow_is_causal_skip": True,
    }  # fmt: skip
    kwargs.update(change)
    assert lm_compile.is_plain_causal_prefill(kwargs) is plain
    old_api = {k: v for k, v in kwargs.items() if k not in ("q_length", "q_offset")}  # transformers 4.5x
    old_api["cache_position"] = torch.arange(kwargs["q_offset"], kwargs["q_offset"] + kwargs["q_length"])
    assert lm_compile.is_plain_causal_prefill(old_api) is plain


def rotary_lm(layers: int, once: bool) -> torch.nn.Module:
    lm = tiny_lm("qwen2", "sdpa", layers=layers)
    if once:
        lm_compile.compute_rotary_once(lm.get_decoder())
    return lm


def test_rotary_once_changes_no_output_or_gradient():
    plain, once = rotary_lm(2, once=False), rotary_lm(2, once=True)
    assert isinstance(once.get_decoder().rotary_emb, lm_compile.RotaryOnce)
    assert once.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(2, 7, 32, requires_grad=True)
    outs = [lm.model(inputs_embeds=x).last_hidden_state for lm in (plain, once)]
    torch.testing.assert_close(outs[1], outs[0], atol=0, rtol=0)
    grads = [
        torch.autograd.grad(out.square().sum(), [x, *lm.model.layers.parameters()])
        for out, lm in zip(outs, (plain, once), strict=True)
    ]
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_compiled_step_computes_the_rotary_tables_once_whatever_the_depth():
    """Inductor would otherwise inline cos/sin into every layer's rotation, forward and backward."""
    from torch._inductor.utils import run_and_get_code

    def cos_calls(layers: int) -> int:
        lm = rotary_lm(layers, once=True).train()

        def step(x):
            out = lm.model(inputs_embeds=x).last_hidden_state
            out.square().mean().backward()

        torch._dynamo.reset()
        _, code = run_and_get_code(torch.compile(step), torch.randn(2, 7, 32, requires_grad=True))
        return len(re.findall(r"\bcos\(", "\n".join(code)))

    assert 0 < cos_calls(1) == cos_calls(4)


def test_rotary_once_passes_every_argument_and_attribute_through():
    """Gemma 3 calls its rotary module with a layer type; others read attributes of it."""
    cfg = AutoConfig.for_model(
        "gemma3_text", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=4, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(cfg).eval()
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        want = lm.model(inputs_embeds=x).last_hidden_state
        rotary = lm.model.rotary_emb
        lm_compile.compute_rotary_once(lm.model)
        assert isinstance(lm.model.rotary_emb, lm_compile.RotaryOnce) and lm.model.rotary_emb.config is rotary.config
        torch.testing.assert_close(lm.model(inputs_embeds=x).last_hidden_state, want, atol=0, rtol=0)


def test_a_rotary_module_with_saved_state_is_left_as_it_is():
    decoder = torch.nn.Module()
    decoder.rotary_emb = torch.nn.Module()
    decoder.rotary_emb.register_buffer("alpha", torch.zeros(4))  # persistent: wrapping would rename its key
    lm_compile.compute_rotary_once(decoder)
    assert type(decoder.rotary_emb) is torch.nn.Module


def test_a_model_that_dispatches_on_the_name_sdpa_keeps_it(tmp_path):
    """Falcon (transformers < 5.25) picks its attention classes by the literal name: built as lm_compile.NAME
    it raised KeyError. Since 5.25 it calls the attention interface and can take lm_compile.NAME."""
    from transformers.models.falcon import modeling_falcon

    cfg = AutoConfig.for_model("falcon", vocab_size=284, hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
    lm = build_language_model(tiny_recipe(tmp_path).model, vocab_size=284, config=cfg)
    by_name = hasattr(modeling_falcon, "FALCON_ATTENTION_CLASSES")
    assert lm.config._attn_implementation == ("sdpa" if by_name else lm_compile.NAME)
    assert lm.get_decoder()(inputs_embeds=torch.randn(2, 5, 32)).last_hidden_state.shape == (2, 5, 32)
