"""Config fuzzing: random wrong types, unknown keys and out-of-range values, as YAML data or dotted
overrides, always end in one `ConfigError` naming the key, never in another exception (which the
CLI would print as a traceback from deep inside training). Valid configs round-trip through the
config.yaml a run writes."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import types
import typing

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from histo_dist.config import ConfigError, from_dict, to_dict
from histo_dist.experiment import ExperimentConfig, load_experiment
from tests.faults.harness import no_traceback
from tests.runs import ENV, ROOT

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _leaves() -> dict[str, typing.Any]:
    """{"section.field": type} of every setting of a training run."""
    out = {}
    hints = typing.get_type_hints(ExperimentConfig)
    for section in dataclasses.fields(ExperimentConfig):
        for name, tp in typing.get_type_hints(hints[section.name]).items():
            out[f"{section.name}.{name}"] = tp
    return out


LEAVES = _leaves()
SECTIONS = sorted({path.split(".")[0] for path in LEAVES})
NUMERIC = sorted(p for p, tp in LEAVES.items() if tp in (int, float))
# Out of range for every numeric setting: negative numbers, NaN, -inf and +inf.

plain = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**6), 10**6), st.floats(allow_nan=True), st.text(max_size=12)
)
anything = st.recursive(
    plain,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=6,
)


def nested(path: str, value) -> dict:
    section, name = path.split(".")
    return {section: {name: value}}


def wrong_type(tp) -> st.SearchStrategy:
    """Values that are not of type `tp` (as YAML would give them)."""
    containers = st.one_of(
        st.lists(plain, min_size=1, max_size=3), st.dictionaries(st.text(max_size=5), plain, min_size=1, max_size=2)
    )
    if tp is int:
        return st.one_of(
            st.text(),
            st.booleans(),
            st.none(),
            containers,
            st.floats().filter(lambda x: not (math.isfinite(x) and x == int(x))),
        )
    if tp is float:
        return st.one_of(st.text(), st.booleans(), st.none(), containers)
    if tp is bool:
        return st.one_of(st.text(), st.integers(), st.floats(), st.none(), containers)
    if tp is str:
        return st.one_of(st.integers(), st.floats(), st.booleans(), containers)
    if typing.get_origin(tp) is typing.Literal:
        choices = typing.get_args(tp)
        return st.one_of(st.text().filter(lambda s: s not in choices), st.integers(), st.none(), containers)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # str | None, float | str
        args = typing.get_args(tp)
        numbers = st.nothing() if float in args else st.one_of(st.integers(), st.floats())
        return st.one_of(numbers, st.booleans(), containers, st.nothing() if type(None) in args else st.none())
    if typing.get_origin(tp) is tuple and typing.get_args(tp)[-1] is Ellipsis:  # tuple[int, ...], any length
        return st.one_of(
            st.text(),
            st.floats(),
            st.none(),
            st.lists(st.floats(allow_nan=False), min_size=1, max_size=5),
            st.lists(st.text(min_size=1), min_size=1, max_size=3),
        )
    if typing.get_origin(tp) is dict:  # model.kwargs: any mapping is a type match
        return st.one_of(st.text(), st.integers(), st.floats(), st.booleans(), st.none(), st.lists(plain, max_size=3))
    if typing.get_origin(tp) is tuple:  # tuple[float, ...] of a fixed length
        n = len(typing.get_args(tp))
        return st.one_of(
            st.text(),
            st.floats(),
            st.none(),
            st.lists(st.floats(allow_nan=False), max_size=5).filter(lambda v: len(v) != n),
            st.lists(st.text(min_size=1), min_size=n, max_size=n),
        )
    raise AssertionError(f"no wrong-type strategy for {tp}")


def out_of_range(path: str) -> st.SearchStrategy:
    if LEAVES[path] is int:
        return st.integers(max_value=-1) | (st.integers(min_value=2**63) if path.endswith(".seed") else st.nothing())
    bad = [math.nan, -math.inf, math.inf]
    return st.sampled_from(bad) | st.floats(max_value=-1e-9, allow_infinity=False, allow_nan=False)


def assert_rejected(data: dict, *names: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_dict(ExperimentConfig, data)
    for name in names:
        assert name in str(info.value), str(info.value)


@SETTINGS
@given(st.data())
def test_unknown_keys_are_named(data):
    key = data.draw(st.text(st.characters(codec="ascii", categories=["L", "N"]), min_size=1, max_size=12))
    section = data.draw(st.sampled_from([None, *SECTIONS]))
    if section is None:
        assume(key not in SECTIONS)
        assert_rejected({key: data.draw(anything)}, key, "unknown key")
    else:
        assume(f"{section}.{key}" not in LEAVES)
        assert_rejected({section: {key: data.draw(anything)}}, f"{section}.{key}", "unknown key")


@SETTINGS
@given(st.data())
def test_wrong_types_are_named(data):
    path = data.draw(st.sampled_from(sorted(LEAVES)))
    value = data.draw(wrong_type(LEAVES[path]))
    assert_rejected(nested(path, value), path)


@SETTINGS
@given(st.data())
def test_sections_that_are_not_mappings_are_named(data):
    section = data.draw(st.sampled_from(SECTIONS))
    value = data.draw(plain.filter(lambda v: v is not None) | st.lists(plain, min_size=1))
    assert_rejected({section: value}, section)


@SETTINGS
@given(st.data())
def test_out_of_range_values_are_named(data):
    path = data.draw(st.sampled_from(NUMERIC))
    value = data.draw(out_of_range(path))
    assert_rejected(nested(path, value), path)


@pytest.mark.parametrize("path", ["augment.mean", "augment.std", "optim.betas"])
def test_out_of_range_items_of_tuples_are_named(path):
    n = len(typing.get_args(LEAVES[path]))
    for bad in (math.nan, math.inf, -math.inf):
        assert_rejected(nested(path, [bad] + [0.5] * (n - 1)), path)


@SETTINGS
@given(
    st.dictionaries(
        st.sampled_from(SECTIONS + ["extra"]),
        st.dictionaries(st.sampled_from(sorted({p.split(".")[1] for p in LEAVES}) + ["x"]), anything, max_size=4)
        | anything,
        max_size=4,
    )
)
def test_any_data_is_a_config_or_a_config_error(data):
    try:
        cfg = from_dict(ExperimentConfig, data)
    except ConfigError:
        return
    # Accepted: what a run writes to config.yaml reads back to the same config.
    assert from_dict(ExperimentConfig, yaml.safe_load(yaml.safe_dump(to_dict(cfg)))) == cfg


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(sorted(LEAVES)) | st.text(max_size=10), st.text(max_size=10)), max_size=4))
def test_any_dotted_overrides_are_a_config_or_a_config_error(pairs):
    overrides = [f"{key}={value}" for key, value in pairs]
    try:
        load_experiment(None, overrides)
    except ConfigError:
        pass


def test_negative_seed_is_a_config_error_not_a_crash_in_the_loader():
    with pytest.raises(ConfigError, match=r"train.seed: must be in \[0, 2\*\*63\)"):
        load_experiment(None, ["train.seed=-1"])


# ---------------------------------------------------------------------------------------------
# Through the command line: exit 2, every problem named, no traceback, nothing written


@pytest.mark.slow
def test_bad_overrides_through_the_cli_exit_2_naming_every_problem(tmp_path):
    bad = {
        "train.epochs": "abc",
        "loader.batch_sise": "3",
        "optim.lr": "-1",
        "schedule.warmup_steps": "-2",
        "augment.mean": "[1,2]",
        "train.mixed_precision": "fp8",
        "loss.pos_weight": ".nan",
        "checkpoint.keep_last": "0",
        "tracking": "5",
    }
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "histo_dist",
            "train",
            "--config",
            str(ROOT / "configs/cpu_test.yaml"),
            "--run-dir",
            str(tmp_path / "run"),
            *(f"{k}={v}" for k, v in bad.items()),
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr[-3000:]
    no_traceback(out.stderr)
    assert f"{len(bad)} problem(s)" in out.stderr, out.stderr
    for key in bad:
        assert f"  - {key}" in out.stderr, (key, out.stderr)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "argv,says",
    [
        (["optim.lr"], "an override is dotted.key=value"),
        (["=3"], "an override is dotted.key=value"),
        (["optim.lr=0.1", "optim.lr.x=2"], "conflicts with an earlier override"),
        (["--config", "{yaml}"], "not valid YAML"),
        (["--config", "{list}"], "top level must be a mapping"),
        (["--config", "{missing}"], "config file not found"),
    ],
)
def test_bad_config_files_and_override_syntax_exit_2(tmp_path, capsys, argv, says):
    from tests.source_data import cli

    files = {"yaml": tmp_path / "bad.yaml", "list": tmp_path / "list.yaml", "missing": tmp_path / "nope.yaml"}
    files["yaml"].write_text("train: [1, 2\n")
    files["list"].write_text("- train\n- optim\n")
    argv = [a.format(**{k: str(v) for k, v in files.items()}) for a in argv]
    if "--config" not in argv:
        argv = ["--config", str(ROOT / "configs/cpu_test.yaml"), *argv]
    rc, _, err = cli(capsys, "train", "--run-dir", tmp_path / "run", *argv)
    assert rc == 2 and says in err, err
    no_traceback(err)
    assert not (tmp_path / "run").exists()
