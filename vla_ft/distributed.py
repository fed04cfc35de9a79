"""Data-parallel training under torchrun: DDP (default) or FSDP2, attached to the one loop.

``torchrun --nproc_per_node N -m vla_ft train RECIPE`` starts N copies of the ordinary run;
:mod:`vla_ft.runtime` joins the process group and :func:`install` (an entry of
``extensions.INSTALLERS``) wraps the model and sets the Run hooks the loop calls:

=================  ==========================================================================
hook               what it does here
=================  ==========================================================================
run.wrapped        DDP around ``run.model`` (FSDP2 shards ``run.model`` in place instead)
on_freeze_change   DDP only: re-wrap, so a staged unfreeze registers the new parameters
clip_grad_norm     averages what lives outside the wrapper (the loss's learned log-variances
                   and DWA statistics), then clips by the global norm (sharded under FSDP)
reduce_metrics     mean over ranks of logged values, so rank 0 logs the global numbers
no_sync            FSDP2 only (DDP has ``no_sync()``): no reduce-scatter on all but the last
                   micro-batch of a step (:func:`paused_gradient_sync`)
=================  ==========================================================================

Equivalence with one process: the sampler gives W processes with batch B the samples one
process sees with batch B*W, and DDP/FSDP average gradients over ranks. Each rank's masked
terms (padded chunk steps, variable-length language targets) are scaled by their share of the
valid elements of every rank (``vla_ft.train.term_shares``, one small all-reduce per step), so
that average is the single-process gradient, not a mean of per-rank means. The logged
``metric/*`` are pooled alike: each step's counts are summed over the ranks (another small
all-reduce, :mod:`vla_ft.train_metrics`), so every rank logs the global value. Frozen parameters
are never registered with DDP; a trainable parameter that gets no gradient in a step (a zero-weight term's head)
is tolerated through ``distributed.find_unused_parameters`` (on by default).

FSDP2 (``distributed.strategy: fsdp``): every LM decoder layer and ViT block is one
``fully_shard`` unit, the rest of the VLA the root unit. Parameters are gathered in the
autocast dtype of ``train.precision`` (bf16 on CUDA) and gradients reduced in fp32.
Checkpoints hold ``model_dcp/`` (torch.distributed.checkpoint) instead of
``model.safetensors``/``optimizer.pt``: every rank writes its shards, and any number of
processes (one included) can resume from them; :func:`consolidate` turns them into the
single-file ``model.safetensors`` that inference loads (``vla-ft consolidate CHECKPOINT``).

Several nodes: the same command on every node, torchrun's c10d rendezvous joins them::

    torchrun --nnodes 2 --nproc_per_node 8 --node_rank $NODE_RANK \\
        --rdzv_backend c10d --rdzv_endpoint $HEAD_NODE:29400 --rdzv_id my-run \\
        -m vla_ft train recipes/ddp.yaml output_dir=/shared/runs/my-run

``output_dir`` must be on a filesystem every node sees (FSDP checkpoints are written by
every rank). The global batch, printed at start, is ``train.batch_size x
optim.accumulation x processes``; resuming on another number of processes requires the
same global batch (adjust ``train.batch_size``).
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from vla_ft import checkpoint as ck
from vla_ft.config import Recipe
from vla_ft.master_weights import optimized

if TYPE_CHECKING:
    from vla_ft.run_setup import Run

DCP_DIR = "model_dcp"  # inside a checkpoint directory, written under FSDP


# ----------------------------------------------------------------------------- installer
def install(run: Run) -> None:
    """Wrap the model and set the hooks when the run has more than one process."""
    rt, cfg = run.rt, run.recipe.distributed
    if not rt.distributed:
        return
    if cfg.strategy == "ddp":
        wrap_ddp(run)
        run.hooks.on_freeze_change = wrap_ddp
    else:
        shard_fsdp(run)
        run.hooks.stage_model_state = stage_dcp_state
        run.hooks.no_sync = paused_gradient_sync
    run.hooks.clip_grad_norm = clip_grad_norm
    run.hooks.reduce_metrics = mean_over_ranks
    if rt.is_main:
        print(describe(run.recipe, rt.world_size, rt.device, dist.get_backend()), flush=True)


def global_batch(recipe: Recipe, world_size: int) -> int:
    """Samples per optimizer step, all ranks together."""
    return recipe.train.batch_size * recipe.optim.accumulation * world_size


def describe(recipe: Recipe, world_size: int, device: torch.device, backend: str) -> str:
    t, o = recipe.train, recipe.optim
    return (
        f"data parallel: {recipe.distributed.strategy} over {world_size} processes ({backend}, {device.type}); "
        f"global batch {global_batch(recipe, world_size)} = {t.batch_size} per device x {o.accumulation} "
        f"accumulation x {world_size} processes"
    )


# ----------------------------------------------------------------------------- DDP
def wrap_ddp(run: Run) -> None:
    """(Re-)wrap ``run.model`` in DDP over the parameters that train now.

    DDP fixes its parameter list at construction, so a staged unfreeze calls this again;
    dropping the old wrapper removes its gradient hooks. Construction broadcasts rank 0's
    weights, which every rank already holds.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    run.wrapped = None
    gc.collect()  # the old reducer's hooks must be gone before the new ones are registered
    if not any(p.requires_grad for p in run.model.parameters()):
        return  # everything frozen until a later unfreeze: nothing to synchronise yet
    cuda = run.rt.device.type == "cuda"
    run.wrapped = DDP(
        run.model,
        device_ids=[run.rt.device.index] if cuda else None,
        find_unused_parameters=run.recipe.distributed.find_unused_parameters,
        gradient_as_bucket_view=True,  # gradients live in the communication buckets: no copy, less memory
    )


# ----------------------------------------------------------------------------- FSDP2
def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules sharded on their own: LM decoder layers and ViT blocks (then the root)."""
    units = list(getattr(model.decoder, "layers", []))
    for backbone in model.vision_encoder.backbones:
        base = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
        units += list(getattr(base, "blocks", []))
    return units


def shard_fsdp(run: Run) -> None:
    """fully_shard the VLA in place and point the optimizer at the sharded parameters."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model, rt = run.model, run.rt
    names = {id(p): n for n, p in model.named_parameters()}
    mesh = init_device_mesh(rt.device.type, (rt.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=rt.amp_dtype, reduce_dtype=torch.float32)
    reshard = run.recipe.distributed.fsdp_reshard_after_forward
    for unit in shard_units(model):
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    rebind_optimizer(run.optimizer, names, dict(model.named_parameters()))


@contextlib.contextmanager
def paused_gradient_sync(run: Run) -> Iterator[None]:
    """FSDP2's ``no_sync``: the block's backward keeps its unsharded gradients, to be added to the
    next micro-batch's and reduce-scattered once, with the last one (not once per micro-batch).

    The flag is back on when the block ends, also when it raises, so the last micro-batch of the
    step, and every step after an error or a skip, reduces its gradients.
    """
    run.model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        run.model.set_requires_gradient_sync(True)


def rebind_optimizer(opt: torch.optim.Optimizer, old_names: dict[int, str], new: dict[str, nn.Parameter]) -> None:
    """Swap each parameter of ``opt`` for its sharded replacement, moving its state along.

    Groups (names, LRs, unfreeze steps) stay as built; a state tensor of the parameter's
    shape (Adam moments, restored from a single-file checkpoint) is sharded like the
    parameter, scalars (``step``) stay as they are. Parameters not in the model (the loss's
    log-variances) are left alone.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    for group in opt.param_groups:
        params = []
        for p in group["params"]:
            q = new.get(old_names.get(id(p), ""), p)
            if q is not p and p in opt.state:
                state = opt.state.pop(p)
                for key, value in state.items():
                    if isinstance(q, DTensor) and torch.is_tensor(value) and value.shape == q.shape:
                        # every rank holds the same full tensor: each keeps its shard, no communication
                        value = distribute_tensor(value.to(q.device), q.device_mesh, q.placements, src_data_rank=None)
                    state[key] = value
                opt.state[q] = state
            params.append(q)
        group["params"] = params


# ----------------------------------------------------------------------------- hooks
def sync_outside_wrapper(run: Run) -> None:
    """Average, over ranks, gradients and statistics that DDP/FSDP do not see.

    The loss's learned log-variances are parameters outside the model: their gradients
    must be averaged like the model's or ranks drift apart. DWA's running sums are per
    process: averaging them after every step (a linear update, so step-by-step averaging
    equals averaging the totals) makes every rank apply the same lambdas. A gradient that
    is None on every rank stays None, as in a single process.
    """
    params = [p for p in run.loss_fn.parameters() if p.requires_grad]
    persistent = run.loss_fn.state_dict().keys()
    buffers = [b for n, b in run.loss_fn.named_buffers() if n in persistent and b.is_floating_point()]
    if not params and not buffers:
        return
    device = run.rt.device
    grads = [
        p.grad.detach().float().flatten() if p.grad is not None else torch.zeros(p.numel(), device=device)
        for p in params
    ]
    has = [torch.ones(1, device=device) if p.grad is not None else torch.zeros(1, device=device) for p in params]
    flat = torch.cat([*grads, *has, *(b.detach().float().flatten() for b in buffers)])
    dist.all_reduce(flat)
    flat /= run.rt.world_size
    offset = sum(g.numel() for g in grads)
    pieces = flat[:offset].split([p.numel() for p in params]) if params else []
    for i, (p, g) in enumerate(zip(params, pieces, strict=True)):
        if flat[offset + i] > 0:
            p.grad = g.view_as(p).to(p.dtype)
    offset += len(params)
    for b in buffers:
        b.copy_(flat[offset : offset + b.numel()].view_as(b))
        offset += b.numel()


def clip_grad_norm(run: Run, max_norm: float) -> torch.Tensor:
    """Sync what lives outside the wrapper, then clip all gradients by their global L2 norm."""
    sync_outside_wrapper(run)
    params = run.trainable_params()
    if run.recipe.distributed.strategy == "ddp":
        return torch.nn.utils.clip_grad_norm_(params, max_norm)  # gradients are already whole and averaged
    return clip_sharded(params, max_norm, run.rt.device)


def clip_sharded(params: list[torch.Tensor], max_norm: float, device: torch.device) -> torch.Tensor:
    """clip_grad_norm_ for a mix of sharded (DTensor) and whole gradients; returns a plain 0-dim norm.

    Squares of the local shards are summed over ranks; whole gradients (replicated, the
    same on every rank) are counted once. Same coefficient as torch's: max / (norm + 1e-6).
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    local = [g.to_local() for g in grads if isinstance(g, DTensor)]
    whole = [g for g in grads if not isinstance(g, DTensor)]
    sharded_sq = torch.zeros((), device=device)
    for g in local:
        sharded_sq += g.detach().float().pow(2).sum()
    dist.all_reduce(sharded_sq)
    whole_sq = sum((g.detach().float().pow(2).sum() for g in whole), torch.zeros((), device=device))
    norm = (sharded_sq + whole_sq).sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in local + whole:
        g.mul_(coef.to(g.dtype))
    return norm


def mean_over_ranks(run: Run, values: dict[str, float]) -> dict[str, float]:
    """Mean of each value over the ranks that have it (a term may be absent on one rank). A
    ``metric/*`` value a rank could not define (NaN: no gripper transition in its batches) is
    left out, as :class:`vla_ft.tracking.Averager` does within a rank."""
    gathered: list[Any] = [None] * run.rt.world_size
    dist.all_gather_object(gathered, values)
    keys = dict.fromkeys(k for d in gathered for k in d)  # first-seen order, rank 0 first
    out = {}
    for k in keys:
        have = [d[k] for d in gathered if k in d and not (k.startswith("metric/") and math.isnan(d[k]))]
        out[k] = sum(have) / len(have) if have else math.nan
    return out


# ----------------------------------------------------------------------------- DCP checkpoints
def _param_names(run: Run) -> dict[int, str]:
    """id(parameter) -> stable name across world sizes: ``model.<fqn>`` or ``loss.<fqn>``. A model
    weight's fp32 master (one process with bf16 weights, which the optimizer updates) has its name."""
    names: dict[int, str] = {}
    for n, p in run.model.named_parameters():
        names[id(p)] = names[id(optimized(run.model, p))] = f"model.{n}"
    names.update({id(p): f"loss.{n}" for n, p in run.loss_fn.named_parameters()})
    return names


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with each tied weight once, under the first of its names in sorted
    order, as safetensors' ``save_model`` stores it (so a consolidated file loads the same way)."""
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    drop = {n for names in aliases.values() for n in sorted(names)[1:]}
    return {k: v for k, v in model.state_dict().items() if k not in drop}


def dcp_state(run: Run, with_optimizer: bool) -> dict[str, torch.Tensor]:
    """Flat DCP state: ``model/<fqn>`` (sharded DTensors under FSDP) and ``optim/<name>/<key>``."""
    state: dict[str, torch.Tensor] = {f"model/{k}": v for k, v in model_state(run.model).items()}
    if with_optimizer:
        names = _param_names(run)
        for p, entries in run.optimizer.state.items():
            for key, value in entries.items():
                if not torch.is_tensor(value):
                    raise TypeError(f"optimizer state '{key}' is not a tensor; DCP checkpoints hold tensors only")
                state[f"optim/{names[id(p)]}/{key}"] = value
    return state


def stage_dcp_state(run: Run) -> Path:
    """Every rank writes its shards to ``checkpoints/.dcp_step_N/``; rank 0 then moves it into the
    checkpoint being written (see ``run_state.save_training_checkpoint``), so it stays atomic."""
    import torch.distributed.checkpoint as dcp

    root = run.run_dir / "checkpoints"
    staging = root / f".dcp_{ck.step_dir_name(run.state.step)}"
    if run.rt.is_main:
        shutil.rmtree(staging, ignore_errors=True)
    run.rt.barrier()
    staging.mkdir(parents=True, exist_ok=True)
    dcp.save(dcp_state(run, run.recipe.checkpoint.save_optimizer), checkpoint_id=str(staging))
    run.rt.barrier()  # every shard is on disk before rank 0 renames the directory
    return staging


def load_dcp_state(run: Run, path: Path) -> None:
    """Restore weights and optimizer state from ``model_dcp/`` into the (not yet wrapped) run.

    Collective when distributed (every rank calls it), local otherwise. Tensors are read
    whole whatever world size wrote them; FSDP shards them again at install.
    """
    import torch.distributed.checkpoint as dcp

    meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    weights = {f"model/{k}": v for k, v in model_state(run.model).items()}  # views of the parameters
    optim_state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items() if k.startswith("optim/")}
    dcp.load({**weights, **optim_state}, checkpoint_id=str(path), no_dist=not run.rt.distributed)  # in place
    if optim_state:
        run.optimizer.load_state_dict(_optimizer_state_dict(run, optim_state))


def _optimizer_state_dict(run: Run, flat: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``optim/<name>/<key>`` tensors -> ``Optimizer.state_dict()`` form (index-keyed), so the
    optimizer's own loader applies its device and dtype rules (e.g. Adam's ``step`` on CPU)."""
    sd = run.optimizer.state_dict()
    names = _param_names(run)
    order = [names[id(p)] for g in run.optimizer.param_groups for p in g["params"]]
    index = {name: i for i, name in enumerate(order)}
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        name, entry = key[len("optim/") :].rsplit("/", 1)
        if name not in index:
            raise ck.CheckpointError(f"checkpoint optimizer state for '{name}', which this run does not train")
        state.setdefault(index[name], {})[entry] = value
    return {"state": state, "param_groups": sd["param_groups"]}


def consolidate(checkpoint: Path, out: Path | None = None) -> Path:
    """Merge the DCP shards of an FSDP checkpoint into one ``model.safetensors``.

    Runs in one process, without a GPU or the model's code. By default the file is
    written into the checkpoint directory itself (atomically), which makes it loadable
    exactly like a DDP or single-process checkpoint.
    """
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    if not checkpoint.is_dir():
        raise ck.CheckpointError(f"{checkpoint}: no such checkpoint directory")
    src = checkpoint / DCP_DIR
    if not src.is_dir():
        raise ck.CheckpointError(f"{checkpoint} has no {DCP_DIR}/ (not an FSDP checkpoint)")
    meta = dcp.FileSystemReader(str(src)).read_metadata().state_dict_metadata
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items() if k.startswith("model/")}
    dcp.load(state, checkpoint_id=str(src), no_dist=True)
    out = out or checkpoint / "model.safetensors"
    tmp = out.with_name(out.name + ".tmp")
    save_file({k[len("model/") :]: v.contiguous() for k, v in state.items()}, str(tmp))
    os.replace(tmp, out)
    return out
