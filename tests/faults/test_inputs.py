"""What users give that is not what a command expects: an ImageFolder tree with an empty class folder
or files that would be left out, images that cannot become 8-bit RGB as they are, and paths that are
the wrong kind of thing, missing, unreadable or unwritable.

Each is one line naming it (`histo-dist CMD: error: ...`, exit 2), before any work; no traceback,
nothing converted other than it is, no sample left out silently.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histo_dist.sources import SourceError, load_image
from tests.faults.harness import no_traceback
from tests.runs import ENV, ROOT
from tests.source_data import cli, convert_args, make_images, read_webdataset, write_imagefolder, written

# ---------------------------------------------------------------------------------------------
# ImageFolder trees


@pytest.mark.parametrize("layout", ["split folders", "one folder split here"])
def test_an_empty_class_folder_is_named_not_made_a_class(tmp_path, capsys, layout):
    """An empty folder used to become a class with no samples: a binary dataset turned 3-class, and a
    3-class model trained to exit 0."""
    src = tmp_path / "src"
    if layout == "split folders":
        write_imagefolder(src, {"train": 4, "valid": 2, "test": 2}, classes=("normal", "tumor"))
        empty = src / "train" / "stroma"
    else:
        write_imagefolder(src, {"": 8}, classes=("normal", "tumor"), split_dirs=None)
        empty = src / "stroma"
    empty.mkdir()
    rc, _, err = cli(capsys, *convert_args(src, tmp_path / "out"))
    assert rc == 2 and f"error: {empty}: a class folder without images" in err, err
    assert written(tmp_path / "out") == []


STRAYS = {
    "a text file in a class folder": (lambda src: src / "train/tumor/notes.txt", "not an image file of a type"),
    "an image outside the class folders": (lambda src: src / "train/extra.png", "an image outside the class folders"),
    "a folder beside the split folders": (lambda src: src / "holdout/tumor/a.png", "folder(s) holdout beside"),
    "two folders for one split": (lambda src: src / "val/tumor/a.png", "valid and val are both the valid split"),
}


@pytest.mark.parametrize("stray", STRAYS)
def test_files_that_would_be_left_out_are_named(tmp_path, capsys, stray):
    src = tmp_path / "src"
    write_imagefolder(src, {"train": 4, "valid": 2, "test": 2}, classes=("normal", "tumor"))
    where, message = STRAYS[stray]
    path = where(src)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(make_images(1)[0]).save(path, format="PNG")
    rc, _, err = cli(capsys, *convert_args(src, tmp_path / "out"))
    assert rc == 2 and message in err, err
    assert written(tmp_path / "out") == []


def test_hidden_files_are_not_samples(tmp_path, capsys):
    src = tmp_path / "src"
    write_imagefolder(src, {"train": 4, "valid": 2, "test": 2}, classes=("normal", "tumor"))
    (src / "train/tumor/.DS_Store").write_bytes(b"\0\1")
    (src / "train/normal/.ipynb_checkpoints").mkdir()
    rc, _, err = cli(capsys, *convert_args(src, tmp_path / "out"))
    assert rc == 0, err


# ---------------------------------------------------------------------------------------------
# Images: converted exactly, or refused by name


def rgb() -> np.ndarray:
    return make_images(1, seed=3)[0]


def rgba(alpha: int) -> Image.Image:
    return Image.fromarray(np.dstack([rgb(), np.full((96, 96), alpha, np.uint8)]), "RGBA")


# kind: (the file's image, format, the pixels a conversion must give (None: refused), what the refusal says)
IMAGES = {
    "grayscale": (lambda: Image.fromarray(rgb()[..., 0]), "PNG", lambda: np.repeat(rgb()[..., :1], 3, 2), ""),
    "palette": (lambda: Image.fromarray(rgb()).quantize(64), "PNG", None, ""),
    "opaque RGBA": (lambda: rgba(255), "PNG", rgb, ""),
    "transparent RGBA": (lambda: rgba(128), "PNG", None, "has transparent pixels (mode RGBA)"),
    "16-bit grayscale": (
        lambda: Image.fromarray(rgb()[..., 0].astype(np.uint16) * 257),
        "PNG",
        None,
        "PIL mode I;16 cannot become 8-bit RGB without loss",
    ),
    "32-bit float": (
        lambda: Image.fromarray(rgb()[..., 0].astype(np.float32) / 255),
        "TIFF",
        None,
        "PIL mode F cannot become",
    ),
    "CMYK": (lambda: Image.fromarray(rgb()).convert("CMYK"), "TIFF", None, "PIL mode CMYK cannot become"),
    "two pages": (lambda: Image.fromarray(rgb()), "TIFF", None, "holds 2 images (frames or pages)"),
}


@pytest.mark.parametrize("kind", IMAGES)
def test_an_image_converts_exactly_or_is_refused_by_name(tmp_path, capsys, kind):
    make, fmt, expected, refusal = IMAGES[kind]
    src = tmp_path / "src"
    items = write_imagefolder(src, {"train": 3, "valid": 2, "test": 2}, classes=("normal", "tumor"))
    old, label, _ = items["valid"][0]
    old.unlink()
    path = old.with_suffix(".tif" if fmt == "TIFF" else ".png")
    image = make()
    extra = {"save_all": True, "append_images": [make()]} if kind == "two pages" else {}
    image.save(path, format=fmt, **extra)
    rc, _, err = cli(capsys, *convert_args(src, tmp_path / "out"))
    if refusal:  # (found while shards are written: the complete ones stay, as after a kill; no manifest)
        assert rc == 2 and f"error: {path}: {refusal}" in err, err
        assert not (tmp_path / "out/manifest.json").exists()
        return
    assert rc == 0, err
    sample = next(s for s in read_webdataset(tmp_path / "out", "valid") if s["json"]["source"] == str(path))
    want = expected() if expected else np.asarray(Image.open(path).convert("RGB"))  # a palette: its exact colours
    assert sample["cls"] == label and np.array_equal(sample["npy"], want)


def test_predict_reads_images_by_the_same_rules(tmp_path):
    rgba(0).save(tmp_path / "clear.png")
    with pytest.raises(SourceError, match=r"clear.png: has transparent pixels"):
        load_image(str(tmp_path / "clear.png"))


# ---------------------------------------------------------------------------------------------
# Paths of the wrong kind, or missing: every command


def path_cases(tmp: Path, shards: Path, best: Path) -> dict[str, tuple[list[str], str]]:
    """{case: (command line, what its one error line says)}; `tmp` holds a file and a folder."""
    file, folder = tmp / "a-file", tmp / "a-folder"
    train = ["train", "--config", str(ROOT / "configs/cpu_test.yaml"), f"data.shards={shards}"]
    return {
        "train --run-dir FILE": (train + ["--run-dir", str(file)], f"--run-dir {file}: a file, expected a folder"),
        "train checkpoint.resume=FOLDER": (
            train + ["--run-dir", str(tmp / "r1"), f"checkpoint.resume={folder}"],
            f"checkpoint.resume {folder}: a folder, expected a file",
        ),
        "train model.init_from=FOLDER": (
            train + ["--run-dir", str(tmp / "r2"), f"model.init_from={folder}"],
            f"model.init_from={folder}: a folder",
        ),
        "train data.shards=FILE": (train + [f"data.shards={file}"], f"{file}: not a readable JSON manifest"),
        "evaluate --checkpoint FOLDER": (
            ["evaluate", "--checkpoint", str(folder), "--data", str(shards), "--output", str(tmp / "e1")],
            f"--checkpoint {folder}: a folder, expected a file",
        ),
        "evaluate --data missing": (
            ["evaluate", "--checkpoint", str(best), "--data", str(tmp / "nope"), "--output", str(tmp / "e2")],
            f"--data {tmp / 'nope'}: no such file or folder",
        ),
        "evaluate --output FILE": (
            ["evaluate", "--checkpoint", str(best), "--data", str(shards), "--output", str(file)],
            f"--output {file}: a file, expected a folder",
        ),
        "predict --output FOLDER": (
            ["predict", "--checkpoint", str(best), "--input", str(shards), "--output", str(folder)],
            f"--output {folder}: a folder, expected a file name",
        ),
        "predict --output FILE/x.csv": (
            ["predict", "--checkpoint", str(best), "--input", str(shards), "--output", str(file / "x.csv")],
            f"--output {file / 'x.csv'}: cannot be created, {file} is a file",
        ),
        "predict --input missing": (
            ["predict", "--checkpoint", str(best), "--input", str(tmp / "nope"), "--output", str(tmp / "p.csv")],
            f"--input {tmp / 'nope'}: no such file or folder",
        ),
        "convert --input FILE": (["convert", "--input", str(file)], f"--input {file}: a file, expected a folder"),
        "convert --output FILE": (
            ["convert", "--input", str(folder), "--output", str(file)],
            f"--output {file}: a file, expected a folder",
        ),
        "synth --output FILE": (["synth", "--output", str(file)], f"--output {file}: a file, expected a folder"),
        "verify FILE": (["verify", str(file)], f"{file}: not a readable JSON manifest"),
        "verify missing": (["verify", str(tmp / "nope")], f"{tmp / 'nope'}: no manifest"),
        "compare missing": (["compare", str(tmp / "nope")], f"evaluation {tmp / 'nope'}: no such file or folder"),
    }


def make_paths(tmp: Path) -> None:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "a-file").write_text("not what was expected\n")
    (tmp / "a-folder").mkdir(exist_ok=True)


@pytest.mark.parametrize("case", list(path_cases(Path("T"), Path("S"), Path("B"))))
def test_a_path_of_the_wrong_kind_is_one_line_naming_it(shards, reference_one, tmp_path, capsys, case):
    make_paths(tmp_path)
    argv, message = path_cases(tmp_path, shards, reference_one / "checkpoints/best.pt")[case]
    rc, _, err = cli(capsys, *argv)
    (line,) = err.strip().splitlines()
    assert rc == 2 and line.startswith(f"histo-dist {argv[0]}: error: ") and message in line, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "a-folder"]  # nothing created


# ---------------------------------------------------------------------------------------------
# Unreadable and unwritable paths (root ignores permissions: such cases run in a user namespace)

DRIVER = r"""
import contextlib, io, json, sys
from histo_dist.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except BaseException as e:  # what the CLI let through: a traceback for its user
            import traceback
            traceback.print_exc(file=err)
            rc = repr(e)
    results.append([rc, err.getvalue()])
print(json.dumps(results))
"""


def unprivileged() -> list[str]:
    """The command prefix under which permission bits apply: none for a normal user; for root, a new
    user namespace without mappings (the files stay root's, but root's override of permissions is gone)."""
    if os.geteuid() != 0:
        return []
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "-U", "true"], capture_output=True).returncode != 0:
        pytest.skip("running as root, and no user namespace to drop the override of file permissions")
    return [unshare, "-U"]


@pytest.mark.slow
def test_unreadable_and_unwritable_paths_are_one_line_naming_them(shards, reference_one, tmp_path):
    prefix = unprivileged()
    best = reference_one / "checkpoints/best.pt"
    locked, readonly = tmp_path / "locked", tmp_path / "readonly"
    shutil.copytree(shards, locked / "shards")
    shutil.copy(best, locked / "best.pt")
    for tiles in ("tiles", "tiles2"):
        write_imagefolder(locked / tiles, {"train": 2, "valid": 1, "test": 1}, classes=("normal", "tumor"))
    readonly.mkdir()
    (locked / "tiles/train/tumor/img_0001.png").chmod(0)
    (locked / "best.pt").chmod(0)
    (locked / "shards/manifest.json").chmod(0)
    readonly.chmod(0o555)
    (locked / "tiles2/valid").chmod(0)
    train = ["train", "--config", str(ROOT / "configs/cpu_test.yaml"), f"data.shards={shards}"]
    evaluate = ["evaluate", "--checkpoint", str(best), "--data", str(shards)]
    cases = [
        (
            [
                "evaluate",
                "--checkpoint",
                str(locked / "best.pt"),
                "--data",
                str(shards),
                "--output",
                str(tmp_path / "e"),
            ],
            f"--checkpoint {locked / 'best.pt'}: not readable (permission denied)",
        ),
        (evaluate + ["--output", str(readonly / "e")], f"--output {readonly / 'e'}: cannot write in {readonly}"),
        (evaluate + ["--output", str(readonly)], f"--output {readonly}: cannot write in {readonly}"),
        (
            ["predict", "--checkpoint", str(best), "--input", str(shards), "--output", str(readonly / "p.csv")],
            f"--output {readonly / 'p.csv'}: cannot write in {readonly}",
        ),
        (
            ["convert", "--input", str(locked / "tiles"), "--output", str(readonly / "c"), "--no-progress"],
            f"--output {readonly / 'c'}: cannot write in {readonly}",
        ),
        (
            ["convert", "--input", str(locked / "tiles2/valid"), "--output", str(tmp_path / "c"), "--no-progress"],
            f"--input {locked / 'tiles2/valid'}: not readable (permission denied)",
        ),
        (
            ["convert", "--input", str(locked / "tiles2"), "--output", str(tmp_path / "c2"), "--no-progress"],
            f"{locked / 'tiles2/valid'}: cannot read (Permission denied)",
        ),
        (
            [
                "convert",
                "--input",
                str(locked / "tiles"),
                "--output",
                str(tmp_path / "c"),
                "--workers",
                "1",
                "--no-progress",
            ],
            f"{locked / 'tiles/train/tumor/img_0001.png'}: cannot read image",
        ),
        (["synth", "--output", str(readonly / "s")], f"--output {readonly / 's'}: cannot write in {readonly}"),
        (train + ["--run-dir", str(readonly / "run")], f"--run-dir {readonly / 'run'}: cannot write in {readonly}"),
        (train + ["--run-dir", str(readonly)], f"--run-dir {readonly}: cannot write in {readonly}"),
        (
            train + ["--run-dir", str(tmp_path / "r"), f"model.init_from={locked / 'best.pt'}"],
            f"{locked / 'best.pt'}: cannot read the checkpoint (Permission denied)",
        ),
        (
            train + ["--run-dir", str(tmp_path / "r"), f"data.shards={locked / 'shards'}"],
            f"{locked / 'shards/manifest.json'}: cannot read the manifest (Permission denied)",
        ),
        (["verify", str(locked / "shards")], f"{locked / 'shards/manifest.json'}: cannot read the manifest"),
        (["compare", str(locked / "tiles2/valid")], f"evaluation {locked / 'tiles2/valid'}: not readable"),
    ]
    try:
        out = subprocess.run(
            [*prefix, sys.executable, "-c", DRIVER, json.dumps([argv for argv, _ in cases])],
            capture_output=True,
            text=True,
            env={**ENV, "PYTHONPATH": str(ROOT)},
            timeout=600,
        )
    finally:
        for path in (locked / "tiles2/valid", readonly):
            path.chmod(0o755)
    assert out.returncode == 0, out.stderr[-3000:]
    for (argv, message), (rc, err) in zip(cases, json.loads(out.stdout.splitlines()[-1])):
        no_traceback(err)
        (line,) = [line for line in err.splitlines() if "error:" in line]
        assert rc == 2 and line.startswith(f"histo-dist {argv[0]}: error: ") and message in line, (argv, err)
    assert not (tmp_path / "r").exists() and not (tmp_path / "e").exists()  # no run or evaluation folder made
