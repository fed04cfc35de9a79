"""The speed benchmark's CPU smoke mode (tiny model, 3 steps per row) runs every code path that
does not need a GPU, so the script cannot rot: the textbook loop, vla-ft's step in each regime,
and HF Trainer with the same model and loss."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark(name: str = "train_throughput"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_train_throughput_smoke(tmp_path, capsys, monkeypatch):
    from vla_ft.ema import WeightEMA

    updates, update = [], WeightEMA.update
    monkeypatch.setattr(WeightEMA, "update", lambda self, *args: (updates.append(1), update(self, *args))[1])
    bench = load_benchmark()
    out = tmp_path / "bench.json"
    rows = bench.main(["--smoke", "--out", str(out)])

    assert [r["row"] for r in rows] == list(bench.SMOKE_ROWS)
    for r in rows:
        assert r["step_ms"] > 0 and r["samples_s"] > 0 and r["tflops"] > 0, r
        assert math.isnan(r["mfu"])  # no peak on a CPU
    saved = json.loads(out.read_text())
    assert [r["row"] for r in saved["rows"]] == list(bench.SMOKE_ROWS)
    assert all(
        len(saved["losses"][name]) == 3 and all(map(math.isfinite, saved["losses"][name])) for name in bench.SMOKE_ROWS
    )
    # identical inputs, seed and initial weights: every contender's first loss is the same number,
    # except the head-only row (a different model state: frozen trunk, no language term) and QLoRA (a 4-bit LM)
    other = ("vla_head", "vla_lora", "vla_qlora")
    first = {name: saved["losses"][name][0] for name in bench.SMOKE_ROWS if name not in other}
    assert max(first.values()) - min(first.values()) < 1e-4, first
    assert "row" in capsys.readouterr().out  # the table was printed
    assert len(updates) >= 3  # vla_full_ema's steps update its weight average (no other row has one)


def test_the_stock_model_has_none_of_vla_fts_rewrites():
    """hf_compile_stock's model: transformers' own "sdpa", the LM's own rotary module, timm's conv."""
    from vla_ft import lm_compile
    from vla_ft.backbones import PatchifyConv

    bench = load_benchmark()
    recipe = bench.load_recipe(bench.RECIPE, [*bench.COMMON, *bench.SMOKE])
    model, _ = bench.build_vla(recipe, bench.torch.device("cpu"))
    rewritten = {
        "attention": model.language_model.config._attn_implementation == lm_compile.NAME,
        "rotary": isinstance(model.decoder.rotary_emb, lm_compile.RotaryOnce),
        "patch": any(isinstance(m, PatchifyConv) for m in model.vision_encoder.modules()),
    }
    assert all(rewritten.values()), rewritten  # what the library builds
    bench.stock_model(model)
    assert model.language_model.config._attn_implementation == "sdpa"
    assert not isinstance(model.decoder.rotary_emb, lm_compile.RotaryOnce)
    assert not any(isinstance(m, PatchifyConv) for m in model.vision_encoder.modules())


def test_trace_summary_reads_a_chrome_trace(tmp_path):
    """``benchmarks/trace_summary.py`` on a small hand-made trace: time per kind and step,
    the largest kernels with their calls, pageable copies and the idle gap (by the events around it)."""
    spec = importlib.util.spec_from_file_location("trace_summary", ROOT / "benchmarks" / "trace_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    events = [  # two steps: a matmul, a 100 us gap, a pageable copy, a fused kernel, the update
        {"ph": "X", "cat": "kernel", "name": "nvjet_sm90_mm", "ts": 0, "dur": 1000},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD (Pageable -> Device)", "ts": 1100, "dur": 5},
        {"ph": "X", "cat": "kernel", "name": "triton_poi_fused_mul_silu_0", "ts": 1105, "dur": 300},
        {"ph": "X", "cat": "kernel", "name": "_adamw_kernel", "ts": 1405, "dur": 200},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 50},  # host side: not counted
    ]
    trace = {"traceEvents": events + [{**e, "ts": e["ts"] + 2000} for e in events]}
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(trace))
    text = module.main([str(path), "--steps", "2"])
    assert "1.00  matmul (cuBLAS)" in text and "0.30  inductor fused kernels" in text
    assert "0.20  MasterAdamW update" in text and "pageable memory: 1 per step" in text
    assert "0.10  nvjet_sm90_mm -> Memcpy HtoD (Pageable -> Device)" in text  # 100 us per step
    assert "1.00     1.0   1000.0  nvjet_sm90_mm" in text  # ms per step, calls per step, us per call
    assert "GPU operations per step: 4 " in text


def test_lora_layer_smoke_checks_every_variant_against_peft(capsys):
    load_benchmark("lora_layer").main(["--smoke"])  # asserts each variant's output equals peft's
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [(r[0], r[2]) for r in rows[:3]] == [("q/o", "peft"), ("q/o", "fused"), ("q/o", "fused_nocat")]
    assert len(rows) == 12


def test_vision_grounding_smoke(capsys):
    rows = load_benchmark("vision_grounding").main(["--steps", "3", "--episodes", "4", "--threads", "1"])

    assert [(r["target"], r["position_init"]) for r in rows] == [
        ("arm", "sincos"),
        ("arm", "timm"),
        ("block", "sincos"),
        ("block", "timm"),
    ]
    assert all(len(r["errors"]) == 3 and all(map(math.isfinite, r["errors"])) and r["baseline"] > 0 for r in rows)
    assert rows[0]["errors"] != rows[1]["errors"]  # the init is what differs between the two rows
    assert "| named block | timm |" in capsys.readouterr().out
