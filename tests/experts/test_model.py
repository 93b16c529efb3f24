"""Expert variants: they train and evaluate on tiny data; kd gradient scale; size vs the FM base preset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.metrics import all_metrics
from experts.config import VARIANTS, ExpertConfig
from experts.data import load_examples
from experts.distill import expert_loss, scale_grad
from experts.evaluate import predict
from experts.model import Expert, flops_per_example, param_count
from experts.train import new_checkpoint, train_window
from features.counters import DENSE_NAMES
from features.expert_examples import build_expert_examples
from tests.experts.synth import make_lake


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_trains_then_scores_the_next_day(lake_uri: str, variant: str) -> None:
    lake, ws = make_lake(lake_uri, days=3, rows=400)
    for w in ws[1:]:
        build_expert_examples(lake, w, "feed", "small")
    train = load_examples(lake, "small", ws[1].ds, "feed", 20)
    test = load_examples(lake, "small", ws[2].ds, "feed", 20)
    cfg = ExpertConfig(variant=variant, epochs=3)
    ckpt = new_checkpoint(cfg, train, "small", "feed")
    trained, loss = train_window(ckpt, train, ws[1], [(ws[1].ds, train.fm_versions[0])])
    assert np.isfinite(loss) and trained.trained_through == ws[1].ds
    before = {k: v.clone() for k, v in ckpt.model.items()}
    assert any(not torch.equal(before[k], trained.model[k]) for k in before), "training changed nothing"
    probs = predict(trained.build(), test)
    assert probs.shape == (len(test),) and ((probs > 0) & (probs < 1)).all()
    m = all_metrics(test.label.numpy(), probs, float(train.label.mean()))
    assert set(m) == {"auc", "logloss", "ne", "calibration"} and all(np.isfinite(list(m.values())))


def test_scale_grad_scales_only_the_backward() -> None:
    x = torch.randn(5, requires_grad=True)
    y = scale_grad(x, 0.25)
    assert torch.equal(y, x)
    y.sum().backward()
    assert torch.allclose(x.grad, torch.full((5,), 0.25))


def _trunk_grad(beta: float, kd_weight: float = 1.0) -> torch.Tensor:
    torch.manual_seed(0)
    cfg = ExpertConfig(variant="kd", kd_beta=beta, kd_weight=kd_weight, adapter_weight=0.0, hidden=(8,),
                       id_buckets=64, side_buckets=8)
    model = Expert(cfg, repr_dim=4, tae_dim=4)
    batch = {"cats": torch.randint(0, 100, (16, 8)), "loop_repr": torch.zeros(16, 20, 4),
             "loop_mask": torch.zeros(16, 20, dtype=torch.bool), "loop_click": torch.zeros(16, 20), "tae": torch.zeros(16, 4),
             "fm_logit": torch.randn(16), "counters": torch.randn(16, len(DENSE_NAMES))}
    out = model(batch)
    # aux loss only: isolate the distillation gradient reaching the shared trunk
    target = torch.sigmoid(batch["fm_logit"])
    loss = torch.nn.functional.binary_cross_entropy_with_logits(out["aux_logit"], target)
    loss.backward()
    assert model.head.weight.grad is None or torch.all(model.head.weight.grad == 0)  # serving head untouched
    return model.trunk[0].weight.grad.clone()


def test_kd_gradient_scale_reaches_shared_layers_times_beta() -> None:
    full, half, none = _trunk_grad(1.0), _trunk_grad(0.5), _trunk_grad(0.0)
    assert torch.allclose(half, 0.5 * full, atol=1e-7)
    assert torch.count_nonzero(none) == 0


def test_serving_head_sees_true_labels_only() -> None:
    cfg = ExpertConfig(variant="kd")
    out = {"logit": torch.zeros(4, requires_grad=True), "aux_logit": torch.zeros(4), "adapter_logit": torch.zeros(4)}
    label = torch.tensor([1.0, 0.0, 1.0, 0.0])
    expert_loss(out, label, torch.full((4,), 5.0), cfg).backward()
    grad_fm_confident = out["logit"].grad.clone()
    out["logit"].grad = None
    expert_loss(out, label, torch.full((4,), -5.0), cfg).backward()
    assert torch.equal(out["logit"].grad, grad_fm_confident)  # the FM prediction never reaches the serving head


# FM base preset, forward FLOPs per example as measured by the FM helper (fm/config.py docstring table).
FM_BASE_FLOPS = 0.69e6


@pytest.mark.parametrize("variant", VARIANTS)
def test_expert_is_at_most_a_tenth_of_the_base_fm(variant: str) -> None:
    from fm.config import FMConfig
    from fm.model import FoundationModel  # tests may import fm; the experts package never does

    fm_params = param_count(FoundationModel(FMConfig.from_preset("base")))
    expert = Expert(ExpertConfig(variant=variant), repr_dim=32, tae_dim=32)  # FM small/base repr widths
    assert param_count(expert) <= fm_params / 10, (param_count(expert), fm_params)
    assert flops_per_example(expert) <= FM_BASE_FLOPS / 10
    # cross-check the analytic count with torch's FLOP counter (one example)
    from torch.utils.flop_counter import FlopCounterMode

    batch = {"cats": torch.zeros(1, 8, dtype=torch.int64), "loop_repr": torch.zeros(1, 20, 32),
             "loop_mask": torch.ones(1, 20, dtype=torch.bool), "loop_click": torch.ones(1, 20), "tae": torch.zeros(1, 32), "fm_logit": torch.zeros(1),
             "counters": torch.zeros(1, len(DENSE_NAMES))}
    with FlopCounterMode(display=False) as counter:
        expert(batch)
    assert counter.get_total_flops() <= FM_BASE_FLOPS / 10


def test_expert_serves_the_ema_and_a_warm_start_continues_it(lake_uri: str) -> None:
    lake, ws = make_lake(lake_uri, days=3, rows=400)
    for w in ws[1:]:
        build_expert_examples(lake, w, "feed", "small")
    day1 = load_examples(lake, "small", ws[1].ds, "feed", 20)
    day2 = load_examples(lake, "small", ws[2].ds, "feed", 20)
    cfg = ExpertConfig(variant="base")
    first, _ = train_window(new_checkpoint(cfg, day1, "small", "feed"), day1, ws[1], [(ws[1].ds, day1.fm_versions[0])])
    assert first.ema is not None
    steps = first.ema["updates"]
    assert steps > 1
    served, raw = first.build().state_dict(), first.build(serving=False).state_dict()
    # the EMA weights, the head's intercept re-centred on the window (calib_bias)
    assert all(torch.equal(served[k], first.ema["weights"][k]) for k in first.ema["weights"] if k != "head.bias")
    assert torch.allclose(served["head.bias"], first.ema["weights"]["head.bias"] + first.calib_bias)
    assert any(not torch.equal(served[k], raw[k]) for k in first.ema["weights"]), "serving the last iterate"
    second, _ = train_window(first, day2, ws[2], [(ws[2].ds, day2.fm_versions[0])])
    assert second.ema is not None and second.ema["updates"] > steps  # one average across windows
    # ema_decay 0 serves the last iterate
    last, _ = train_window(new_checkpoint(ExpertConfig(variant="base", ema_decay=0.0), day1, "small", "feed"), day1,
                           ws[1], [(ws[1].ds, day1.fm_versions[0])])
    assert all(torch.equal(last.build().state_dict()[k], last.model[k]) for k in last.model if k != "head.bias")


def test_every_variant_starts_as_exactly_base_and_only_fm_inputs_move_it_away(lake_uri: str) -> None:
    lake, ws = make_lake(lake_uri, days=2, rows=300)
    build_expert_examples(lake, ws[1], "feed", "small")
    data = load_examples(lake, "small", ws[1].ds, "feed", 20)
    start = {v: new_checkpoint(ExpertConfig(variant=v), data, "small", "feed") for v in VARIANTS}
    base = predict(start["base"].build(), data)
    for v in VARIANTS:  # same seed: the same base weights; FM inputs enter through zero projections
        assert np.array_equal(predict(start[v].build(), data), base), v
        shared = {k: t for k, t in start[v].model.items() if k in start["base"].model}
        assert all(torch.equal(t, start["base"].model[k]) for k, t in shared.items()), v
    # kd with no teacher advantage (scale 0) trains exactly as base: distillation is the only difference
    lineage = [(ws[1].ds, data.fm_versions[0])]
    b, _ = train_window(start["base"], data, ws[1], lineage)
    k, _ = train_window(start["kd"], data, ws[1], lineage, kd=0.0)
    assert np.allclose(predict(k.build(), data), predict(b.build(), data), atol=1e-6)
    k1, _ = train_window(start["kd"], data, ws[1], lineage, kd=1.0)
    assert not np.allclose(predict(k1.build(), data), predict(b.build(), data), atol=1e-4)


@pytest.mark.parametrize(("student", "teacher", "expected"), [
    (0.95, 0.90, 1.0), (0.95, 0.9475, 0.5), (0.95, 0.95, 0.0), (0.95, 0.99, 0.0), (float("nan"), 0.9, 0.0)])
def test_kd_scale_follows_the_teachers_measured_advantage(student: float, teacher: float, expected: float) -> None:
    from experts.distill import kd_scale

    assert kd_scale(student, teacher, 0.005) == pytest.approx(expected)


def test_fit_bias_recentres_the_mean_prediction_and_next_offset_learns_the_excess() -> None:
    from experts.train import fit_bias, next_offset

    z = torch.from_numpy(np.random.default_rng(0).normal(-3.0, 1.0, 5_000))
    b = fit_bias(z, 0.08)
    assert float(torch.sigmoid(z + b).mean()) == pytest.approx(0.08, abs=1e-7)
    assert fit_bias(z, 0.0) == 0.0 and fit_bias(z[:0], 0.1) == 0.0
    # predicted 10% over the CTR's own move (calibration 1.1 where CTR(D-1)/CTR(D) = 1): offset += gain * log 1.1
    assert next_offset(0.0, 1.1, 0.05, 0.05, 0.5) == pytest.approx(0.5 * np.log(1.1))
    assert next_offset(0.2, 1.0, 0.06, 0.05, 0.5) == pytest.approx(0.2 + 0.5 * np.log(1.0 * 0.05 / 0.06))
    assert next_offset(0.3, float("nan"), 0.05, 0.05, 0.5) == 0.3


@pytest.mark.parametrize(("streak", "fm_hi", "own_lo", "gate", "expected"), [
    (0, -0.01, -0.01, 0.0, (0.0, 1)),  # first confident window: not yet
    (1, -0.01, -0.01, 0.0, (0.5, 2)),  # second: opens by one step
    (2, -0.01, -0.01, 0.5, (1.0, 3)),  # then a step a window while the FM is ahead
    (3, +0.01, -0.01, 1.0, (1.0, 0)),  # the FM's lead not confident today: an open input stays open
    (3, -0.01, +0.01, 1.0, (0.5, 4)),  # the variant confidently worse than base: one step back
    (0, +0.01, -0.01, 0.0, (0.0, 0)),  # no lead, closed: stays closed
])
def test_fm_inputs_open_only_after_confident_fm_windows(streak: int, fm_hi: float, own_lo: float, gate: float,
                                                        expected: tuple[float, int]) -> None:
    from dataclasses import replace

    from experts.train import fm_gate

    ckpt = replace(_dummy_checkpoint("fe"), fm_streak=streak, fm_gate=gate)
    evaluation = {"fm_vs_base_hi": fm_hi, "base_ne": 0.95, "fm": {"ne": 0.90}, "metrics": {"ne_vs_base_lo": own_lo}}
    assert fm_gate(ckpt, evaluation) == expected
    assert fm_gate(ckpt, {}) == (0.0, 0)  # a cold start: no evidence, inputs off


def _dummy_checkpoint(variant: str):  # type: ignore[no-untyped-def]
    from experts.checkpoint import Checkpoint

    return Checkpoint(ExpertConfig(variant=variant), 4, 4, {}, None, "", "small", "feed")
