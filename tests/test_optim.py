"""Optimizer parameter groups and learning-rate schedules."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau

from histo_dist.config import ConfigError, from_dict
from histo_dist.models import ModelConfig, build_model
from histo_dist.optim import OptimConfig, ScheduleConfig, build_optimizer, build_scheduler, param_groups

LR = 0.1


@pytest.fixture(scope="module")
def resnet():
    return build_model(ModelConfig(name="resnet18"), 2)


def sgd(*params_lrs: float) -> torch.optim.Optimizer:
    """An optimizer with one single-parameter group per lr."""
    return torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))], "lr": lr} for lr in params_lrs])


def run(cfg: ScheduleConfig, total: int, lrs=(LR,)) -> list[list[float]]:
    """The lrs of each group at every step 0..total+2 (stepping past the end too)."""
    optimizer = sgd(*lrs)
    scheduler = build_scheduler(optimizer, cfg, total)
    seen = []
    for _ in range(total + 3):
        seen.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return seen


# ---------------------------------------------------------------------------------------------
# Parameter groups


def test_groups_give_norms_and_biases_no_decay_and_the_backbone_its_lr(resnet):
    groups = param_groups(resnet, OptimConfig(lr=LR, weight_decay=0.05, backbone_lr_scale=0.1))
    by_name = {g["name"]: g for g in groups}
    assert list(by_name) == ["backbone/decay", "backbone/no_decay", "head/decay", "head/no_decay"]
    ids = {name: {id(p) for p in g["params"]} for name, g in by_name.items()}
    net = resnet.net
    assert id(net.conv1.weight) in ids["backbone/decay"]
    assert {id(net.bn1.weight), id(net.bn1.bias), id(net.layer4[1].bn2.weight)} <= ids["backbone/no_decay"]
    assert ids["head/decay"] == {id(net.fc[1].weight)} and ids["head/no_decay"] == {id(net.fc[1].bias)}
    assert sum(len(s) for s in ids.values()) == len(list(resnet.parameters()))  # each parameter exactly once
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [
        (pytest.approx(LR * 0.1), 0.05),
        (pytest.approx(LR * 0.1), 0.0),
        (LR, 0.05),
        (LR, 0.0),
    ]
    optimizer = build_optimizer(resnet, OptimConfig(lr=LR, weight_decay=0.05, backbone_lr_scale=0.1))
    assert [g["lr"] for g in optimizer.param_groups] == [g["lr"] for g in groups]


def test_decay_norm_and_bias_puts_everything_in_decay_groups(resnet):
    groups = param_groups(resnet, OptimConfig(weight_decay=0.05, decay_norm_and_bias=True))
    assert [g["name"] for g in groups] == ["backbone/decay", "head/decay"]
    assert all(g["weight_decay"] == 0.05 for g in groups)


def test_frozen_or_zero_lr_backbone_is_left_out():
    frozen = build_model(ModelConfig(name="resnet18", freeze="all"), 2)
    assert [g["name"] for g in param_groups(frozen, OptimConfig())] == ["head/decay", "head/no_decay"]
    partly = build_model(ModelConfig(name="resnet18", freeze="layer3"), 2)
    trainable = {id(p) for p in partly.parameters() if p.requires_grad}
    assert {id(p) for g in param_groups(partly, OptimConfig()) for p in g["params"]} == trainable
    model = build_model(ModelConfig(), 2)
    assert [g["name"] for g in param_groups(model, OptimConfig(backbone_lr_scale=0.0))] == [
        "head/decay",
        "head/no_decay",
    ]


def test_a_model_without_a_head_trains_at_the_full_lr():
    groups = param_groups(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)), OptimConfig(lr=LR, backbone_lr_scale=0.1))
    assert [(g["name"], g["lr"], len(g["params"])) for g in groups] == [("head/decay", LR, 1), ("head/no_decay", LR, 3)]


def test_a_wrapped_model_keeps_its_head(resnet):
    cfg = OptimConfig(backbone_lr_scale=0.1)
    assert [g["name"] for g in param_groups(nn.DataParallel(resnet), cfg)] == [
        g["name"] for g in param_groups(resnet, cfg)
    ]


@pytest.mark.parametrize(
    ("cfg", "cls", "settings"),
    [
        (OptimConfig(name="sgd", momentum=0.8, nesterov=True), torch.optim.SGD, {"momentum": 0.8, "nesterov": True}),
        (OptimConfig(name="adam", betas=(0.8, 0.9)), torch.optim.Adam, {"betas": (0.8, 0.9)}),
        (OptimConfig(name="adamw"), torch.optim.AdamW, {"betas": (0.9, 0.999)}),
    ],
)
def test_each_optimizer_is_built_with_its_settings_and_steps(cfg, cls, settings):
    model = build_model(ModelConfig(), 2)
    optimizer = build_optimizer(model, cfg)
    assert type(optimizer) is cls
    assert {k: optimizer.defaults[k] for k in settings} == settings
    before = model.net.fc[1].weight.clone()
    model(torch.randn(2, 3, 96, 96)).sum().backward()
    optimizer.step()
    assert not torch.equal(model.net.fc[1].weight, before)


# ---------------------------------------------------------------------------------------------
# Schedules


def test_warmup_is_linear_from_near_zero_to_lr():
    lrs = [g[0] for g in run(ScheduleConfig(name="cosine", warmup_steps=9), 100)]
    assert lrs[0] == pytest.approx(LR / 10)
    assert [b - a for a, b in zip(lrs[:9], lrs[1:10])] == pytest.approx([LR / 10] * 9)
    assert lrs[9] == pytest.approx(LR)
    assert lrs[10] < LR  # cosine decay starts right after


def test_cosine_ends_at_min_lr_ratio_and_keeps_the_backbone_scale():
    seen = run(ScheduleConfig(name="cosine", min_lr_ratio=0.1), 100, lrs=(LR, LR * 0.1))
    assert seen[0] == pytest.approx([LR, LR * 0.1])
    assert seen[50][0] == pytest.approx(LR * (0.1 + 0.9 * 0.5))
    assert all(head == pytest.approx(10 * backbone) for head, backbone in seen)
    assert seen[100] == seen[102] == pytest.approx([LR * 0.1, LR * 0.01])  # stepping past the end keeps the floor


def test_linear_falls_in_equal_steps_from_the_warmup_to_min_lr_ratio():
    seen = [g[0] for g in run(ScheduleConfig(name="linear", warmup_steps=9, min_lr_ratio=0.1), 109)]
    assert seen[9] == pytest.approx(LR)  # the warmup's top
    falls = [a - b for a, b in zip(seen[9:109], seen[10:110])]
    assert falls == pytest.approx([LR * 0.9 / 100] * 100)  # a straight line, not a cosine
    assert seen[109] == seen[111] == pytest.approx(LR * 0.1)  # the floor, kept past the end


def test_a_cosine_cut_at_its_warmup_by_a_time_budget_still_has_a_learning_rate():
    from histo_dist.optim import lr_factor

    cfg = ScheduleConfig(name="cosine", warmup_steps=10)
    assert lr_factor(cfg, 10, 10) == pytest.approx(1.0)  # the step after a run planned to end at its warmup
    assert lr_factor(cfg, 6, 6) == pytest.approx(7 / 11)  # or inside it: still the warmup's ramp


def test_a_warmup_cut_by_a_time_budget_keeps_its_ramp_then_decays_from_where_it_got():
    from histo_dist.optim import lr_factor

    cfg = ScheduleConfig(name="cosine", warmup_steps=60, min_lr_ratio=0.1)
    cut = [lr_factor(cfg, 46, s, warmup_end=25) for s in range(47)]
    assert cut[:25] == [lr_factor(cfg, 46, s) for s in range(25)]  # the steps before the cut keep their lr
    assert cut[25] == pytest.approx(26 / 61)  # the ramp's next value, where the decay starts (not a jump to 1)
    assert all(b < a for a, b in zip(cut[25:46], cut[26:47]))  # decaying, not rising, to the last step
    assert cut[46] == pytest.approx(0.1)  # the floor: min_lr_ratio, below where the ramp got
    low = ScheduleConfig(name="cosine", warmup_steps=60, min_lr_ratio=0.9)
    assert lr_factor(low, 46, 46, warmup_end=25) == pytest.approx(26 / 61)  # a floor above the peak: held there
    assert lr_factor(cfg, 46, 30, warmup_end=60) == lr_factor(cfg, 46, 30)  # a cut at the warmup's end: none
    assert lr_factor(ScheduleConfig(name="constant", warmup_steps=60), 46, 40, warmup_end=25) == pytest.approx(26 / 61)
    step = ScheduleConfig(name="step", warmup_steps=60, step_size=5, gamma=0.5)
    assert lr_factor(step, 46, 30, warmup_end=25) == pytest.approx(26 / 61 * 0.5)
    linear = ScheduleConfig(name="linear", warmup_steps=60)
    assert lr_factor(linear, 45, 25, warmup_end=25) == pytest.approx(26 / 61)  # from where the ramp got
    assert lr_factor(linear, 45, 35, warmup_end=25) == pytest.approx(26 / 61 / 2)  # halfway down a straight line


def test_step_decays_every_step_size_after_warmup():
    lrs = [g[0] for g in run(ScheduleConfig(name="step", warmup_steps=3, step_size=5, gamma=0.5), 20)]
    assert lrs[3:8] == pytest.approx([LR] * 5)
    assert lrs[8:13] == pytest.approx([LR * 0.5] * 5)
    assert lrs[13] == pytest.approx(LR * 0.25)


def test_constant_holds_after_warmup():
    lrs = [g[0] for g in run(ScheduleConfig(name="constant", warmup_steps=4), 10)]
    assert lrs[0] == pytest.approx(LR / 5)
    assert lrs[4:] == pytest.approx([LR] * 9)


def test_onecycle_rises_to_lr_then_falls():
    lrs = [g[0] for g in run(ScheduleConfig(name="onecycle", pct_start=0.25), 100)]
    assert lrs[0] == pytest.approx(LR / 25)
    assert max(lrs) == pytest.approx(LR) and lrs.index(max(lrs)) == 25
    assert all(a < b for a, b in zip(lrs[:25], lrs[1:26]))
    assert all(a > b for a, b in zip(lrs[25:100], lrs[26:101]))
    assert lrs[100] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(("mode", "better"), [("min", 0.5), ("max", 2.0)])
def test_plateau_reduces_after_patience(mode, better):
    optimizer = sgd(LR)
    scheduler = build_scheduler(
        optimizer, ScheduleConfig(name="plateau", mode=mode, patience=2, factor=0.5, min_lr_ratio=0.3), 1
    )
    assert isinstance(scheduler, ReduceLROnPlateau)
    lrs = []
    for metric in [1.0, better, better, better, better, better**2, better**2, better**2, better**2]:
        scheduler.step(metric)
        lrs.append(optimizer.param_groups[0]["lr"])
    # The third evaluation in a row without improvement halves the lr; an improvement restarts the count;
    # the second halving stops at the floor LR * min_lr_ratio.
    assert lrs == pytest.approx([LR] * 4 + [LR * 0.5] * 4 + [LR * 0.3])


def test_scheduler_resumes_from_its_state_dict():
    cfg = ScheduleConfig(name="cosine", warmup_steps=5)
    optimizer = sgd(LR)
    scheduler = build_scheduler(optimizer, cfg, 50)
    for _ in range(20):
        optimizer.step()
        scheduler.step()
    resumed_optimizer = sgd(LR)
    resumed = build_scheduler(resumed_optimizer, cfg, 50)
    resumed.load_state_dict(scheduler.state_dict())
    optimizer.step(), scheduler.step(), resumed_optimizer.step(), resumed.step()
    assert resumed.get_last_lr() == pytest.approx(scheduler.get_last_lr())


def test_warmup_must_fit_the_run():
    with pytest.raises(ConfigError, match="warmup_steps: 100 must be less than the run's 100 optimizer steps"):
        build_scheduler(sgd(LR), ScheduleConfig(warmup_steps=100), 100)


# ---------------------------------------------------------------------------------------------
# Configuration


def test_optim_config_problems_name_their_field():
    assert OptimConfig().validate() == []
    (problem,) = OptimConfig(name="adamm").validate()
    assert problem == "name: unknown 'adamm' (did you mean 'adam'?); known: adam, adamw, sgd"
    problems = OptimConfig(
        lr=0.0, weight_decay=-1, momentum=1.0, nesterov=True, betas=(0.9, 1.0), backbone_lr_scale=-0.1
    ).validate()
    assert [p.split(":")[0] for p in problems] == [
        "lr",
        "weight_decay",
        "momentum",
        "nesterov",
        "betas",
        "backbone_lr_scale",
    ]
    (problem,) = OptimConfig(lr=math.nan).validate()
    assert problem.startswith("lr:")
    with pytest.raises(ConfigError) as error:
        from_dict(OptimConfig, {"name": "sgd", "momentum": 0.0, "nesterov": True})
    assert error.value.problems == ["nesterov: needs name=sgd and momentum > 0"]
    with pytest.raises(ConfigError, match="lr: must be > 0"):
        build_optimizer(nn.Linear(2, 2), OptimConfig(lr=-1.0))


def test_schedule_config_problems_name_their_field():
    assert ScheduleConfig().validate() == []
    (problem,) = ScheduleConfig(name="cosin").validate()
    assert problem.startswith("name: unknown 'cosin' (did you mean 'cosine'?)")
    problems = ScheduleConfig(
        warmup_steps=-1, min_lr_ratio=2, step_size=0, gamma=0, pct_start=1, factor=1, patience=-1
    ).validate()
    assert [p.split(":")[0] for p in problems] == [
        "warmup_steps",
        "min_lr_ratio",
        "step_size",
        "gamma",
        "pct_start",
        "factor",
        "patience",
    ]
    (problem,) = ScheduleConfig(name="plateau", warmup_steps=10).validate()
    assert problem.startswith("warmup_steps: not used by plateau")
    with pytest.raises(ConfigError) as error:
        from_dict(ScheduleConfig, {"name": "plateau", "mode": "maximize"})
    assert error.value.problems[0].startswith("mode: expected one of 'min', 'max'")
