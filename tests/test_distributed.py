"""Data-parallel training on CPU: gloo, 2 processes forked from the test process (no re-import;
spawned where CUDA exists, since autograd's device threads do not survive a fork).

The reference is an independent single-process run of the same recipe with the same global
batch (2 processes x batch 2 = 1 process x batch 4): the sampler gives both the same samples
per step, so losses and weights must agree up to float32 rounding. Tolerance: 1e-5 relative on
per-step losses and 1e-5 absolute on weights: the global mean is summed in another order
(each rank's share of the pooled terms averaged by gloo vs one batch of 4), and over 9 Adam
steps that stays at rounding level. The ranks' batches hold different numbers of language
target tokens and of action steps padded at the episode end (chunk 4 over 10-frame episodes):
each term is pooled over the valid elements of every rank (``vla_ft.train.term_shares``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from conftest import QUICKSTART, TINY, WIDE_LM
from safetensors.torch import load_file

from vla_ft import distributed, extensions
from vla_ft.cli import main as cli
from vla_ft.config import RecipeError, load_recipe
from vla_ft.run_setup import build_components, setup, teardown
from vla_ft.run_state import check_resume_compatible, read_saved_recipe
from vla_ft.train import main

# Vision frozen until update 3 (staged unfreeze); the gripper head trains but its term has
# weight 0, so it never gets a gradient (DDP's unused-parameter case); the action term's
# weight is learned (uncertainty): a parameter outside DDP whose gradient must be averaged.
# FiLM trains from the start, through the frozen encoder's blocks (hooks on FSDP's units).
RECIPE = [
    *TINY,
    "model.vision.film=true",
    "train.device=cpu",  # gloo on CPU even where CUDA exists
    "data.chunk=4",
    "data.synthetic.episode_length=10",
    "loss.weights.gripper=0",
    "loss.strategy=uncertainty",
    "freeze.vision_encoder=true",
    "unfreeze.vision_encoder.at_step=3",
    "train.steps=9",
    "checkpoint.keep_last=5",
]
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-5


# ----------------------------------------------------------------------------- helpers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, overrides: list[str], faults: dict[str, int]) -> None:
    """One rank, as torchrun would start it: environment, then the ordinary ``train.main``."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        TOKENIZERS_PARALLELISM="false",
    )
    torch.set_num_threads(1)
    runs = []
    extensions.INSTALLERS.append(runs.append)  # after distributed.install: sees the wrapped run
    reduce_scatters = _count_reduce_scatters(runs)
    if faults:
        extensions.INSTALLERS.append(lambda run: _inject(run, faults))
    main(load_recipe(QUICKSTART, overrides))
    run = runs[0]
    report = {"step": run.state.step, "skipped": run.state.skipped}
    report["loss_state"] = {k: v.tolist() for k, v in run.loss_fn.state_dict().items()}  # DWA, log-variances
    report["reduce_scatters"] = reduce_scatters
    if run.recipe.distributed.strategy == "ddp":  # FSDP ranks hold different shards
        digest = hashlib.sha256()
        for value in run.model.state_dict().values():
            digest.update(value.detach().contiguous().numpy().tobytes())
        report["digest"] = digest.hexdigest()
    (Path(run.run_dir) / f"rank{rank}.json").write_text(json.dumps(report))


def _count_reduce_scatters(runs: list) -> list[int]:
    """Reduce-scatters (FSDP2's gradient reduction) in each training micro-batch, counted from its
    forward to the next one's (the step's update in between reduces nothing this way), in this
    forked rank only. FSDP2 calls ``dist.reduce_scatter_tensor`` (torch 2.11) or
    ``dist.reduce_scatter_single`` (newer) through the module at call time: both are counted, a call
    of one inside the other once."""
    counts: list[int] = []
    depth = [0]

    def counting(real):
        def counted(*args, **kwargs):
            if counts and depth[0] == 0:
                counts[-1] += 1
            depth[0] += 1
            try:
                return real(*args, **kwargs)
            finally:
                depth[0] -= 1

        return counted

    def watch(run) -> None:
        forward = run.forward

        def forward_counted(batch):
            if run.model.training:  # validation forwards have no backward
                counts.append(0)
            return forward(batch)

        run.forward = forward_counted

    for name in ("reduce_scatter_tensor", "reduce_scatter_single"):
        if hasattr(dist, name):
            setattr(dist, name, counting(getattr(dist, name)))
    extensions.INSTALLERS.append(watch)
    return counts


def _inject(run, faults: dict[str, int]) -> None:
    """Poison one rank's gradient *after* DDP's all-reduce, so only the rank agreement can save
    the other rank from stepping alone; send SIGTERM to one rank only."""
    clip, fired = run.hooks.clip_grad_norm, set()

    def once(kind: str) -> bool:  # a skipped update is retried with the same index: fire one time
        due = run.rt.rank == faults[f"{kind}_rank"] and run.state.step == faults[f"{kind}_update"]
        if due and kind not in fired:
            fired.add(kind)
            return True
        return False

    def faulty_clip(run, max_norm):
        if once("poison"):
            run.trainable_params()[0].grad.fill_(float("nan"))
        if once("sigterm"):
            os.kill(os.getpid(), signal.SIGTERM)
        return clip(run, max_norm)

    run.hooks.clip_grad_norm = faulty_clip


def train_2_processes(run_dir: Path, overrides: list[str], faults: dict[str, int] | None = None) -> list[dict]:
    args = (2, _free_port(), [*overrides, f"output_dir={run_dir}"], faults or {})
    method = "spawn" if torch.cuda.is_available() else "fork"  # autograd's CUDA threads break forks
    mp.start_processes(_worker, args=args, nprocs=2, start_method=method)  # raises if a rank failed
    return [json.loads((run_dir / f"rank{r}.json").read_text()) for r in range(2)]


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step_{step:06d}" / "model.safetensors"))


def assert_losses_match(got: dict[int, float], ref: dict[int, float], steps: range) -> None:
    assert sorted(got) == list(steps)
    for s in steps:
        assert got[s] == pytest.approx(ref[s], rel=LOSS_RTOL), f"step {s}: {got[s]} vs {ref[s]}"


def max_weight_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def resume_on_one_process(src: Path, dst: Path, from_step: int) -> None:
    """Copy a 2-process run, drop what it wrote after ``from_step``, continue with batch 4."""
    shutil.copytree(src, dst)
    for ckpt in (dst / "checkpoints").glob("step_*"):
        if int(ckpt.name.split("_")[1]) > from_step:
            shutil.rmtree(ckpt)
    (dst / "checkpoints" / "latest").write_text(f"step_{from_step:06d}")
    with pytest.warns(UserWarning, match="saved by 2 processes"):
        main(load_recipe(QUICKSTART, [*RECIPE, "train.batch_size=4", "train.resume=true", f"output_dir={dst}"]))


# ----------------------------------------------------------------------------- runs shared by the tests
@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """The reference: one process, batch 4 (also imports everything before the forks)."""
    run_dir = tmp_path_factory.mktemp("single") / "run"
    main(load_recipe(QUICKSTART, [*RECIPE, "train.batch_size=4", f"output_dir={run_dir}"]))
    return run_dir


@pytest.fixture(scope="module")
def ddp(single, tmp_path_factory) -> tuple[Path, list[dict]]:
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    return run_dir, train_2_processes(run_dir, [*RECIPE, "train.batch_size=2"])


# ----------------------------------------------------------------------------- DDP
def test_ddp_losses_equal_one_process_with_the_global_batch(single, ddp):
    run_dir, ranks = ddp
    assert_losses_match(losses(run_dir), losses(single), range(1, 10))
    assert max_weight_diff(weights(run_dir, 9), weights(single, 9)) < WEIGHT_ATOL
    assert ranks[0] == ranks[1] and ranks[0]["step"] == 9  # same step count and bit-identical weights


def test_ddp_validation_metrics_are_those_of_one_process(single, ddp):
    """Every rank validates the whole set (:class:`vla_ft.samplers.ValidationSampler`), so the logged mean
    over ranks is one process's value: perplexity, a ratio of token sums, included."""
    rows = {}
    for name, run_dir in (("single", single), ("ddp", ddp[0])):
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        rows[name] = [r for r in map(json.loads, lines) if "val/perplexity" in r]
    assert [r["step"] for r in rows["ddp"]] == [r["step"] for r in rows["single"]] == [3, 6, 9]
    for one, two in zip(rows["single"], rows["ddp"], strict=True):
        keys = [k for k in one if k.startswith("val/") and not k.startswith("val/loss/")]
        assert "val/token_acc" in keys and "val/action_l1" in keys
        # no label smoothing: the token-weighted language loss is the log of the perplexity
        assert math.exp(one["val/loss/language"]) == pytest.approx(one["val/perplexity"], rel=1e-5)
        for key in keys:
            assert two[key] == pytest.approx(one[key], rel=1e-4, nan_ok=True), (one["step"], key)


def test_ddp_training_metrics_are_pooled_over_the_ranks_as_one_process(single, ddp):
    """The ranks' batches hold different numbers of language target tokens: the logged metric/* was
    the mean of the ranks' ratios. Each step's counts are summed over the ranks (and micro-batches),
    so the log holds one process's metric of the global batch."""
    rows = {}
    for name, run_dir in (("single", single), ("ddp", ddp[0])):
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        rows[name] = {r["step"]: r for r in map(json.loads, lines) if "loss" in r}
    assert sorted(rows["ddp"]) == sorted(rows["single"]) == list(range(1, 10))
    for step, one in rows["single"].items():
        for key in ("metric/token_acc", "metric/perplexity"):
            assert rows["ddp"][step][key] == pytest.approx(one[key], rel=1e-4), (step, key)


def test_ddp_accumulation_trains_as_one_process_with_the_global_batch(single, tmp_path):
    """2 processes x batch 1 x accumulation 2: the first micro-batch's backward runs under DDP's
    ``no_sync`` (gradients kept local), the last one's all-reduces the sum, so the update is one
    process's with batch 4, metrics pooled over micro-batches and ranks alike."""
    run_dir = tmp_path / "accumulated"
    ranks = train_2_processes(run_dir, [*RECIPE, "train.batch_size=1", "optim.accumulation=2"])
    assert ranks[0] == ranks[1] and ranks[0]["step"] == 9  # bit-identical weights on both ranks
    assert_losses_match(losses(run_dir), losses(single), range(1, 10))
    assert max_weight_diff(weights(run_dir, 9), weights(single, 9)) < WEIGHT_ATOL
    one, two = ([json.loads(r) for r in (d / "metrics.jsonl").read_text().splitlines()] for d in (single, run_dir))
    one, two = ({r["step"]: r for r in rows if "loss" in r} for rows in (one, two))
    for step in range(1, 10):
        assert two[step]["metric/token_acc"] == pytest.approx(one[step]["metric/token_acc"], rel=1e-4), step


def test_staged_unfreeze_and_unused_head_under_ddp(ddp):
    run_dir, _ = ddp
    recipe = load_recipe(QUICKSTART, [*RECIPE, f"output_dir={run_dir}"])
    initial = build_components(recipe, torch.device("cpu"))[0].state_dict()  # the seeded init
    at3, at6, at9 = weights(run_dir, 3), weights(run_dir, 6), weights(run_dir, 9)
    vision = [k for k in at3 if k.startswith("vision_encoder.")]
    gripper = [k for k in at3 if k.startswith("gripper_head.")]
    assert vision and gripper
    # frozen for updates 0-2, trained from update 3 on: DDP was re-wrapped with its parameters
    assert all(torch.equal(at3[k], initial[k]) for k in vision)
    assert all(not torch.equal(at3[k], at6[k]) for k in vision)
    # trainable but without a gradient (its term has weight 0): tolerated by DDP, never moved
    assert all(torch.equal(initial[k], at9[k]) for k in gripper)
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert sum('"loss":' in row for row in rows) == 9  # rank 0 logs, rank 1 does not


def test_two_process_checkpoint_resumes_on_one_process(single, ddp, tmp_path):
    run_dir, _ = ddp
    resumed = tmp_path / "resumed"
    resume_on_one_process(run_dir, resumed, from_step=6)
    assert_losses_match(losses(resumed), losses(single), range(1, 10))  # 1-6 copied, 7-9 trained here
    assert max_weight_diff(weights(resumed, 9), weights(single, 9)) < WEIGHT_ATOL


def test_dwa_ranks_apply_the_same_lambdas_from_the_statistics_of_every_rank(tmp_path):
    """DWA's window sums are fed each rank's own micro-batch means, which differ between ranks;
    they are averaged over ranks after every step (``distributed.sync_outside_wrapper``), so every
    rank closes its windows on the same averages and applies the same lambdas (DDP would
    average gradients of differently weighted objectives otherwise, unseen in the weights)."""
    dwa = [*RECIPE, "loss.strategy=dwa", "loss.dwa_window=1", "train.batch_size=2"]
    ranks = train_2_processes(tmp_path / "two", dwa)
    states = [r["loss_state"] for r in ranks]
    assert states[0] == states[1]
    assert states[0]["weighting.windows"] >= 2 and states[0]["weighting.lam"] != [1.0] * len(states[0]["weighting.lam"])


def test_ddp_keeps_the_average_one_process_keeps(tmp_path):
    """Each rank averages the same weights; rank 0 saves them (learned loss weights stay out)."""
    ema = [*RECIPE, "train.ema_decay=0.5"]
    main(load_recipe(QUICKSTART, [*ema, "train.batch_size=4", f"output_dir={tmp_path / 'one'}"]))
    ranks = train_2_processes(tmp_path / "two", [*ema, "train.batch_size=2"])
    assert ranks[0] == ranks[1]
    one, two = (
        load_file(str(tmp_path / d / "checkpoints" / "step_000009" / "ema.safetensors")) for d in ("one", "two")
    )
    assert max_weight_diff(one, two) < WEIGHT_ATOL
    trained = weights(tmp_path / "two", 9)
    assert max(float((two[k] - trained[k]).abs().max()) for k in two if k in trained) > 10 * WEIGHT_ATOL


def test_qlora_under_ddp_trains_as_one_process(tmp_path):
    """4-bit LM codes made on each rank alike (no broadcast of their statistics), LoRA adapters averaged."""
    pytest.importorskip("bitsandbytes")
    qlora = [*RECIPE, *WIDE_LM, "model.language.quantize=nf4", "model.lora.enabled=true", "model.lora.r=4"]
    qlora.append("train.steps=4")
    main(load_recipe(QUICKSTART, [*qlora, "train.batch_size=4", f"output_dir={tmp_path / 'one'}"]))
    train_2_processes(tmp_path / "two", [*qlora, "train.batch_size=2"])
    assert_losses_match(losses(tmp_path / "two"), losses(tmp_path / "one"), range(1, 5))
    assert max_weight_diff(weights(tmp_path / "one", 4), weights(tmp_path / "two", 4)) < WEIGHT_ATOL


def test_resume_refuses_a_changed_global_batch(ddp):
    run_dir, _ = ddp
    ckpt = run_dir / "checkpoints" / "step_000006"
    same_per_device = load_recipe(QUICKSTART, [*RECIPE, "train.batch_size=2", f"output_dir={run_dir}"])
    with pytest.raises(RecipeError, match=r"global batch .* 2 x 1 x 2 = 4 -> 2 x 1 x 1 = 2 \(train.batch_size=4"):
        check_resume_compatible(read_saved_recipe(ckpt), same_per_device, ckpt, world_size=1)


def test_ranks_agree_on_a_gradient_poisoned_on_one_rank(single, tmp_path, capfd):
    faults = {"poison_rank": 1, "poison_update": 1, "sigterm_rank": 0, "sigterm_update": 3}
    ranks = train_2_processes(tmp_path / "run", [*RECIPE, "train.batch_size=2"], faults)
    # Both skipped update 1, then both stopped after SIGTERM reached rank 0 only, in step.
    assert ranks[0] == ranks[1]
    assert ranks[0]["skipped"] == 1 and ranks[0]["step"] == 4
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_000004"
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3, 4]
    out = capfd.readouterr().out
    assert "ddp over 2 processes (gloo, cpu); global batch 4 = 2 per device x 1 accumulation x 2 processes" in out


def test_a_second_stage_under_ddp_trains_as_one_process(single, tmp_path, capsys):
    """``model.init_from`` on 2 processes: every rank builds the source's LM and loads its weights
    (the action queries start fresh for another chunk), then trains as one process with the global batch."""
    stage = [*RECIPE, f"model.init_from={single}", "data.chunk=3", "train.steps=3", "unfreeze.vision_encoder.at_step=1"]
    one, two = tmp_path / "one", tmp_path / "two"
    main(load_recipe(QUICKSTART, [*stage, "train.batch_size=4", f"output_dir={one}"]))
    source = single / "checkpoints" / "step_000009"
    assert f"model.init_from: weights of {source}; fresh: action_queries" in capsys.readouterr().out
    ranks = train_2_processes(two, [*stage, "train.batch_size=2"])
    assert ranks[0] == ranks[1] and ranks[0]["step"] == 3
    assert_losses_match(losses(two), losses(one), range(1, 4))
    # The vision encoder unfreezes at update 1 here, so its weights have seen Adam's first steps, which
    # divide each gradient element by its own size: where an element is near zero, the two summation
    # orders' rounding moves its weight by a visible fraction of one update (2e-3). Measured: 8e-6 on
    # the 2-core CPU box, 1.6e-5 on the GPU host's CPU (patch_embed.proj.weight both times).
    assert max_weight_diff(weights(two, 3), weights(one, 3)) < 5e-5


# ----------------------------------------------------------------------------- FSDP2
@pytest.fixture(scope="module")
def fsdp(single, tmp_path_factory) -> tuple[Path, list[dict]]:
    run_dir = tmp_path_factory.mktemp("fsdp") / "run"
    return run_dir, train_2_processes(run_dir, [*RECIPE, "train.batch_size=2", "distributed.strategy=fsdp"])


def test_fsdp_matches_resumes_on_one_process_and_consolidates(single, fsdp, tmp_path):
    run_dir, ranks = fsdp
    assert ranks[0] == ranks[1] and (ranks[0]["step"], ranks[0]["skipped"]) == (9, 0)
    assert_losses_match(losses(run_dir), losses(single), range(1, 10))
    ckpt = run_dir / "checkpoints" / "step_000009"
    assert (ckpt / distributed.DCP_DIR).is_dir() and not (ckpt / "model.safetensors").exists()

    resumed = tmp_path / "resumed"  # the sharded checkpoint of update 6, read whole by one process
    resume_on_one_process(run_dir, resumed, from_step=6)
    assert_losses_match(losses(resumed), losses(single), range(1, 10))
    assert max_weight_diff(weights(resumed, 9), weights(single, 9)) < WEIGHT_ATOL

    assert cli(["consolidate", str(ckpt)]) == 0  # the shards -> the single-file format inference loads
    assert max_weight_diff(weights(run_dir, 9), weights(single, 9)) < WEIGHT_ATOL
    from vla_ft.model_files import load_model

    model, _ = load_model(ckpt)  # strict load: tied LM embeddings are stored once, as save_model does
    loaded, saved = model.state_dict(), weights(run_dir, 9)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)


def test_fsdp_accumulation_reduce_scatters_once_per_step(single, fsdp, tmp_path):
    """FSDP2 has no ``no_sync()`` (DDP's, which the loop looked for): every micro-batch reduce-scattered
    its gradients, right but ``optim.accumulation`` times the communication. With accumulation 2 the
    first micro-batch of a step reduces nothing and the last one what a step without accumulation does
    (the same units, each once), and the run still trains as one process with the global batch."""
    run_dir = tmp_path / "accumulated"
    split = ["train.batch_size=1", "optim.accumulation=2", "distributed.strategy=fsdp"]
    ranks = train_2_processes(run_dir, [*RECIPE, *split])
    assert ranks[0]["reduce_scatters"] == ranks[1]["reduce_scatters"]
    per_micro, per_step = ranks[0]["reduce_scatters"], fsdp[1][0]["reduce_scatters"]
    assert len(per_micro) == 2 * len(per_step) == 18 and min(per_step) > 0
    assert per_micro[0::2] == [0] * 9  # not the last micro-batch: no communication
    assert per_micro[1::2] == per_step
    assert_losses_match(losses(run_dir), losses(single), range(1, 10))
    merged = distributed.consolidate(run_dir / "checkpoints" / "step_000009", out=tmp_path / "merged.safetensors")
    assert max_weight_diff(load_file(str(merged)), weights(single, 9)) < WEIGHT_ATOL


def test_fsdp_gradient_sync_is_back_on_after_a_micro_batch_that_raises():
    """A micro-batch that raises (or a step skipped after it) must not leave FSDP2 reducing nothing."""
    calls: list[bool] = []
    run = SimpleNamespace(model=SimpleNamespace(set_requires_gradient_sync=calls.append))
    with pytest.raises(RuntimeError, match="backward failed"), distributed.paused_gradient_sync(run):
        assert calls == [False]
        raise RuntimeError("backward failed")
    assert calls == [False, True]


def test_fsdp_checkpoint_resumes_on_one_process_with_bf16_weights(tmp_path):
    """On one GPU ``param_dtype`` auto is bf16 (FSDP's ranks had fp32 shards): the shards must fill
    the fp32 masters the optimizer updates, and the saved Adam moments go to those masters."""
    run_dir = tmp_path / "fsdp"
    short = [*RECIPE, "train.steps=2", "unfreeze.vision_encoder.at_step=1", "train.val_every=0"]
    train_2_processes(run_dir, [*short, "train.batch_size=2", "distributed.strategy=fsdp"])
    ckpt = run_dir / "checkpoints" / "step_000002"
    saved = load_file(str(distributed.consolidate(ckpt, out=tmp_path / "merged.safetensors")))
    bf16 = ["train.precision=bf16", "train.param_dtype=bf16", "train.batch_size=4", "train.resume=true"]
    run = setup(load_recipe(QUICKSTART, [*short, *bf16, f"output_dir={run_dir}"]))
    try:
        masters = run.model.master_weights
        names = {id(p): n for n, p in run.model.named_parameters(remove_duplicate=False) if n in saved}  # tied: once
        assert masters is not None and run.optimizer.state
        for p, m in zip(masters.params, masters.masters, strict=True):
            assert torch.equal(m, saved[names[id(p)]]), names[id(p)]  # fp32, exactly as saved
            assert torch.equal(p, m.to(p.dtype))
        assert all(id(p) in map(id, masters.masters) for p in run.optimizer.state if p.dim())
    finally:
        teardown(run)


def test_ddp_checkpoint_resumes_under_fsdp(single, ddp, tmp_path):
    """A single-file checkpoint (weights + Adam moments) sharded at install: the other way round."""
    run_dir = tmp_path / "ddp_then_fsdp"
    shutil.copytree(ddp[0], run_dir)
    for ckpt in (run_dir / "checkpoints").glob("step_*"):
        if int(ckpt.name.split("_")[1]) > 6:
            shutil.rmtree(ckpt)
    (run_dir / "checkpoints" / "latest").write_text("step_000006")
    train_2_processes(run_dir, [*RECIPE, "train.batch_size=2", "distributed.strategy=fsdp", "train.resume=true"])
    assert_losses_match(losses(run_dir), losses(single), range(1, 10))
    merged = distributed.consolidate(run_dir / "checkpoints" / "step_000009", out=tmp_path / "merged.safetensors")
    assert max_weight_diff(load_file(str(merged)), weights(single, 9)) < WEIGHT_ATOL


def _sweep_worker(rank: int, world: int, port: int, recipe: str, overrides: list[str]) -> None:
    import torch.distributed as dist

    from vla_ft.ablate import run_ablation

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ.update(WORLD_SIZE=str(world), TOKENIZERS_PARALLELISM="false")
    torch.set_num_threads(1)
    joined, real = [], dist.init_process_group
    dist.init_process_group = lambda *a, **k: joined.append(1) or real(*a, **k)
    assert run_ablation(recipe, overrides) == 0
    assert len(joined) == 1 and not dist.is_initialized()  # one group, left at the end


def test_a_sweep_under_torchrun_keeps_one_process_group_for_every_variant(tmp_path):
    """Each variant destroying and re-creating the gloo group raced its rendezvous: the second or
    third variant failed to connect or hung. Three variants run to the end on two processes."""
    recipe = tmp_path / "sweep.yaml"
    frozen = {"vision": {"freeze.vision_encoder": True}, "lm": {"freeze.language_model": True}}
    variants = {"full": {}, **{f"{name}_frozen": keys for name, keys in frozen.items()}}
    sweep = {"ablation": {"metric": "val/action_l1", "mode": "min", "variants": variants}}
    recipe.write_text(QUICKSTART.read_text() + "\n" + yaml.safe_dump(sweep))
    overrides = [*TINY, "train.batch_size=2", "train.steps=2", "train.val_every=2", f"output_dir={tmp_path / 'out'}"]
    method = "spawn" if torch.cuda.is_available() else "fork"
    mp.start_processes(_sweep_worker, args=(2, _free_port(), str(recipe), overrides), nprocs=2, start_method=method)
    rows = (tmp_path / "out" / "summary.csv").read_text().splitlines()
    assert sorted(r.split(",")[:2] for r in rows[1:]) == sorted([name, "finished"] for name in variants)


def test_fsdp_refuses_what_it_cannot_run():
    """At load, as `vla-ft validate` and a one-process run see it, not only under torchrun."""
    with pytest.raises(RecipeError, match="model.lora") as err:
        load_recipe(QUICKSTART, ["distributed.strategy=fsdp", "model.lora.enabled=true", "loss.grad_norm_every=5"])
    assert "loss.grad_norm_every" in str(err.value)
    load_recipe(QUICKSTART, ["distributed.strategy=ddp", "model.lora.enabled=true", "loss.grad_norm_every=5"])


def test_a_metric_one_rank_could_not_define_is_left_out_of_the_mean(monkeypatch):
    """Rank 1 saw no gripper transition (NaN): the global value is rank 0's; a NaN loss still shows."""
    per_rank = [
        {"metric/gripper_transition_acc": 0.5, "loss": 1.0},
        {"metric/gripper_transition_acc": math.nan, "loss": math.nan},
    ]

    def gather(out, obj):
        out[:] = per_rank

    monkeypatch.setattr(distributed.dist, "all_gather_object", gather)
    run = SimpleNamespace(rt=SimpleNamespace(world_size=2))
    got = distributed.mean_over_ranks(run, per_rank[0])
    assert got["metric/gripper_transition_acc"] == 0.5 and math.isnan(got["loss"])


def test_the_process_group_waits_as_long_as_the_recipe_says(monkeypatch):
    """distributed.timeout_min reaches init_process_group (rank 0 writing a checkpoint or the feature
    cache must not trip torch's 10-minute NCCL default); a non-positive one is refused."""
    from vla_ft import runtime

    seen = {}
    monkeypatch.setattr(runtime.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(runtime.dist, "init_process_group", lambda **kw: seen.update(kw))
    monkeypatch.setenv("WORLD_SIZE", "2")
    runtime.init_runtime(load_recipe(QUICKSTART, [*TINY, "train.device=cpu", "distributed.timeout_min=45"]))
    assert seen["backend"] == "gloo" and seen["timeout"].total_seconds() == 45 * 60
    with pytest.raises(RecipeError, match="distributed.timeout_min: must be finite and > 0, got 0.0"):
        load_recipe(QUICKSTART, [*TINY, "distributed.timeout_min=0"])


def test_a_two_process_run_with_dropout_resumes_on_two_processes_as_it_ran(tmp_path):
    """Each rank's LoRA dropout draws from its own RNG stream, which the ranks' batches (one sample each:
    narrations of 2 or 3 words, so language targets of different lengths) advance by different amounts.
    rng.pt held rank 0's stream only, which rank 1 then continued with: its masks, and from step 4 the
    losses, differed from the straight run's. The reference is that straight run, by the same two
    processes without stopping; a resume on the same number of processes continues it bit for bit."""
    dropout = [*RECIPE, "model.lora.enabled=true", "model.lora.dropout=0.3", "train.batch_size=1"]
    dropout += ["train.steps=5", "checkpoint.every=3", "unfreeze={}", "train.val_every=0"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_2_processes(straight, dropout)
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_000005")
    (resumed / "checkpoints" / "latest").write_text("step_000003")
    train_2_processes(resumed, [*dropout, "train.resume=true"])
    assert_losses_match(losses(resumed), losses(straight), range(1, 6))
    assert max_weight_diff(weights(resumed, 5), weights(straight, 5)) == 0.0
