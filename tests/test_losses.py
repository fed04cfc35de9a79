"""Composite loss: every term, mask and weighting against plain float64 references written here."""

from __future__ import annotations

import io
import math

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vla_ft.config import (
    ActionLossConfig,
    GripperLossConfig,
    LanguageLossConfig,
    LossConfig,
    RecipeError,
    ScheduledWeight,
    TermWeights,
)
from vla_ft.loss_weighting import KENDALL_SCALE, TERMS, ramp_weight
from vla_ft.losses import METRIC_STATS, CompositeLoss, term_metrics
from vla_ft.tracking import Averager

B, C, A, V = 3, 4, 5, 7
GRIP = [2]  # deliberately not the last dim
REGRESS = [0, 1, 3, 4]


def make_cfg(
    weights: tuple[float, float, float] = (0.1, 1.0, 0.5),
    action: ActionLossConfig | None = None,
    gripper: GripperLossConfig | None = None,
    **kwargs,
) -> LossConfig:
    return LossConfig(
        weights=TermWeights(*weights),
        action=action or ActionLossConfig(),
        gripper=gripper or GripperLossConfig(dims=list(GRIP)),
        **kwargs,
    )


def make_inputs(seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Random outputs and batch; gripper targets are raw values in [0, 1]; some steps masked."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(B, C, A, generator=g, dtype=torch.float64)
    target[..., GRIP] = torch.rand(B, C, len(GRIP), generator=g, dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False], [True, True, True, True]])
    labels = torch.randint(0, V, (6,), generator=g)
    labels[[1, 4]] = -100
    outputs = {
        "actions": torch.randn(B, C, A, generator=g, dtype=torch.float64).to(dtype).requires_grad_(),
        "gripper_logits": torch.randn(B, C, len(GRIP), generator=g, dtype=torch.float64).to(dtype).requires_grad_(),
        "lm_logits": torch.randn(6, V, generator=g, dtype=torch.float64).to(dtype).requires_grad_(),
        "lm_labels": labels,
    }
    return outputs, {"actions": target.to(dtype), "action_mask": mask}


# ----------------------------------------------------------------------------- plain references
def ref_language(logits: Tensor, labels: Tensor, eps: float) -> tuple[Tensor, float, float]:
    """Label-smoothed CE averaged over non-ignored rows, token accuracy, perplexity."""
    logp = F.log_softmax(logits.double(), dim=-1)
    losses, nlls, hits = [], [], 0
    for row, y in enumerate(labels.tolist()):
        if y == -100:
            continue
        nll = -logp[row, y]
        losses.append((1 - eps) * nll - eps * logp[row].mean())
        nlls.append(nll.item())
        hits += int(logits[row].argmax().item() == y)
    return torch.stack(losses).mean(), hits / len(nlls), math.exp(sum(nlls) / len(nlls))


def ref_action(pred: Tensor, target: Tensor, mask: Tensor, kind: str, beta: float, dim_w: list, hor_w: list) -> Tensor:
    """Weighted mean over valid (step, regressed dim) elements, element by element."""
    num, den = 0.0, 0.0
    for b in range(B):
        for c in range(C):
            for a in REGRESS:
                if not bool(mask[b, c] if mask.dim() == 2 else mask[b, c, a]):
                    continue
                d = pred[b, c, a].double() - target[b, c, a].double()
                elem = {"mse": d * d, "l1": d.abs(), "smooth_l1": F.smooth_l1_loss(d, d * 0, beta=beta)}[kind]
                w = dim_w[a] * hor_w[c]
                num, den = num + w * elem, den + w
    return num / den


def ref_gripper(logits: Tensor, raw: Tensor, mask: Tensor, thr: float, closed_high: bool, pw: float) -> dict:
    """BCE (pos_weight on closed), accuracy, F1 and transition accuracy, with loops."""
    loss, n, hits, tp, fp, fn, t_hits, t_n = 0.0, 0, 0, 0, 0, 0, 0, 0
    lab = (raw > thr) if closed_high else (raw <= thr)
    for b in range(logits.shape[0]):
        for c in range(logits.shape[1]):
            if not mask[b, c]:
                continue
            x, y = logits[b, c, 0].double(), float(lab[b, c, 0])
            loss = loss - (pw * y * F.logsigmoid(x) + (1 - y) * F.logsigmoid(-x))
            pred = float(x > 0)
            n, hits = n + 1, hits + int(pred == y)
            tp, fp, fn = tp + int(pred and y), fp + int(pred and not y), fn + int(not pred and y)
            if c >= 1 and mask[b, c - 1] and lab[b, c, 0] != lab[b, c - 1, 0]:
                t_n, t_hits = t_n + 1, t_hits + int(pred == y)
    return {"loss": loss / n, "acc": hits / n, "f1": 2 * tp / (2 * tp + fp + fn), "tacc": t_hits / t_n}


# ----------------------------------------------------------------------------- terms
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_language_matches_reference(eps: float) -> None:
    loss = CompositeLoss(make_cfg(language=LanguageLossConfig(label_smoothing=eps)), A, C, True)
    outputs, batch = make_inputs()
    _, parts = loss(outputs, batch)
    ref, acc, ppl = ref_language(outputs["lm_logits"], outputs["lm_labels"], eps)
    torch.testing.assert_close(parts["loss/language"].double(), ref, rtol=1e-5, atol=1e-6)
    assert parts["metric/token_acc"].item() == pytest.approx(acc)
    assert parts["metric/perplexity"].item() == pytest.approx(ppl, rel=1e-5)


@pytest.mark.parametrize(("kind", "beta"), [("mse", 1.0), ("l1", 1.0), ("smooth_l1", 0.5)])
@pytest.mark.parametrize("element_mask", [False, True])
def test_action_matches_reference(kind: str, beta: float, element_mask: bool) -> None:
    dim_w, hor_w = [1.0, 2.0, 9.0, 0.5, 1.5], [1.0, 0.8, 0.6, 0.4]
    cfg = make_cfg(action=ActionLossConfig(type=kind, beta=beta, dim_weights=dim_w, horizon_weights=hor_w))
    loss = CompositeLoss(cfg, A, C, gripper_head=True)
    outputs, batch = make_inputs()
    if element_mask:
        batch["action_mask"] = batch["action_mask"][..., None].expand(B, C, A).clone()
        batch["action_mask"][0, 0, 1] = False
    ref = ref_action(outputs["actions"], batch["actions"], batch["action_mask"], kind, beta, dim_w, hor_w)
    batch["actions"][~batch["action_mask"]] = float("nan")  # padded/missing targets must not leak
    value = loss.terms(outputs, batch)["action"]
    torch.testing.assert_close(value.double(), ref, rtol=1e-5, atol=1e-6)
    value.backward()
    assert torch.isfinite(outputs["actions"].grad).all()
    assert (outputs["actions"].grad[..., GRIP] == 0).all()  # gripper dims leave the regression


def test_action_includes_gripper_dims_without_gripper_head() -> None:
    loss = CompositeLoss(make_cfg(), A, C, gripper_head=False)
    outputs, batch = make_inputs()
    del outputs["gripper_logits"]
    p, t, m = outputs["actions"].double(), batch["actions"].double(), batch["action_mask"]
    ref = (p - t).abs()[m].mean()
    torch.testing.assert_close(loss.terms(outputs, batch)["action"].double(), ref, rtol=1e-5, atol=1e-6)
    assert not loss.wants("gripper")


@pytest.mark.parametrize(("closed_is_high", "pos_weight"), [(True, None), (False, 3.0)])
def test_gripper_matches_reference(closed_is_high: bool, pos_weight: float | None) -> None:
    cfg = make_cfg(
        gripper=GripperLossConfig(dims=GRIP, threshold=0.5, closed_is_high=closed_is_high, pos_weight=pos_weight)
    )
    loss = CompositeLoss(cfg, A, C, True)
    outputs, batch = make_inputs()
    # a missing (NaN) step inside the chunk: a label change across it is no transition
    batch["action_mask"][1] = torch.tensor([True, False, True, True])
    raw = torch.tensor([[0.9, 0.1, 0.8, 0.7], [0.5, 0.6, 0.0, 0.9], [0.1, 0.2, 0.9, 0.3]], dtype=torch.float64)
    batch["actions"][..., GRIP[0]] = raw.float()
    outputs["gripper_logits"] = torch.tensor(
        [[[2.0], [1.0], [-1.0], [3.0]], [[-2.0], [0.5], [1.0], [1.0]], [[-1.0], [-0.5], [2.0], [0.2]]],
        requires_grad=True,
    )
    _, parts = loss(outputs, batch)
    ref = ref_gripper(
        outputs["gripper_logits"], raw[..., None], batch["action_mask"], 0.5, closed_is_high, pos_weight or 1.0
    )
    torch.testing.assert_close(parts["loss/gripper"].double(), ref["loss"], rtol=1e-5, atol=1e-6)
    assert parts["metric/gripper_acc"].item() == pytest.approx(ref["acc"])
    assert parts["metric/gripper_f1"].item() == pytest.approx(ref["f1"])
    assert parts["metric/gripper_transition_acc"].item() == pytest.approx(ref["tacc"])


def test_summed_metric_counts_give_the_metrics_of_the_joined_batches() -> None:
    """What the trainer pools over micro-batches (``stat/*``): the metrics of two batches with
    different numbers of valid steps and target tokens, as the plain references compute them over
    both together (a mean of the two batches' ratios is not that)."""
    loss = CompositeLoss(make_cfg(), A, C, True)
    micro = [make_inputs(seed) for seed in (0, 1)]
    micro[1][1]["action_mask"][0] = False  # 3 valid steps fewer in the second batch
    micro[1][0]["lm_labels"][[0, 2, 3]] = -100  # and 3 target tokens fewer
    parts = [loss(outputs, batch)[1] for outputs, batch in micro]
    summed = {k[len("stat/") :]: parts[0][k] + parts[1][k] for k in parts[0] if k.startswith("stat/")}
    joined = [{k: torch.cat([m[i][k] for m in micro]) for k in micro[0][i]} for i in (0, 1)]
    outputs, batch = joined
    _, acc, ppl = ref_language(outputs["lm_logits"], outputs["lm_labels"], 0.0)
    raw = batch["actions"][..., GRIP].double()
    grip = ref_gripper(outputs["gripper_logits"], raw, batch["action_mask"], 0.5, True, 1.0)
    got = {**term_metrics("language", summed), **term_metrics("gripper", summed)}
    assert got["metric/token_acc"].item() == pytest.approx(acc)
    assert got["metric/perplexity"].item() == pytest.approx(ppl, rel=1e-5)
    assert got["metric/gripper_acc"].item() == pytest.approx(grip["acc"])
    assert got["metric/gripper_f1"].item() == pytest.approx(grip["f1"])
    assert got["metric/gripper_transition_acc"].item() == pytest.approx(grip["tacc"])
    mean = (parts[0]["metric/gripper_acc"] + parts[1]["metric/gripper_acc"]) / 2
    assert mean.item() != pytest.approx(grip["acc"])  # the data tells pooling from averaging


def test_a_nan_gripper_logit_is_scored_as_validation_scores_it() -> None:
    """A NaN logit is neither open nor closed: training's metric/gripper_* leave it out, as
    validation's ActionMetrics (the independent reference here, with a loop) does; ``NaN > 0`` read it
    as "open", a right answer wherever the gripper was open. All NaN: every metric undefined."""
    from robot_data.normalize import Normalizer
    from vla_ft.metrics import ActionMetrics

    nan = float("nan")
    gcfg = GripperLossConfig(dims=[1], threshold=0.5)
    loss = CompositeLoss(make_cfg(gripper=gcfg), 2, 4, True)
    raw = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0], [1.0, 0.0, 0.0, 1.0]])
    batch = {"actions": torch.stack([torch.zeros(3, 4), raw], -1), "action_mask": torch.ones(3, 4, dtype=torch.bool)}
    batch["action_mask"][1, 3] = False
    stats = {"mean": [0.0, 0.5], "std": [1.0, 0.5], "min": [-1.0, 0.0], "max": [1.0, 1.0]}
    norm = Normalizer({"state": stats, "action": stats}, "mean_std", raw_action_dims=[1])
    for logits in (
        torch.tensor([[2.0, nan, -1.0, nan], [-3.0, 1.0, nan, 4.0], [1.0, -1.0, nan, 2.0]])[..., None],
        torch.full((3, 4, 1), nan),
    ):
        loss.train()
        outputs = {"actions": torch.zeros(3, 4, 2, requires_grad=True), "gripper_logits": logits}
        _, parts = loss(outputs, batch)
        val = ActionMetrics(norm, 2, 4, [1], gcfg, gripper_head=True)
        val.update(outputs, {**batch, "source": torch.zeros(3)})
        want = val.compute("")
        # the loop: valid steps with a non-NaN logit, as (predicted closed, truly closed)
        pairs = [
            (bool(logits[b, c, 0] > 0), bool(raw[b, c] > 0.5))
            for b in range(3)
            for c in range(4)
            if batch["action_mask"][b, c] and not logits[b, c, 0].isnan()
        ]
        acc = sum(p == t for p, t in pairs) / len(pairs) if pairs else nan
        for name in ("acc", "f1", "transition_acc"):
            got = parts[f"metric/gripper_{name}"].item()
            assert got == pytest.approx(want[f"gripper_{name}"], nan_ok=True), name
        assert parts["metric/gripper_acc"].item() == pytest.approx(acc, nan_ok=True)


def test_gripper_threshold_convention() -> None:
    """label 1 = closed: value > threshold when closed_is_high, value <= threshold otherwise."""
    from vla_ft.losses import gripper_labels

    raw = torch.tensor([0.0, 0.5, 0.51, 1.0])
    assert gripper_labels(raw, 0.5, closed_is_high=True).tolist() == [False, False, True, True]
    assert gripper_labels(raw, 0.5, closed_is_high=False).tolist() == [True, True, False, False]


def test_gradients_match_float64_reference_and_gradcheck() -> None:
    dim_w, hor_w = [1.0, 2.0, 1.0, 0.5, 1.5], [1.0, 0.8, 0.6, 0.4]
    cfg = make_cfg(
        action=ActionLossConfig(type="smooth_l1", beta=0.7, dim_weights=dim_w, horizon_weights=hor_w),
        gripper=GripperLossConfig(dims=GRIP, pos_weight=2.0),
        language=LanguageLossConfig(label_smoothing=0.1),
    )
    loss = CompositeLoss(cfg, A, C, True)
    outputs, batch = make_inputs(seed=1, dtype=torch.float64)
    total, _ = loss(outputs, batch)
    raw, m = batch["actions"][..., GRIP], batch["action_mask"]
    ref = (
        0.1 * ref_language(outputs["lm_logits"], outputs["lm_labels"], 0.1)[0]
        + 1.0 * ref_action(outputs["actions"], batch["actions"], m, "smooth_l1", 0.7, dim_w, hor_w)
        + 0.5 * ref_gripper(outputs["gripper_logits"], raw, m, 0.5, True, 2.0)["loss"]
    )
    keys = ["actions", "gripper_logits", "lm_logits"]
    got = torch.autograd.grad(total, [outputs[k] for k in keys])
    want = torch.autograd.grad(ref, [outputs[k] for k in keys])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)

    def total_of(actions: Tensor, glogits: Tensor, lm: Tensor) -> Tensor:
        out = {"actions": actions, "gripper_logits": glogits, "lm_logits": lm, "lm_labels": outputs["lm_labels"]}
        return loss(out, batch)[0]

    inputs = tuple(outputs[k].detach().requires_grad_() for k in keys)
    assert torch.autograd.gradcheck(total_of, inputs, fast_mode=True)


# ----------------------------------------------------------------------------- numerics and contract
def test_fully_masked_batch_is_zero_without_nan() -> None:
    loss = CompositeLoss(make_cfg(), A, C, True)
    outputs, batch = make_inputs()
    batch["action_mask"][:] = False
    batch["actions"][:] = float("nan")
    outputs["lm_labels"] = torch.full((6,), -100)
    total, parts = loss(outputs, batch)
    total.backward()
    assert total.item() == 0.0
    # nothing to measure: NaN, left out of logged means (a 0 there would dilute them)
    undefined = {"metric/gripper_transition_acc", "metric/gripper_acc", "metric/gripper_f1", "metric/token_acc"}
    undefined.add("metric/perplexity")
    assert all(torch.isfinite(v) for k, v in parts.items() if k not in undefined)
    assert all(parts[k].isnan() for k in undefined)
    for key in ("actions", "gripper_logits", "lm_logits"):
        assert (outputs[key].grad == 0).all()


def test_a_batch_without_target_tokens_does_not_dilute_the_logged_metrics() -> None:
    """Frames without narration give batches with no language target: the window's token accuracy
    and perplexity are those of the batches that have tokens (they were averaged with 0 and 1)."""
    loss = CompositeLoss(make_cfg(), A, C, True)
    outputs, batch = make_inputs()
    window = Averager()
    window.add(loss(outputs, batch)[1])
    expected = window.means()
    outputs["lm_labels"] = torch.full((6,), -100)
    window.add(loss(outputs, batch)[1])
    for key in ("metric/token_acc", "metric/perplexity"):
        assert window.means()[key] == pytest.approx(expected[key])


def test_no_language_target_means_no_language_term() -> None:
    loss = CompositeLoss(make_cfg(), A, C, True)
    outputs, batch = make_inputs()
    outputs["lm_logits"], outputs["lm_labels"] = torch.zeros(0, V), torch.zeros(0, dtype=torch.long)
    assert "loss/language" not in loss(outputs, batch)[1]
    del outputs["lm_logits"], outputs["lm_labels"]
    assert set(loss.terms(outputs, batch)) == {"action", "gripper"}


def test_forward_contract_and_autocast_fp32() -> None:
    loss = CompositeLoss(make_cfg(), A, C, True)
    outputs, batch = make_inputs()
    bf16 = {k: (v.detach().bfloat16().requires_grad_() if v.is_floating_point() else v) for k, v in outputs.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, parts = loss(bf16, batch)
        terms = loss.terms(bf16, batch)
    assert total.dim() == 0 and total.dtype == torch.float32 and total.requires_grad
    assert all(v.dtype == torch.float32 for v in terms.values())
    assert set(parts) == {
        "loss/language", "loss/action", "loss/gripper", "weight/language", "weight/action", "weight/gripper",
        "metric/token_acc", "metric/perplexity", "metric/gripper_acc", "metric/gripper_f1",
        "metric/gripper_transition_acc", *(f"stat/{n}" for t in ("language", "gripper") for n in METRIC_STATS[t]),
    }  # fmt: skip
    assert all(v.dim() == 0 and not v.requires_grad for v in parts.values())
    torch.testing.assert_close(total, loss.combine(terms))
    up = {k: (v.detach().float() if v.is_floating_point() else v) for k, v in bf16.items()}
    for k, v in loss.terms(up, batch).items():
        torch.testing.assert_close(terms[k], v)


def test_shape_and_dtype_errors_name_the_term_and_both_shapes() -> None:
    loss = CompositeLoss(make_cfg(), A, C, True)
    cases = [
        ("actions", torch.zeros(B, C, A + 1), r"'action'.*\(3, 4, 6\).*\(3, 4, 5\)"),
        ("gripper_logits", torch.zeros(B, C, 2), r"'gripper'.*\(3, 4, 2\).*\(3, 4, 1\)"),
        ("lm_labels", torch.zeros(5, dtype=torch.long), r"'language'.*\(6, 7\).*\(5,\)"),
        ("lm_labels", torch.zeros(6, dtype=torch.int32), r"'language'.*int64.*int32"),
    ]
    for key, value, pattern in cases:
        outputs, batch = make_inputs()
        outputs[key] = value
        with pytest.raises(ValueError, match=pattern):
            loss(outputs, batch)
    outputs, batch = make_inputs()
    batch["action_mask"] = torch.ones(B, C + 1, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"'action'.*\(3, 5\).*\(3, 4, 5\)"):
        loss(outputs, batch)


def test_config_errors() -> None:
    with pytest.raises(RecipeError, match=r"loss\.action\.dim_weights: 3 values for 5"):
        CompositeLoss(make_cfg(action=ActionLossConfig(dim_weights=[1.0, 1.0, 1.0])), A, C, True)
    with pytest.raises(RecipeError, match=r"loss\.action\.horizon_weights: 2 values for data\.chunk=4"):
        CompositeLoss(make_cfg(action=ActionLossConfig(horizon_weights=[1.0, 1.0])), A, C, True)
    with pytest.raises(RecipeError, match="static, scheduled, uncertainty, dwa"):
        CompositeLoss(make_cfg(strategy="nope"), A, C, True)  # type: ignore[arg-type]
    with pytest.raises(RecipeError, match="mse, l1, smooth_l1"):
        CompositeLoss(make_cfg(action=ActionLossConfig(type="huber")), A, C, True)  # type: ignore[arg-type]
    with pytest.raises(RecipeError, match=r"loss\.gripper\.dims"):
        CompositeLoss(make_cfg(gripper=GripperLossConfig(dims=[])), A, C, True)
    # smoothing 1 is a uniform target: the language term would not read the labels at all
    with pytest.raises(RecipeError, match=r"label_smoothing: must be in \[0, 1\), got 1\.0"):
        CompositeLoss(make_cfg(language=LanguageLossConfig(label_smoothing=1.0)), A, C, True)


# ----------------------------------------------------------------------------- weighting strategies
def test_static_zero_weight_term_is_not_computed() -> None:
    loss = CompositeLoss(make_cfg(weights=(0.1, 1.0, 0.0)), A, C, True)
    trunk, head = nn.Linear(3, 3), nn.Linear(3, C)
    outputs, batch = make_inputs()
    outputs["gripper_logits"] = head(trunk(torch.randn(B, 3)))[..., None]  # a model ignoring wants()
    total, parts = loss(outputs, batch)
    total.backward()
    assert not loss.wants("gripper") and loss.wants("language")
    assert head.weight.grad is None and "loss/gripper" not in parts and "metric/gripper_acc" not in parts


def test_a_step_ramp_takes_its_end_weight_at_its_step() -> None:
    step = ScheduledWeight(start_step=5, end_step=5, start=0.0, end=1.0, shape="linear")
    assert [ramp_weight(step, s) for s in (4, 5, 6)] == [0.0, 1.0, 1.0]


def test_scheduled_ramps_and_wants() -> None:
    schedule = {
        "language": ScheduledWeight(start_step=10, end_step=20, start=0.0, end=1.0, shape="linear"),
        "gripper": ScheduledWeight(start_step=0, end_step=8, start=2.0, end=0.0, shape="cosine"),
    }
    loss = CompositeLoss(make_cfg(strategy="scheduled", schedule=schedule), A, C, True)
    outputs, batch = make_inputs()
    for step in (0, 5, 10, 15, 20, 30):
        loss.set_step(step)
        lang = min(max((step - 10) / 10, 0.0), 1.0)
        grip = 2.0 - 2.0 * (1 - math.cos(math.pi * min(step / 8, 1.0))) / 2
        assert ramp_weight(schedule["language"], step) == pytest.approx(lang)
        assert loss.wants("language") == (lang != 0) and loss.wants("gripper") == (grip != 0)
        total, parts = loss(outputs, batch)
        terms = loss.terms(outputs, batch)
        expect = lang * terms.get("language", 0) + 1.0 * terms["action"] + grip * terms.get("gripper", 0)
        torch.testing.assert_close(total, expect)
        if grip:
            assert parts["weight/gripper"].item() == pytest.approx(grip)
    loss.eval()  # validation logs every term the run trains, also where a ramp holds it at 0
    assert loss.wants("language") and loss.wants("gripper") and set(loss.terms(outputs, batch)) == set(TERMS)


ACTION_ON_LATER = ScheduledWeight(start_step=10, end_step=20, start=0.0, end=1.0)  # loss.weights.action: 0 below
ACTION_NEVER_ON = ScheduledWeight(start_step=0, end_step=20, start=0.0, end=0.0)  # loss.weights.action: 1 below
NO_REGRESSED_WEIGHT = ActionLossConfig(dim_weights=[0.0, 0.0, 1.0, 0.0, 0.0])  # only gripper dim 2 weighs


@pytest.mark.parametrize(
    ("gripper_dims", "action", "said"),
    [
        (list(range(A)), None, "loss.gripper.dims: every action dim is a gripper dim"),
        (GRIP, NO_REGRESSED_WEIGHT, r"loss.action.dim_weights: all regressed dims \[0, 1, 3, 4\] have weight 0"),
    ],
    ids=["all-gripper", "zero-dim-weights"],
)
def test_an_action_ramp_with_nothing_to_regress_is_refused(gripper_dims, action, said) -> None:
    """A ramp that switches the action term on later is checked like a static weight: with the
    static weight 0 the action dims were not checked, and the ramp regressed nothing, silently."""
    cfg = make_cfg(
        weights=(0.1, 0.0, 0.5),
        action=action,
        gripper=GripperLossConfig(dims=gripper_dims),
        strategy="scheduled",
        schedule={"action": ACTION_ON_LATER},
    )
    with pytest.raises(RecipeError, match=said) as err:
        CompositeLoss(cfg, A, C, True)
    assert "loss.schedule.action ramps the action weight from 0.0 to 1.0" in str(err.value)


def test_a_gripper_only_recipe_whose_ramp_keeps_the_action_term_off_is_accepted() -> None:
    """Every dim a gripper dim, and an action ramp held at 0: nothing is regressed and nothing
    needs to be, whatever ``loss.weights.action`` says (the ramp replaces it at every step)."""
    cfg = make_cfg(
        weights=(0.1, 1.0, 0.5),
        gripper=GripperLossConfig(dims=list(range(A))),
        strategy="scheduled",
        schedule={"action": ACTION_NEVER_ON},
    )
    loss = CompositeLoss(cfg, A, C, True)
    outputs, batch = make_inputs()
    outputs["gripper_logits"] = torch.randn(B, C, A, dtype=torch.float64, requires_grad=True)
    batch["actions"] = torch.rand(B, C, A, dtype=torch.float64)
    loss.eval()  # validation: every term the run ever trains
    assert not loss.wants("action") and loss.wants("gripper") and loss.wants("language")
    loss.train()
    loss.set_step(5)
    total, parts = loss(outputs, batch)
    assert "loss/action" not in parts
    torch.testing.assert_close(total, 0.1 * parts["loss/language"] + 0.5 * parts["loss/gripper"])
    # Zero weight on every regressed dim is likewise fine while the ramp keeps the term off.
    CompositeLoss(
        make_cfg(action=NO_REGRESSED_WEIGHT, strategy="scheduled", schedule={"action": ACTION_NEVER_ON}), A, C, True
    )


@pytest.mark.parametrize("element_mask", [False, True])
def test_counts_are_what_each_term_divides_by(element_mask: bool) -> None:
    """``counts`` reads the batch alone; each count must be the one the term's mean divided by."""
    action = ActionLossConfig(dim_weights=[1.0, 2.0, 9.0, 0.5, 1.5], horizon_weights=[1.0, 0.8, 0.6, 0.4])
    loss = CompositeLoss(make_cfg(action=action), A, C, gripper_head=True)
    outputs, batch = make_inputs()
    if element_mask:
        batch["action_mask"] = batch["action_mask"][..., None].expand(B, C, A).clone()
        batch["action_mask"][0, 0, 1] = batch["action_mask"][2, 3, GRIP[0]] = False
    batch["target_mask"] = (outputs["lm_labels"] != -100).reshape(2, 3)  # the model's labels come from it
    counts, results = loss.counts(batch), loss.evaluate(outputs, batch)
    assert set(counts) == set(results) == set(TERMS)
    for term in TERMS:
        assert counts[term].item() == pytest.approx(results[term].count.item()), term
    share = {t: torch.tensor(0.5) for t in TERMS}  # a share scales each mean, and what is logged
    total, parts = loss(outputs, batch)
    half, half_parts = loss(outputs, batch, share)
    torch.testing.assert_close(half, total / 2)
    assert half_parts["loss/action"].item() == pytest.approx(parts["loss/action"].item() / 2)


def test_uncertainty_formula_gradients_and_param_group() -> None:
    loss = CompositeLoss(make_cfg(weights=(1.0, 2.0, 0.5), strategy="uncertainty"), A, C, True)
    s = {"language": 0.3, "action": -0.2, "gripper": 0.7}
    with torch.no_grad():
        for k, v in s.items():
            loss.weighting.log_vars[k].fill_(v)
    params = loss.no_decay_parameters()
    assert {id(p) for p in params} == {id(p) for p in loss.parameters()} and len(params) == 3
    outputs, batch = make_inputs()
    total, parts = loss(outputs, batch)
    w = {"language": 1.0, "action": 2.0, "gripper": 0.5}
    L = {k: parts[f"loss/{k}"].double() for k in w}
    c = {"language": 1.0, "action": 0.5, "gripper": 1.0}  # 1/sigma^2 (softmax), 1/(2 sigma^2) (Gaussian)
    assert c == KENDALL_SCALE
    ref = sum(w[k] * (c[k] * math.exp(-s[k]) * L[k] + 0.5 * s[k]) for k in w)
    torch.testing.assert_close(total.double(), ref, rtol=1e-6, atol=1e-6)
    total.backward()
    for k in w:
        grad = w[k] * (-c[k] * math.exp(-s[k]) * L[k] + 0.5)
        assert loss.weighting.log_vars[k].grad.item() == pytest.approx(grad.item(), rel=1e-5)
        assert parts[f"weight/{k}"].item() == pytest.approx(w[k] * c[k] * math.exp(-s[k]), rel=1e-6)


def test_uncertainty_ignores_empty_terms() -> None:
    loss = CompositeLoss(make_cfg(strategy="uncertainty"), A, C, True)
    outputs, batch = make_inputs()
    batch["action_mask"][:] = False
    loss(outputs, batch)[0].backward()
    assert loss.weighting.log_vars["action"].grad.item() == 0.0
    assert loss.weighting.log_vars["gripper"].grad.item() == 0.0
    assert loss.weighting.log_vars["language"].grad.item() != 0.0


def test_uncertainty_regulariser_is_pooled_like_one_batch() -> None:
    """A micro-batch without language target (a frame with no narration) must not drop its part
    of the language log-variance regulariser: the accumulated gradient of every s_k is the one of
    one batch of both micro-batches (it was off by w_language x 0.5 x 1/2: the regulariser half-counted)."""
    loss = CompositeLoss(make_cfg(strategy="uncertainty"), A, C, True)
    micro = [make_inputs(seed) for seed in (0, 1)]
    for (outputs, batch), text in zip(micro, (False, True), strict=True):
        batch["target_mask"] = torch.full((B, 2), text)  # lm_labels (B * Lt,) with Lt = 2
        outputs["lm_labels"] = outputs["lm_labels"].clamp(min=0).masked_fill(~batch["target_mask"].flatten(), -100)
    joined = [{k: torch.cat([m[i][k] for m in micro]) for k in micro[0][i]} for i in (0, 1)]
    loss(*joined)[0].backward()
    expected = {k: p.grad.clone() for k, p in loss.weighting.log_vars.items()}
    loss.zero_grad()
    counts = [loss.counts(batch) for _, batch in micro]
    for (outputs, batch), count in zip(micro, counts, strict=True):
        share = {k: 2 * count[k] / sum(c[k] for c in counts) for k in count}  # vla_ft.train.term_shares
        (loss(outputs, batch, share)[0] / 2).backward()
    for k, p in loss.weighting.log_vars.items():
        torch.testing.assert_close(p.grad, expected[k], msg=f"d/ds_{k}")


def test_a_term_a_micro_batch_lacks_is_logged_as_its_pooled_mean() -> None:
    """A micro-batch without a narrated frame has no language output at all: it must still count
    1/n in the logged loss/language (which was the pooled mean times n / (n - 1))."""
    loss = CompositeLoss(make_cfg(), A, C, True)
    micro = [make_inputs(seed) for seed in (0, 1)]
    for key in ("lm_logits", "lm_labels"):
        del micro[1][0][key]
    micro[1][1]["target_mask"] = torch.zeros(B, 0, dtype=torch.bool)
    micro[0][1]["target_mask"] = torch.ones(B, 2, dtype=torch.bool)
    counts = [loss.counts(batch) for _, batch in micro]
    logged = Averager()
    for (outputs, batch), count in zip(micro, counts, strict=True):
        share = {k: 2 * count[k] / sum(c[k] for c in counts) for k in count}  # vla_ft.train.term_shares
        logged.add(loss(outputs, batch, share)[1])
    pooled = loss.evaluate(*micro[0])["language"].value  # the step's only language tokens
    torch.testing.assert_close(logged.mean_values()["loss/language"], pooled.detach())


def ref_dwa(history: list[list[dict[str, float]]], window: int, temp: float, names: list[str]) -> list[dict]:
    """Lambda used at each step: K softmax(ratio of the last two closed window averages / T)."""
    out = []
    for step in range(len(history)):
        closed = step // window
        if closed < 2:
            out.append(dict.fromkeys(names, 1.0))
            continue

        def avg(j: int, name: str) -> float:
            vals = [mb[name] for s in history[j * window : (j + 1) * window] for mb in s if name in mb]
            return sum(vals) / len(vals)

        r = {k: avg(closed - 1, k) / avg(closed - 2, k) for k in names}
        z = sum(math.exp(v / temp) for v in r.values())
        out.append({k: len(names) * math.exp(r[k] / temp) / z for k in names})
    return out


def test_dwa_matches_reference_with_accumulation() -> None:
    """Two micro-batches per optimizer step; windows count optimizer steps."""
    window, temp = 2, 2.0
    loss = CompositeLoss(
        make_cfg(weights=(0.1, 1.0, 0.5), strategy="dwa", dwa_window=window, dwa_temperature=temp), A, C, True
    )
    g = torch.Generator().manual_seed(3)
    history, lams, names = [], [], ["language", "action", "gripper"]
    for step in range(9):
        loss.set_step(step)
        micro = []
        for _ in range(2):
            outputs, batch = make_inputs(seed=int(torch.randint(0, 10**6, (1,), generator=g)))
            _, parts = loss(outputs, batch)
            micro.append({k: parts[f"loss/{k}"].item() for k in names})
        history.append(micro)
        lams.append({k: parts[f"weight/{k}"].item() / w for k, w in zip(names, (0.1, 1.0, 0.5), strict=True)})
    for got, want in zip(lams, ref_dwa(history, window, temp, names), strict=True):
        assert got == pytest.approx(want, rel=1e-5)
    assert lams[-1] != pytest.approx(lams[0])  # the weights did move


def test_dwa_absent_term_carries_its_average() -> None:
    """A term absent (or non-finite) for a whole window keeps its last average (ratio 1); no NaN appears."""
    loss = CompositeLoss(make_cfg(strategy="dwa", dwa_window=1), A, C, True)
    w = loss.weighting
    nan = float("nan")
    seq = [{"action": 1.0, "gripper": 2.0}, {"action": 0.5, "gripper": 1.0}, {"action": 0.25, "gripper": nan}, {}]
    for values in seq:
        tensors = {k: torch.tensor(v) for k, v in values.items()}
        w.observe(tensors, {k: torch.tensor(True) for k in values}, new_step=True)
    # closed windows: (1, 2), (0.5, 1), (0.25, carried 1): ratios action 0.5, gripper 1; language undefined
    ra, rg = 0.5, 1.0
    z = math.exp(ra / 2) + math.exp(rg / 2)
    lam = dict(zip(w.names, w.lam.tolist(), strict=True))
    assert lam == pytest.approx(
        {"language": 1.0, "action": 2 * math.exp(ra / 2) / z, "gripper": 2 * math.exp(rg / 2) / z}
    )


def run_steps(loss: CompositeLoss, opt: torch.optim.Optimizer, steps: range) -> list[Tensor]:
    totals = []
    for step in steps:
        loss.set_step(step)
        outputs, batch = make_inputs(seed=step)
        if step % 3 == 0:
            batch["action_mask"][:] = False  # empty terms along the way
        total, parts = loss(outputs, batch)
        opt.zero_grad()
        total.backward()
        opt.step()
        totals.append(torch.stack([total.detach(), *parts.values()]))
    return totals


@pytest.mark.parametrize("strategy", ["uncertainty", "dwa"])
def test_resume_restores_strategy_state_exactly(strategy: str) -> None:
    def fresh() -> tuple[CompositeLoss, torch.optim.Optimizer]:
        loss = CompositeLoss(make_cfg(strategy=strategy, dwa_window=2), A, C, True)
        groups = [{"params": loss.no_decay_parameters(), "weight_decay": 0.0, "name": "loss_weights"}]
        return loss, torch.optim.AdamW(groups if groups[0]["params"] else [nn.Parameter(torch.zeros(1))], lr=0.1)

    straight, opt = fresh()
    want = run_steps(straight, opt, range(10))
    first, opt = fresh()
    run_steps(first, opt, range(5))
    loss_state = safetensors.torch.save({k: v.detach().contiguous() for k, v in first.state_dict().items()})
    saved = io.BytesIO()
    torch.save(opt.state_dict(), saved)
    saved.seek(0)
    resumed, opt = fresh()
    resumed.load_state_dict(safetensors.torch.load(loss_state))  # the checkpoint stores it as safetensors
    opt.load_state_dict(torch.load(saved))
    got = run_steps(resumed, opt, range(5, 10))
    for g, w in zip(got, want[5:], strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)
    assert len(first.state_dict()) > 0


# ----------------------------------------------------------------------------- diagnostic
def test_term_grad_norms_on_shared_layer() -> None:
    loss = CompositeLoss(make_cfg(grad_norm_every=2), A, C, True)
    trunk = nn.Linear(4, 4)
    outputs, batch = make_inputs()
    h = trunk(torch.randn(B, 4))
    outputs["actions"] = (h @ torch.randn(4, C * A)).view(B, C, A)
    outputs["gripper_logits"] = (h @ torch.randn(4, C)).view(B, C, 1)
    terms = loss.terms(outputs, batch)
    norms = loss.term_grad_norms(terms, list(trunk.parameters()))
    for name, value in terms.items():
        grads = torch.autograd.grad(value, list(trunk.parameters()), retain_graph=True, allow_unused=True)
        ref = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads if g is not None))
        assert norms[f"gradnorm/{name}"].item() == pytest.approx(ref, rel=1e-5)
    assert norms["gradnorm/language"].item() == 0.0  # the language logits do not use the trunk here
    loss.watch(trunk.parameters())
    loss.set_step(2)
    assert "gradnorm/action" in loss(outputs, batch)[1]
    assert "gradnorm/action" not in loss(outputs, batch)[1]  # once per optimizer step
    loss.set_step(3)
    total, parts = loss(outputs, batch)
    assert "gradnorm/action" not in parts
    total.backward()  # the graph survives the diagnostic
