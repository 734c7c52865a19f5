"""Time budgets: the plan is the most steps that fit, re-made from the steady speed at growing intervals, made
inside the warmup (cutting a warmup longer than half the run), a run keeps its final plan across a resume (bitwise), and
every rank follows rank 0's plan."""

from __future__ import annotations

import itertools
import json
import math

import pytest

import histo_dist.budget as budget
from histo_dist.budget import BudgetError, Plan, make_plan, parse_duration, replan_step
from tests.runs import ROOT, final_state, make_train_shards, records, run, train_cmd

PLAN = dict(
    budget_s=300.0,
    step=20,
    elapsed_s=30.0,
    step_s=0.25,
    eval_s_per_sample=0.001,
    steps_per_epoch=100,
    eval_every_steps=0,
    valid_samples=2500,
    test_samples=5000,
    test_views=1,
)


@pytest.mark.parametrize(
    "text, seconds", [("300s", 300), ("45m", 2700), ("2h", 7200), ("1h30m", 5400), ("90", 90), (" 2.5m ", 150)]
)
def test_durations_parse(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5 minutes", "0s", "-3m", "1d", "10x", "s", "inf"])
def test_bad_durations_are_refused_by_name(text):
    with pytest.raises(BudgetError, match="duration|more than 0"):
        parse_duration(text)


def cost(plan, total: int) -> float:
    """Seconds a plan of `total` steps takes after the planning step, by the plan's own estimates."""
    p = dict(PLAN, **plan)
    every = p["eval_every_steps"] or p["steps_per_epoch"]
    validations = total // every - p["step"] // every + (total % every != 0)
    return (total - p["step"]) * p["step_s"] + validations * p["valid_samples"] * p["eval_s_per_sample"]


@pytest.mark.parametrize(
    "change",
    [
        {},
        {"eval_every_steps": 7},
        {"test_views": 8},
        {"test_views": 8, "view_s_per_sample": 0.0004},
        {"view_s_per_sample": 0.0004},
        {"step_s": 0.013},
        {"valid_samples": 0},
        {"budget_s": 3600.0, "elapsed_s": 500.0},
    ],
)
def test_the_plan_is_the_most_steps_that_fit(change):
    plan = make_plan(**{**PLAN, **change})
    p = {**PLAN, **change}
    available = p["budget_s"] - p["elapsed_s"] - plan.test_s - plan.reserve_s
    view_s = p.get("view_s_per_sample") or p["eval_s_per_sample"]  # each view after the first
    assert plan.test_s == pytest.approx(p["test_samples"] * (p["eval_s_per_sample"] + (p["test_views"] - 1) * view_s))
    assert plan.total_steps > p["step"]
    assert cost(change, plan.total_steps) <= available < cost(change, plan.total_steps + 1)
    assert plan.validations == (
        0
        if not p["valid_samples"]
        else math.ceil(plan.total_steps / (p["eval_every_steps"] or 100)) - p["step"] // (p["eval_every_steps"] or 100)
    )


def test_tta_views_are_priced_at_the_forward_pass_alone_the_input_prepared_once():
    per_view = make_plan(**{**PLAN, "test_views": 8})  # a plan made before the forward pass was timed apart
    forward_only = make_plan(**{**PLAN, "test_views": 8, "view_s_per_sample": 0.0004})
    assert per_view.test_s == pytest.approx(40.0)  # 5,000 samples x 8 views x 1 ms
    assert forward_only.test_s == pytest.approx(19.0)  # 5,000 x (1 ms + 7 x 0.4 ms)
    # the 21 s saved train 84 more steps at 0.25 s, less 10 for the validation (2.5 s) they bring
    assert forward_only.total_steps == per_view.total_steps + 84 - 10
    assert Plan.from_dict(forward_only.to_dict()).view_s_per_sample == 0.0004


def test_a_spent_budget_ends_the_run_at_the_plan_and_says_so():
    plan = make_plan(**{**PLAN, "elapsed_s": 295.0})
    assert plan.total_steps == PLAN["step"]
    assert "is spent" in plan.describe() and "train.time_budget" in plan.describe()
    assert make_plan(**{**PLAN, "max_steps": 50}).total_steps == 50


def test_a_run_re_plans_at_four_warmups_then_at_four_times_each_re_plan_then_at_the_middles_of_its_plans():
    plan = make_plan(**PLAN)  # at step 20, about 900 steps
    assert plan.total_steps > 400
    assert replan_step(plan, warmup_steps=20) == 80
    assert replan_step(plan, warmup_steps=2) == 80  # a warmup shorter than the plan's step: 4 x the plan's step
    second = make_plan(**{**PLAN, "step": 80, "elapsed_s": 45.0})
    assert replan_step(second, warmup_steps=20) == 320  # 4 x the re-plan's step, before the middle
    third = make_plan(**{**PLAN, "step": 320, "elapsed_s": 105.0})
    middle = 320 + (third.total_steps - 320) // 2
    assert middle < 1280  # 4 x 320 is past the middle: the middle instead
    assert replan_step(third, warmup_steps=20) == middle
    # the middles go on while they leave as many steps to time as the warmup had; then the plan is final
    near_end = Plan.from_dict({**third.to_dict(), "planned_at_step": 1000, "total_steps": 1040})
    assert replan_step(near_end, warmup_steps=20) == 1020
    assert replan_step(near_end, warmup_steps=21) == 0
    late = (plan.total_steps - 20) // 2 + 20
    assert replan_step(plan, warmup_steps=late // 4) == late // 4 * 4
    assert replan_step(plan, warmup_steps=late // 4 + 1) == late  # 4 x the warmup after the middle: the middle
    # the first plan, timed on the warmup's slower steps, re-plans at its middle while MIN_CALIBRATION_STEPS fit
    short = {**plan.to_dict(), "total_steps": 20 + 2 * budget.MIN_CALIBRATION_STEPS}
    assert replan_step(Plan.from_dict(short), warmup_steps=20, first=True) == 20 + budget.MIN_CALIBRATION_STEPS
    assert replan_step(Plan.from_dict(short), warmup_steps=20) == 0  # a later plan needs a warmup's steps
    shorter = {**short, "total_steps": short["total_steps"] - 1}  # too few steps before the middle to time
    assert replan_step(Plan.from_dict(shorter), warmup_steps=20, first=True) == 0
    first = Plan.from_dict({**plan.to_dict(), "final": False, "replan_at_step": 80})
    assert "re-planned at step 80" in first.describe()
    older = {k: v for k, v in plan.to_dict().items() if k not in ("final", "replan_at_step", "view_s_per_sample")}
    assert Plan.from_dict(older).final and Plan.from_dict(older).view_s_per_sample is None  # a plan.json from before


def test_re_planning_at_the_middles_ends_within_a_handful_of_plans_as_the_clock_runs():
    """A run whose time goes as its plans said: what is left halves at each plan, so the plans end before twice
    the warmup is left, and the last one is final."""
    warmup, step, elapsed, plans = 20, 20, 30.0, []
    while True:
        plan = make_plan(**{**PLAN, "step": step, "elapsed_s": elapsed})
        at = replan_step(plan, warmup_steps=warmup, first=not plans)
        plans.append(plan)
        if not at:
            break
        elapsed += plan.step_s * (at - step) + plan.validation_s * (at // 100 - step // 100)
        step = at
    assert [p.planned_at_step for p in plans[:3]] == [20, 80, 320]
    assert 4 <= len(plans) <= 10
    assert plans[-1].total_steps - plans[-1].planned_at_step < 2 * warmup + 2
    assert abs(plans[-1].total_steps - plans[0].total_steps) <= 2  # the clock went as planned: the same end


def test_the_end_of_a_run_says_what_it_used_and_warns_when_it_overran():
    assert budget.spent(300.0, 288.4) == (False, "time budget 300 s: the run took 288 s (12 s left)")
    overran, message = budget.spent(300.0, 326.2)
    assert overran and message.startswith("time budget 300 s overrun: the run took 326 s, 26 s more.")
    assert "train.time_budget" in message


def test_a_warmup_longer_than_half_the_planned_run_is_cut_there_or_at_once():
    assert budget.cut_warmup(step=25, total_steps=46, warmup_steps=60) == 25  # half is past: at once
    assert budget.cut_warmup(step=25, total_steps=80, warmup_steps=60) == 40  # at half the planned steps
    assert budget.cut_warmup(step=25, total_steps=120, warmup_steps=60) is None  # the warmup fits in half
    assert budget.cut_warmup(step=60, total_steps=100, warmup_steps=60) is None  # planned at its end: nothing to cut
    assert budget.cut_warmup(step=25, total_steps=25, warmup_steps=60) is None  # a spent budget: no steps to decay
    assert Plan.from_dict({**make_plan(**PLAN).to_dict(), "warmup_end": 7}).warmup_end == 7
    old = make_plan(**PLAN).to_dict()
    del old["warmup_end"]  # a plan.json written before the field
    assert Plan.from_dict(old).warmup_end is None


# ---------------------------------------------------------------------------------------------
# A budgeted run, in-process with a fake clock (the plan is then the same every time)

BASE = [
    "loader.batch_size=16",
    "loader.eval_batch_size=32",
    "loader.num_workers=0",
    "loader.shuffle_buffer=64",
    "train.deterministic=true",
    "tracking.progress=false",
    "tracking.wandb=false",
    "tracking.log_every_steps=2",
    "schedule.warmup_steps=10",
    "train.time_budget=40s",
    "train.eval_every_steps=9",
    "checkpoint.every_steps=5",
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_train_shards(tmp_path_factory.mktemp("budget-shards"))


@pytest.fixture
def fake_clock(monkeypatch):
    """Every reading 1 s after the last; the process is 5 s older than the last reading, so a run ages as its clock
    runs (with an age that stood still, each plan would find as much time left as the one before, and re-plan at
    its middle without end). Call the fixture's value to start the clock again, for a second run."""
    clock = {"t": 0.0}

    def now():
        clock["t"] += 1.0
        return clock["t"]

    monkeypatch.setattr(budget, "now", now)
    monkeypatch.setattr(budget, "process_age", lambda: 5.0 + clock["t"])
    return lambda: clock.update(t=0.0)


def assert_chained(plans: list[dict], warmup_steps: int) -> None:
    """Each plan made at the step the one before named (4 x its step, or the middle of what it had left), only the
    last final."""
    assert [p["final"] for p in plans] == [False] * (len(plans) - 1) + [True]
    for before, after in zip(plans, plans[1:]):
        at = before["planned_at_step"]
        middle = at + (before["total_steps"] - at) // 2
        assert after["planned_at_step"] == before["replan_at_step"] in (4 * max(at, warmup_steps), middle)
    last = plans[-1]
    assert last["total_steps"] - last["planned_at_step"] < 2 * max(warmup_steps, budget.MIN_CALIBRATION_STEPS)


def assert_resumed_after_the_final_plan_bitwise(monkeypatch, config, reference, run_dir, restart_clock) -> None:
    """Run `config()` again into `run_dir`, preempted halfway from `reference`'s final plan to its end (the clock
    restarted, so its readings are the reference run's up to there), and resume it with a clock that would plan
    otherwise: it keeps the checkpoint's plan, and ends at the same step with the same weights."""
    from histo_dist.preemption import Preempted
    from histo_dist.train import Trainer, train

    plan = json.loads((reference / "plan.json").read_text())
    total = plan["total_steps"]
    stop_at = (plan["planned_at_step"] + total) // 2
    assert plan["planned_at_step"] < stop_at < total
    real = Trainer.preempted
    monkeypatch.setattr(Trainer, "preempted", lambda self: self.step == stop_at or real(self))
    restart_clock()
    with pytest.raises(Preempted):
        train(config(), run_dir)
    monkeypatch.setattr(Trainer, "preempted", real)
    monkeypatch.setattr(budget, "now", lambda: 0.0)  # a plan made now would differ (or fail)
    train(config(), run_dir)
    a, b = final_state(reference), final_state(run_dir)
    assert a["step"] == b["step"] == total
    for key in a["model"]:
        assert a["model"][key].equal(b["model"][key]), key


@pytest.mark.slow
def test_a_budgeted_run_re_plans_until_its_plan_is_final_and_a_resumed_run_keeps_that_plan(
    shards, tmp_path, monkeypatch, fake_clock, keep_signal_handlers
):
    from histo_dist.experiment import load_experiment
    from histo_dist.train import train

    def config():  # long enough to re-plan (at 4 x 10 steps, then at middles)
        return load_experiment(
            ROOT / "configs/cpu_test.yaml", [f"data.shards={shards}", *BASE, "train.time_budget=100s"]
        )

    reference = tmp_path / "reference"
    train(config(), reference)
    plan = json.loads((reference / "plan.json").read_text())
    plans = records(reference, "plan")  # at the end of the warmup, at 4 x 10 steps, then at middles
    first, logged = plans[0], plans[-1]
    assert (first["planned_at_step"], first["final"], first["replan_at_step"]) == (10, False, 40)
    assert plans[1]["planned_at_step"] == 40 and len(plans) >= 3
    assert_chained(plans, warmup_steps=10)
    assert {k: logged[k] for k in plan} == plan and logged["step"] == plan["planned_at_step"] and plan["final"]
    assert plans[1]["step_s"] != first["step_s"]  # timed again, over the steps since the first plan
    total = plan["total_steps"]
    assert 80 < total < 10_000 and final_state(reference)["step"] == total  # it ran to the planned step, not 3 epochs
    assert final_state(reference)["plan"] == plan
    lrs = [r["lr"] for r in records(reference, "train")]
    assert lrs[-1] < 0.05 * max(lrs)  # the cosine ends at the planned step

    # Preempted after the final plan; the resumed run (whose clock would give another plan) keeps it.
    assert_resumed_after_the_final_plan_bitwise(monkeypatch, config, reference, tmp_path / "run", fake_clock)


@pytest.mark.slow
def test_a_longer_budget_re_plans_at_four_times_each_re_plan_then_at_the_middles_until_one_is_final(
    shards, tmp_path, monkeypatch, fake_clock
):
    """The trainer follows replan_step through its plans: each plan is made at the step the one before named,
    4 x its step while that comes before the middle of its plan, then that middle; only the last is final, and the
    run ends at the last one's total."""
    from histo_dist.experiment import load_experiment
    from histo_dist.train import Trainer, train

    # Each plan times an evaluation batch (two passes at the first, one after); the test is priced at the least of
    # the timings so far. The fake clock times every pass alike: scale them so that one is slow and one is fast.
    timed, real = [], Trainer._eval_seconds_per_sample

    def scaled(self, passes):
        factor = {1: 0.5, 2: 2.0}.get(len(timed), 1.0)  # the second plan's timing fast, the third's slow
        timed.append((passes, *(factor * seconds for seconds in real(self, passes))))
        return timed[-1][1:]

    monkeypatch.setattr(Trainer, "_eval_seconds_per_sample", scaled)
    overrides = ["train.time_budget=80s", "train.epochs=20", "train.eval_every_steps=200", "checkpoint.every_steps=500"]
    run_dir = tmp_path / "run"
    train(load_experiment(ROOT / "configs/cpu_test.yaml", [f"data.shards={shards}", *BASE, *overrides]), run_dir)
    plans = records(run_dir, "plan")
    assert [passes for passes, *_ in timed] == [2] + [1] * (len(plans) - 1)
    for i, p in enumerate(plans):
        assert p["eval_s_per_sample"] == min(eval_s for _, eval_s, _ in timed[: i + 1])
        assert p["view_s_per_sample"] == min(view_s for *_, view_s in timed[: i + 1])
    assert plans[2]["eval_s_per_sample"] == plans[1]["eval_s_per_sample"] < plans[0]["eval_s_per_sample"]
    assert [p["planned_at_step"] for p in plans[:3]] == [10, 40, 160]
    assert_chained(plans, warmup_steps=10)
    assert plans[3]["planned_at_step"] == 160 + (plans[2]["total_steps"] - 160) // 2  # 640 is past the middle
    assert final_state(run_dir)["step"] == plans[-1]["total_steps"]
    assert json.loads((run_dir / "plan.json").read_text())["planned_at_step"] == plans[-1]["planned_at_step"]


@pytest.mark.slow
def test_a_first_plan_past_its_middle_re_plans_there_pricing_validations_as_measured(shards, tmp_path, fake_clock):
    """A budget whose first plan ends before 4 x the warmup: the run still re-plans from its steady speed, at the
    middle of that plan; each plan prices a validation at what those timed before it took (1 s each on the fake
    clock), not at the first plan's forward pass over random patches, which still prices the test."""
    from histo_dist.experiment import load_experiment
    from histo_dist.manifest import Manifest
    from histo_dist.train import train

    run_dir = tmp_path / "run"
    train(
        load_experiment(ROOT / "configs/cpu_test.yaml", [f"data.shards={shards}", *BASE, "train.time_budget=52s"]),
        run_dir,
    )
    first, second, *more = records(run_dir, "plan")
    middle = 10 + (first["total_steps"] - 10) // 2
    assert middle < 40  # 4 x the warmup: the first plan would have been final
    assert (first["planned_at_step"], first["final"], first["replan_at_step"]) == (10, False, middle)
    assert second["planned_at_step"] == middle and second["final"] and not more
    valid_samples = Manifest.load(shards).split("valid").num_samples
    # (the validation at step 9 came after the warmup's timing began: the first plan prices it as measured too)
    assert first["validation_s"] == second["validation_s"] == 1.0
    assert 1.0 != pytest.approx(valid_samples * first["eval_s_per_sample"])  # what the forward pass would say
    assert second["eval_s_per_sample"] == first["eval_s_per_sample"]
    # each reading of the fake clock is a second: the input's preparation and the forward pass are timed apart
    assert first["view_s_per_sample"] == pytest.approx(first["eval_s_per_sample"] / 2)
    assert second["view_s_per_sample"] == first["view_s_per_sample"]
    assert final_state(run_dir)["step"] == second["total_steps"]


@pytest.mark.slow
def test_a_run_resumed_before_its_final_plan_re_plans_at_the_same_step(
    shards, tmp_path, monkeypatch, fake_clock, keep_signal_handlers
):
    from histo_dist.experiment import load_experiment
    from histo_dist.preemption import Preempted
    from histo_dist.train import Trainer, train

    config = load_experiment(ROOT / "configs/cpu_test.yaml", [f"data.shards={shards}", *BASE, "train.time_budget=100s"])
    real = Trainer.preempted
    monkeypatch.setattr(Trainer, "preempted", lambda self: self.step == 20 or real(self))
    run_dir = tmp_path / "run"
    with pytest.raises(Preempted):
        train(config, run_dir)
    assert not final_state(run_dir)["plan"]["final"]
    monkeypatch.setattr(Trainer, "preempted", real)
    fake_clock()
    train(config, run_dir)
    plans = records(run_dir, "plan")  # the first run's plan at step 10, then the resumed run's
    assert [p["planned_at_step"] for p in plans[:2]] == [10, 40]
    assert_chained(plans, warmup_steps=10)
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["final"] and plan["planned_at_step"] == plans[-1]["planned_at_step"]
    assert final_state(run_dir)["step"] == plan["total_steps"] and final_state(run_dir)["plan"] == plan


@pytest.mark.slow
def test_a_run_plans_inside_its_warmup_once_ten_steps_are_timed(shards, tmp_path, monkeypatch, caplog):
    """A GPU recipe's 100-step warmup on a slow machine: planned once 10 of its steps are timed (at 25 + 10),
    not at its end; that first plan re-plans at its middle, and the run ends at the second plan. Its warmup, more
    than half of the run, is cut (with a warning; the next test follows the cut); one that fits is kept whole."""
    from histo_dist.experiment import load_experiment
    from histo_dist.train import train

    ticks = itertools.count()
    monkeypatch.setattr(budget, "now", lambda: float(next(ticks)))  # >= 0.1 s per step timed
    monkeypatch.setattr(budget, "process_age", lambda: 25.0)  # 35 s left: about 60 steps
    overrides = [f"data.shards={shards}", *BASE, "train.time_budget=60s", "schedule.warmup_steps=100"]
    run_dir = tmp_path / "run"
    with caplog.at_level("WARNING", logger="histo_dist.train"):
        train(load_experiment(ROOT / "configs/cpu_test.yaml", overrides), run_dir)
    first, plan = records(run_dir, "plan")
    assert first["planned_at_step"] == 35
    assert plan["planned_at_step"] == first["replan_at_step"] == 35 + (first["total_steps"] - 35) // 2
    written = json.loads((run_dir / "plan.json").read_text())
    assert {k: plan[k] for k in written} == written
    assert final_state(run_dir)["step"] == plan["total_steps"]
    assert (
        f"schedule.warmup_steps=100 is more than half of the {first['total_steps']} optimizer steps planned"
        in caplog.text
        and f"the warmup ends at step {first['warmup_end']}" in caplog.text
    )

    # With a budget the warmup fits in, the same run plans at the same step and keeps its whole warmup.
    caplog.clear()
    monkeypatch.setattr(budget, "process_age", lambda: 5.0)
    overrides[-2] = "train.time_budget=1000s"
    with caplog.at_level("WARNING", logger="histo_dist.train"):
        train(load_experiment(ROOT / "configs/cpu_test.yaml", [*overrides, "train.max_steps=210"]), tmp_path / "long")
    first = records(tmp_path / "long", "plan")[0]
    assert first["planned_at_step"] == 35 and first["warmup_end"] is None and "warmup ends" not in caplog.text
    lrs = [r["lr"] for r in records(tmp_path / "long", "train")]
    assert max(lrs) == pytest.approx(load_experiment(ROOT / "configs/cpu_test.yaml", overrides).optim.lr)


@pytest.mark.slow
def test_a_warmup_cut_by_an_early_plan_decays_to_the_end_and_a_resumed_run_keeps_the_cut(
    shards, tmp_path, monkeypatch, keep_signal_handlers
):
    """The plan at step 35 above finds its 100-step warmup longer than half of its run: it cuts the warmup (at half the
    planned steps, or at once), the later plan keeps the cut, the learning rate decays from where the ramp got to
    the last step, and a run preempted after the final plan resumes onto the same weights (the cut is in the
    checkpoint's plan)."""
    from histo_dist.experiment import load_experiment
    from histo_dist.train import train

    def config():
        overrides = ["train.time_budget=60s", "schedule.warmup_steps=100"]
        return load_experiment(ROOT / "configs/cpu_test.yaml", [f"data.shards={shards}", *BASE, *overrides])

    def start_clock():
        ticks = itertools.count()
        monkeypatch.setattr(budget, "now", lambda: float(next(ticks)))

    monkeypatch.setattr(budget, "process_age", lambda: 25.0)  # as above: planned at step 35
    start_clock()
    reference = tmp_path / "reference"
    train(config(), reference)
    first, plan = records(reference, "plan")
    cut = first["warmup_end"]
    assert first["planned_at_step"] == 35 and cut == max(35, first["total_steps"] // 2) < 100
    assert plan["warmup_end"] == cut and plan["final"]  # kept by the re-plan, whatever its length
    total = plan["total_steps"]
    lrs = {r["step"]: r["lr"] for r in records(reference, "train")}

    def lrs_between(start: int, end: int) -> list[float]:
        return [lrs[s] for s in sorted(lrs) if start < s <= end]

    ramp = lrs_between(0, cut)
    assert ramp == sorted(ramp) and len(ramp) > 10
    # Falling from the cut to the re-plan and from there to the end (the re-plan's longer cosine lifts it once).
    for decay in lrs_between(cut, plan["planned_at_step"]), lrs_between(plan["planned_at_step"], total):
        assert decay == sorted(decay, reverse=True) and len(decay) >= 3
    assert max(lrs.values()) < config().optim.lr  # the full lr is never reached: the decay starts from the ramp
    assert lrs[total] < 0.05 * max(lrs.values())  # and ends at the last step

    # Preempted after the final plan, resumed with a clock that would plan otherwise: the same weights.
    assert_resumed_after_the_final_plan_bitwise(monkeypatch, config, reference, tmp_path / "run", start_clock)


@pytest.mark.slow
def test_two_ranks_follow_rank_0s_plan(shards, tmp_path):
    """With real clocks on two processes: the same number of steps on both (a difference would hang DDP). A warmup
    of 24 steps is timed from step 6; both ranks take rank 0's plan at step 16, which cuts the warmup there (24 is
    more than half of the 30 steps that max_steps allows): the cut is in the plan both follow."""
    run_dir = tmp_path / "run"
    overrides = [*BASE, "train.time_budget=120s", "train.max_steps=30", "train.deterministic=false"]
    out = run(
        train_cmd(shards, run_dir, *overrides, "schedule.warmup_steps=24", ranks=2),
        timeout=400,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["total_steps"] == 30 and final_state(run_dir)["step"] == 30 and plan["planned_at_step"] == 16
    assert plan["warmup_end"] == 16 and final_state(run_dir)["plan"] == plan
    assert "time budget 120 s: 30 optimizer steps" in out.stderr
    assert out.stderr.count("time budget 120 s: the run took ") == 1  # rank 0 says how much it used, once
