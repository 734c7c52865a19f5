"""Typed configuration: dataclasses from YAML and dotted overrides, every problem reported at once."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from histo_dist.config import (
    ConfigError,
    add_dataclass_arguments,
    dump_yaml,
    field_docs,
    from_dict,
    from_namespace,
    load_config,
    parse_overrides,
    read_yaml,
    to_dict,
)


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    """Optimizer: sgd or adamw."""
    lr: float = 0.1
    """Peak learning rate,
    reached after warmup."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    nesterov: bool = False
    milestones: list[int] = field(default_factory=lambda: [30, 60])
    """Epochs at which the rate drops by 90%."""

    def validate(self) -> list[str]:
        problems = []
        if self.lr <= 0:
            problems.append(f"lr: must be > 0, got {self.lr}")
        if self.milestones != sorted(self.milestones):
            problems.append("milestones: must be increasing")
        return problems


@dataclass
class DataConfig:
    shards: Path = Path("shards/pcam")
    """Folder of the converted shards."""
    batch_size: int = 256
    """Samples per batch and rank."""
    workers: int | None = None


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=0.05, nesterov=True))
    epochs: int = 10
    """Passes over the training split."""
    run_name: str = "run"

    def validate(self) -> list[str]:
        return ["epochs: must be >= 1"] if self.epochs < 1 else []


@dataclass
class Required:
    input: str
    """Where the data is (required)."""
    count: int = 3


@dataclass
class Flags:
    input: str
    """Source folder."""
    codec: Literal["npy", "png"] = "npy"
    """Image encoding."""
    quality: int = 95
    """JPEG quality, 95% is near lossless."""
    fraction: float = 0.1
    shuffle: bool = True
    """Shuffle at write time."""
    out: Path = Path("out")
    """Output folder."""
    note: str | None = None


def problems_of(exc: pytest.ExceptionInfo) -> list[str]:
    assert isinstance(exc.value, ConfigError)
    return exc.value.problems


# ---------------------------------------------------------------------------------------------
# Plain data -> dataclasses


def test_defaults_and_nested_dataclasses():
    cfg = from_dict(TrainConfig, {})
    assert cfg == TrainConfig()
    cfg = from_dict(TrainConfig, {"data": {"batch_size": 64, "shards": "a/b"}, "epochs": 3})
    assert cfg.data.batch_size == 64 and cfg.epochs == 3
    assert cfg.data.shards == Path("a/b") and isinstance(cfg.data.shards, Path)
    assert cfg.optim.lr == 0.05


def test_partial_section_keeps_the_fields_own_default():
    # optim's default comes from a factory with lr=0.05, nesterov=True: a partial section keeps those
    cfg = from_dict(TrainConfig, {"optim": {"name": "adamw"}})
    assert cfg.optim == OptimConfig(name="adamw", lr=0.05, nesterov=True)
    assert from_dict(TrainConfig, {"optim": None}).optim == OptimConfig(lr=0.05, nesterov=True)


def test_types_are_checked_strictly():
    with pytest.raises(ConfigError) as exc:
        from_dict(TrainConfig, {"epochs": "10", "run_name": 5, "data": {"batch_size": True, "workers": 2.5}})
    problems = problems_of(exc)
    assert len(problems) == 4
    assert any(p.startswith("epochs: expected int, got '10' (str)") for p in problems)
    assert any(p.startswith("run_name: expected string, got 5") for p in problems)
    assert any(p.startswith("data.batch_size: expected int, got True (bool)") for p in problems)  # bool is not int
    assert any(p.startswith("data.workers: expected int | null") for p in problems)
    with pytest.raises(ConfigError, match=r"optim.nesterov: expected bool \(true/false\), got 1"):
        from_dict(TrainConfig, {"optim": {"nesterov": 1}})
    with pytest.raises(ConfigError, match="optim.lr: expected float, got True"):
        from_dict(TrainConfig, {"optim": {"lr": True}})
    assert from_dict(TrainConfig, {"optim": {"lr": 1}}).optim.lr == 1.0  # an int is a fine float
    assert isinstance(from_dict(TrainConfig, {"optim": {"lr": 1}}).optim.lr, float)
    assert from_dict(TrainConfig, {"data": {"workers": None}}).data.workers is None


def test_literal_values_with_suggestion():
    assert from_dict(OptimConfig, {"name": "adamw"}).name == "adamw"
    with pytest.raises(ConfigError) as exc:
        from_dict(TrainConfig, {"optim": {"name": "adamv"}})
    assert problems_of(exc) == ["optim.name: expected one of 'sgd', 'adamw', got 'adamv' (did you mean 'adamw'?)"]


def test_list_and_tuple_items():
    cfg = from_dict(OptimConfig, {"betas": [0.8, 0.9], "milestones": [1, 2, 3]})
    assert cfg.betas == (0.8, 0.9) and isinstance(cfg.betas, tuple)
    assert cfg.milestones == [1, 2, 3]
    with pytest.raises(ConfigError) as exc:
        from_dict(OptimConfig, {"betas": [0.8, "x"], "milestones": [1, "two", 3.5]})
    problems = problems_of(exc)
    assert "betas[1]: expected float, got 'x' (str)" in problems
    assert "milestones[1]: expected int, got 'two' (str)" in problems
    assert "milestones[2]: expected int, got 3.5 (float)" in problems
    with pytest.raises(ConfigError, match=r"betas: expected 2 items"):
        from_dict(OptimConfig, {"betas": [0.1, 0.2, 0.3]})
    with pytest.raises(ConfigError, match=r"milestones: expected list\[int\], got 5"):
        from_dict(OptimConfig, {"milestones": 5})


def test_unknown_keys_suggest_the_closest_known_key():
    with pytest.raises(ConfigError) as exc:
        from_dict(TrainConfig, {"epoch": 3, "optim": {"lr_": 0.1}, "zzz": 1})
    problems = problems_of(exc)
    assert any(p.startswith("epoch: unknown key (did you mean 'epochs'?)") for p in problems)
    assert any(p.startswith("optim.lr_: unknown key (did you mean 'optim.lr'?)") for p in problems)
    zzz = next(p for p in problems if p.startswith("zzz:"))
    assert "did you mean" not in zzz and "known keys: data, optim, epochs, run_name" in zzz


def test_validate_problems_carry_the_dotted_path():
    with pytest.raises(ConfigError) as exc:
        from_dict(TrainConfig, {"optim": {"lr": -1, "milestones": [5, 2]}})
    assert problems_of(exc) == ["optim.lr: must be > 0, got -1.0", "optim.milestones: must be increasing"]
    with pytest.raises(ConfigError) as exc:
        from_dict(TrainConfig, {"epochs": 0})
    assert problems_of(exc) == ["epochs: must be >= 1"]


def test_all_problems_in_one_error():
    with pytest.raises(ConfigError) as exc:
        from_dict(
            TrainConfig,
            {
                "epochz": 1,
                "data": {"batch_size": "big"},
                "optim": {"lr": -0.1, "name": "rmsprop"},
            },
            source="exp.yaml",
        )
    problems = problems_of(exc)
    assert len(problems) == 3
    assert [p.split(":")[0] for p in problems] == ["epochz", "data.batch_size", "optim.name"]
    message = str(exc.value)
    assert message.startswith("invalid configuration (exp.yaml): 3 problem(s)")
    assert all(f"  - {p}" in message for p in problems)
    # sections without type errors are still validated in the same pass
    with pytest.raises(ConfigError) as exc:
        from_dict(TrainConfig, {"optim": {"lr": -0.1}, "data": {"batch_size": "big"}})
    assert len(problems_of(exc)) == 2


def test_missing_required_field_and_non_mapping_section():
    with pytest.raises(ConfigError) as exc:
        from_dict(Required, {"count": 2})
    assert problems_of(exc) == ["input: required, no default"]
    assert from_dict(Required, {"input": "x"}).count == 3
    with pytest.raises(ConfigError, match="data: expected a mapping of DataConfig fields, got 3"):
        from_dict(TrainConfig, {"data": 3})


def test_to_dict_round_trip(tmp_path):
    cfg = from_dict(TrainConfig, {"optim": {"betas": [0.5, 0.6]}, "data": {"shards": "x/y"}})
    data = to_dict(cfg)
    assert data["optim"]["betas"] == [0.5, 0.6] and data["data"]["shards"] == "x/y"
    dump_yaml(cfg, tmp_path / "c.yaml")
    assert load_config(TrainConfig, tmp_path / "c.yaml") == cfg


# ---------------------------------------------------------------------------------------------
# YAML and overrides


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("epochs: 20\noptim:\n  name: adamw\n  lr: 3e-4\ndata:\n  batch_size: 128\n")
    cfg = load_config(TrainConfig, path)
    assert cfg.epochs == 20 and cfg.optim.name == "adamw" and cfg.data.batch_size == 128
    assert cfg.optim.lr == pytest.approx(3e-4)  # 3e-4 is a float, though plain YAML 1.1 reads a string
    assert cfg.optim.nesterov is True  # untouched fields of a section keep the field's default
    cfg = load_config(
        TrainConfig, path, ["optim.lr=1e-3", "data.workers=4", "run_name=baseline", "optim.milestones=[2, 4]"]
    )
    assert cfg.optim.lr == pytest.approx(1e-3) and cfg.optim.name == "adamw"
    assert cfg.data.workers == 4 and cfg.data.batch_size == 128
    assert cfg.run_name == "baseline" and cfg.optim.milestones == [2, 4]
    assert load_config(TrainConfig, None, ["epochs=2"]).epochs == 2


def test_override_values_are_yaml_scalars():
    assert parse_overrides(["a.b=1", "a.c=x", "d=true", "e=", "f=0.5", "g=[1, 2]", "h=null"]) == {
        "a": {"b": 1, "c": "x"},
        "d": True,
        "e": "",
        "f": 0.5,
        "g": [1, 2],
        "h": None,
    }
    assert parse_overrides(["x=[unclosed"]) == {"x": "[unclosed"}  # not YAML: kept as the string


def test_bad_override_syntax():
    with pytest.raises(ConfigError) as exc:
        parse_overrides(["epochs", "=3", "a..b=1", "ok=1"])
    problems = problems_of(exc)
    assert len(problems) == 3
    assert all("dotted.key=value" in p for p in problems)
    assert problems[0].startswith("'epochs'")
    with pytest.raises(ConfigError, match="a.b: conflicts with an earlier override of a"):
        parse_overrides(["a=1", "a.b=2"])


def test_overrides_are_checked_like_the_file(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_config(TrainConfig, None, ["optim.lrr=0.1", "epochs=ten"])
    problems = problems_of(exc)
    assert "overrides" in str(exc.value)
    assert any(p.startswith("optim.lrr: unknown key (did you mean 'optim.lr'?)") for p in problems)
    assert any(p.startswith("epochs: expected int, got 'ten'") for p in problems)


def test_bad_yaml_files_are_named(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("optim:\n  lr: [0.1\n")
    with pytest.raises(ConfigError) as exc:
        load_config(TrainConfig, bad)
    assert str(bad) in str(exc.value) and "not valid YAML" in str(exc.value)
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        read_yaml(tmp_path / "missing.yaml")
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml: top level must be a mapping"):
        read_yaml(listing)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(TrainConfig, empty) == TrainConfig()
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("optim:\n  lr: fast\n")
    with pytest.raises(ConfigError) as exc:
        load_config(TrainConfig, wrong)
    assert exc.value.source == str(wrong) and str(wrong) in str(exc.value)


# ---------------------------------------------------------------------------------------------
# Docs and command-line flags


def test_field_docs_are_attribute_docstrings():
    docs = field_docs(OptimConfig)
    assert docs["lr"] == "Peak learning rate, reached after warmup."
    assert docs["name"] == "Optimizer: sgd or adamw."
    assert "nesterov" not in docs  # no docstring below it
    assert field_docs(TrainConfig)["epochs"] == "Passes over the training split."


def flag_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t")
    add_dataclass_arguments(parser, Flags, required=["input"])
    return parser


def test_flags_are_generated_with_help():
    text = flag_parser().format_help()
    for expected in (
        "--input STR",
        "Source folder.",
        "--codec {npy,png}",
        "Image encoding. (default: npy)",
        "--quality INT",
        "95% is near lossless",
        "--shuffle, --no-shuffle",
        "Shuffle at write time.",
        "--out PATH",
        "Output folder. (default: out)",
        "--fraction FLOAT",
        "--note STR",
    ):
        assert expected in " ".join(text.split()), expected


def test_flags_to_dataclass():
    parser = flag_parser()
    cfg = from_namespace(
        Flags,
        parser.parse_args(
            ["--input", "x", "--codec", "png", "--quality", "80", "--no-shuffle", "--out", "o/p", "--fraction", "0.25"]
        ),
    )
    assert cfg == Flags(input="x", codec="png", quality=80, shuffle=False, out=Path("o/p"), fraction=0.25)
    assert from_namespace(Flags, parser.parse_args(["--input", "y"])) == Flags(input="y")  # unset: defaults


def test_flags_reject_bad_values(capsys):
    parser = flag_parser()
    for argv in (["--input", "x", "--codec", "gif"], ["--input", "x", "--quality", "high"], ["--codec", "npy"]):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(argv)
        assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'gif'" in err and "invalid int value: 'high'" in err and "--input" in err


def test_convert_command_help_lists_its_options(capsys):
    from histo_dist.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["convert", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--samples-per-shard INT" in text and "Samples per tar shard" in text
    assert "--codec {npy,png,jpeg}" in text and "--no-shuffle" in text


def test_yaml_1_1_booleans_stay_strings(tmp_path):
    """`mixed_precision: no` must mean the string "no" (YAML 1.1 would read it as False)."""
    from histo_dist.experiment import load_experiment

    config = tmp_path / "c.yaml"
    config.write_text("train:\n  mixed_precision: no\n  deterministic: true\n")
    cfg = load_experiment(config, ["tracking.mode=offline", "train.cpu=false"])
    assert cfg.train.mixed_precision == "no" and cfg.train.deterministic is True
    assert cfg.tracking.mode == "offline" and cfg.train.cpu is False
    with pytest.raises(ConfigError, match="train.cpu: expected bool"):
        load_experiment(None, ["train.cpu=yes"])


def test_help_config_lists_every_value_with_its_default_and_doc(capsys):
    """Every option of a training run is reachable from the command line, with what it does."""
    import dataclasses
    import typing

    from histo_dist.cli import main
    from histo_dist.config import field_docs
    from histo_dist.experiment import ExperimentConfig

    assert main(["train", "--help-config"]) == 0
    text = capsys.readouterr().out
    hints = typing.get_type_hints(ExperimentConfig)
    for section in dataclasses.fields(ExperimentConfig):
        docs = field_docs(hints[section.name])
        for f in dataclasses.fields(hints[section.name]):
            line = next((ln for ln in text.splitlines() if ln.strip().startswith(f"{section.name}.{f.name}:")), None)
            assert line is not None, f"{section.name}.{f.name}"
            assert docs.get(f.name), f"{section.name}.{f.name} has no docstring"
            assert " ".join(docs[f.name].split()[:4]) in " ".join(text.split())
    assert "  test.threshold: float | str = youden" in text  # the section's own default, not the class's
    assert main(["train", "--help-config", "optim"]) == 0
    optim = capsys.readouterr().out
    assert "optim.lr: float = 0.001" in optim and "schedule." not in optim and "train." not in optim
    assert main(["train", "--help-config", "optimizer"]) == 2
    assert "did you mean 'optim'" in capsys.readouterr().err


def test_overrides_may_follow_options(capsys, tmp_path):
    from histo_dist.cli import main

    argv = [
        "train",
        "--config",
        "configs/cpu_test.yaml",
        "data.shards=/x",
        "--run-dir",
        str(tmp_path),
        "optim.lr=0.25",
        "--print-config",
        "train.epochs=7",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "shards: /x" in printed and "lr: 0.25" in printed and "epochs: 7" in printed
    with pytest.raises(SystemExit):
        main(["train", "--print-config", "--no-such-flag"])
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
