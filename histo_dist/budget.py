"""Time budgets: fit a run's length to the wall-clock time it is given (`train.time_budget`).

A run with a budget measures its own speed while it warms up, plans how many optimizer steps fit,
corrects that plan from its steady speed at growing intervals, and keeps it:

1. During the learning-rate warmup (`schedule.warmup_steps`, at least `MIN_CALIBRATION_STEPS`) it
   trains as usual; the warmup's learning rates do not depend on the run's length.
2. As soon as MIN_CALIBRATION_STEPS of the warmup's steps are timed (or at its end, if that comes
   first), rank 0 times the steps it took (after the first quarter of them, at most
   UNTIMED_WARMUP_STEPS: start-up, first windows and kernel selection are not throughput) and an
   evaluation batch (its preparation and the model's forward pass apart: TTA prepares a batch once and
   passes 8 views of it), and plans: the steps that fit in what is left of the budget once the
   validations, the final test (with TTA if asked) and a safety margin are paid for. Every rank gets
   the same plan. A warmup longer than MAX_WARMUP_SHARE of the planned steps is cut (`cut_warmup`), so
   that a short budget's learning rate decays instead of rising to its last step.
3. Warmup steps are often slower than later ones (loader queues filling, allocator and kernel
   caches warming): on two CPU cores a plan from them alone left a tenth of a 5-minute budget
   unused. And a shared machine's speed drifts: a 30-minute run planned once from a slow minute
   ended 435 s early. So the run re-plans from the steps since its last plan (validations and
   checkpoints left out) at `replan_step`: REPLAN_FACTOR times the warmup, then REPLAN_FACTOR
   times each re-plan's step (at 60 warmup steps: 240, 960, 3840, ...) while that comes before
   the middle of what the plan has left, then at the middle of what each plan has left while
   that leaves as many steps to time as the warmup had. The last plan is `final`: fewer than
   twice the warmup's steps are left after it, with no correction. Without the middles, the
   5-minute CPU recipe's runs (about 1,000 steps) made their final plan at step 240 and ended
   up to 63 s late or 73 s early as the machine's speed moved (docs/benchmarks.md). The plan
   made from the warmup re-plans at its middle while MIN_CALIBRATION_STEPS fit before it. A
   plan prices each validation at what the validations timed since the last plan took (their
   loader start-up and checkpoint included: twice the estimate from a forward pass, on two CPU
   cores), or as the plan before it did if none was. Each re-plan changes the schedule's length
   a little (the cosine's learning rate moves by a few percent). A machine that slows down after
   the final plan makes the run end late: a plan, not a deadline.
4. The plan goes into every checkpoint (and `RUN/plan.json`): a run resumed after the final plan
   keeps it, so it ends at the same step, with the same schedule, as the uninterrupted run would
   have. One resumed before it re-plans at the same step, from its own timing.

The budget counts from the start of the training process (`process_age`), so the Python and
torch imports are in it, as they are in the wall clock of the command.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import asdict, dataclass
from typing import Any

from histo_dist.errors import HistoDistError

MIN_CALIBRATION_STEPS = 10
UNTIMED_WARMUP_STEPS = 25
"""The warmup's first quarter is start-up (compilation, loader queues, allocator), not throughput, and is not
timed; but at most this many steps, so that a run whose steps are slow (a GPU recipe's warmup on a CPU can
outlast the budget many times) plans soon."""
REPLAN_FACTOR = 4
"""A run re-plans at this many times the warmup's steps, then at this many times each re-plan's step (while
that comes before the middle of what the plan has left), then at the middles."""
MAX_WARMUP_SHARE = 0.5
"""A run whose first plan (made inside its warmup) finds the warmup longer than this share of its planned steps cuts
the warmup there (or at once, if that is past): the learning rate then decays from where its ramp got. Uncut, a
warmup that outlasts the run leaves the learning rate rising until the last step (docs/benchmarks.md)."""
SAFETY_FRACTION = 0.03
"""Of the budget, kept back for what the plan cannot see: noise in step times, process exit."""
FIXED_RESERVE_S = 6.0
"""Seconds kept back for the final test's fixed costs: bootstrap intervals, plots, files, W&B."""

_UNITS = {"s": 1, "m": 60, "h": 3600}


class BudgetError(HistoDistError):
    """A time budget that cannot be met or parsed."""


def parse_duration(text: str) -> float:
    """'300s', '45m', '2h', '1h30m' or a plain number of seconds -> seconds (> 0)."""
    spec = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", spec):
        seconds = float(spec)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*([smh])", spec)
        if not parts or re.sub(r"\s+", "", "".join(n + u for n, u in parts)) != re.sub(r"\s+", "", spec):
            raise BudgetError(f"{text!r} is not a duration like 300s, 45m, 2h or 1h30m")
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if not (seconds > 0 and math.isfinite(seconds)):
        raise BudgetError(f"{text!r}: a time budget must be more than 0 seconds")
    return seconds


def now() -> float:
    """The clock step times are measured with (tests replace it to make plans deterministic)."""
    return time.perf_counter()


def process_age() -> float:
    """Seconds since this process started (from /proc on Linux; else since this module was imported)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime, after the comm
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED


_IMPORTED = time.monotonic()


@dataclass
class Plan:
    """The length of a budgeted run: planned at the end of its warmup (or earlier), again at `replan_at_step` until
    `final`."""

    budget_s: float
    planned_at_step: int
    total_steps: int
    elapsed_s: float
    """Seconds since the process started, when the plan was made."""
    step_s: float
    """Measured seconds per optimizer step."""
    eval_s_per_sample: float
    """Measured seconds per evaluated sample on one rank: its input prepared (resized, normalised) and one view
    through the model."""
    validations: int
    """Validations the plan pays for after the warmup (the one after the last step included)."""
    validation_s: float
    test_s: float
    reserve_s: float
    final: bool = True
    """False for the first plan of a run that re-plans at `replan_at_step`."""
    replan_at_step: int = 0
    view_s_per_sample: float | None = None
    """Measured seconds per sample of the model's forward pass alone: what each TTA view after the first adds
    (the input is prepared once). None in plans made before it was measured: a view then costs
    `eval_s_per_sample`."""
    warmup_end: int | None = None
    """The step where the schedule's warmup ends, when the run's first plan cut it (`cut_warmup`); None: the
    configured warmup. Kept by every later plan."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        return cls(**data)

    def describe(self) -> str:
        if self.total_steps == self.planned_at_step:
            return (
                f"time budget {self.budget_s:.0f} s is spent: {self.elapsed_s:.0f} s gone at step "
                f"{self.planned_at_step}, and the test needs about {self.test_s + self.reserve_s:.0f} s; "
                "stopping here (give a larger train.time_budget or fewer schedule.warmup_steps)"
            )
        train_s = (self.total_steps - self.planned_at_step) * self.step_s
        then = f" (for now: re-planned at step {self.replan_at_step} from the steady speed)" if not self.final else ""
        if self.warmup_end is not None:
            then += f", its warmup cut at step {self.warmup_end}"
        return (
            f"time budget {self.budget_s:.0f} s: {self.total_steps} optimizer steps{then} "
            f"({self.elapsed_s:.0f} s spent at step {self.planned_at_step}; {train_s:.0f} s of training at "
            f"{self.step_s:.3f} s/step, {self.validations} validation(s) x {self.validation_s:.1f} s, "
            f"test {self.test_s:.1f} s, {self.reserve_s:.0f} s reserve)"
        )


def make_plan(
    *,
    budget_s: float,
    step: int,
    elapsed_s: float,
    step_s: float,
    eval_s_per_sample: float,
    steps_per_epoch: int,
    eval_every_steps: int,
    valid_samples: int,
    test_samples: int,
    test_views: int,
    view_s_per_sample: float | None = None,
    max_steps: int = 0,
    validation_s: float | None = None,
) -> Plan:
    """The most optimizer steps that fit: what is left of the budget, minus the validations they bring
    (at every epoch end, or every `eval_every_steps`, and after the last step), minus the final test
    (`test_samples`, the threshold's pass over the validation split included: each prepared once and seen
    `test_views` times, each view after the first at `view_s_per_sample`, the forward pass alone), minus a
    reserve. Sample counts are per rank. `validation_s`, what a validation was measured to take, replaces its
    estimate from `eval_s_per_sample`. A pure function of its inputs. A budget already spent gives a plan that
    ends here (total_steps == step): the run goes straight to its test."""
    if validation_s is None:
        validation_s = valid_samples * eval_s_per_sample
    view_s = eval_s_per_sample if view_s_per_sample is None else view_s_per_sample
    test_s = test_samples * (eval_s_per_sample + (test_views - 1) * view_s)
    reserve_s = FIXED_RESERVE_S + SAFETY_FRACTION * budget_s
    available = budget_s - elapsed_s - test_s - reserve_s
    every = eval_every_steps or steps_per_epoch

    def validations(total: int) -> int:
        return (total // every - step // every) + (total % every != 0) if valid_samples else 0

    def seconds(total: int) -> float:  # training and validations after the planning step; grows with total
        return (total - step) * step_s + validations(total) * validation_s

    total, beyond = step, step + math.ceil(max(available, 0) / step_s) + 1  # seconds(beyond) > available
    while beyond - total > 1:  # the largest total that fits, by bisection
        middle = (total + beyond) // 2
        total, beyond = (middle, beyond) if seconds(middle) <= available else (total, middle)
    if max_steps:
        total = min(total, max(max_steps, step))
    return Plan(
        budget_s,
        step,
        total,
        elapsed_s,
        step_s,
        eval_s_per_sample,
        validations(total),
        validation_s,
        test_s,
        reserve_s,
        view_s_per_sample=view_s_per_sample,
    )


def cut_warmup(step: int, total_steps: int, warmup_steps: int) -> int | None:
    """Where a run planned at `step` for `total_steps` ends its warmup of `warmup_steps`: at MAX_WARMUP_SHARE of
    its steps, or at `step` if that is past (the steps taken keep their learning rates); None when the warmup
    fits in that share, or when the plan ends at `step` (a budget already spent)."""
    if total_steps <= step:
        return None
    end = max(step, int(MAX_WARMUP_SHARE * total_steps))
    return end if end < warmup_steps else None


def spent(budget_s: float, elapsed_s: float) -> tuple[bool, str]:
    """(overran, what to log) at the end of a budgeted run that ran in one process, `elapsed_s` after it started."""
    if elapsed_s <= budget_s:
        return (
            False,
            f"time budget {budget_s:.0f} s: the run took {elapsed_s:.0f} s ({budget_s - elapsed_s:.0f} s left)",
        )
    return True, (
        f"time budget {budget_s:.0f} s overrun: the run took {elapsed_s:.0f} s, {elapsed_s - budget_s:.0f} s more. "
        "Its steps ran slower than those its plan was timed on (a busy or throttled machine); a budget is a plan "
        "from measured speed, not a deadline: give a smaller train.time_budget for a hard limit"
    )


def replan_step(plan: Plan, warmup_steps: int, first: bool = False) -> int:
    """The step at which a run re-plans from its steady speed: REPLAN_FACTOR x the warmup after the first
    plan, REPLAN_FACTOR x a re-plan's step after it, while that comes before the middle of what the plan has
    left; then that middle, while it leaves at least as many steps to time as the warmup (MIN_CALIBRATION_STEPS
    for the `first` plan, made in the warmup, whose steps are slower); else 0: the plan is final. The clock runs
    on between plans, so what is left about halves at each: a handful of plans per run (5-7 on a CPU, 5 to 15
    minutes)."""
    middle = plan.planned_at_step + (plan.total_steps - plan.planned_at_step) // 2
    at = REPLAN_FACTOR * max(warmup_steps, MIN_CALIBRATION_STEPS, plan.planned_at_step)  # >= 10 steps timed
    if at <= middle:
        return at
    timed = MIN_CALIBRATION_STEPS if first else max(warmup_steps, MIN_CALIBRATION_STEPS)
    return middle if middle - plan.planned_at_step >= timed else 0
