"""The shard manifest: what a converted dataset holds, and the contract between writer and readers.

`manifest.json` sits next to the shards. It lists, per split, every shard with its sample count,
class counts, byte size and sha256, plus what a reader needs to decode samples (codec, image shape,
label names) and where the data came from (source files with sizes and hashes). Readers take
sample counts from here (exact epochs need them up front); `histo-dist verify` checks the shards
against it.

Shard layout (format version 1), one tar per `{split}-{index:06d}.tar`, written by `convert.py`:
    {key}.cls   the label as ASCII decimal ("0", "1", ...)
    {key}.json  metadata: {"split", "index" (position in the source split), "source", ...}
    {key}.npy | {key}.png | {key}.jpg   the uint8 HxWx3 image in the manifest's codec
with `key = f"{split}_{index:09d}"`, members of one sample adjacent, in sorted extension order.

Embeddings (`embed.py`) follow the same contract with `"dtype": "float16"` and `image_shape` [D]: each
sample's `.npy` is a float16 vector of D values, next to its `.cls` (no `.json`), under the key of
the image it was computed from; the shard `{split}-{index:06d}.tar` holds the embeddings of the
image shard of that name. Manifests without `dtype` hold uint8 images.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from histo_dist.errors import HistoDistError
from histo_dist.files import write_atomic

FORMAT_NAME = "histo-dist-shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "valid", "test")
CODEC_EXTENSIONS = {"npy": "npy", "png": "png", "jpeg": "jpg"}
DTYPES = ("uint8", "float16")
"""What a sample's array holds: uint8 (H, W, 3) images, or float16 (D,) embedding vectors (npy codec only)."""


class ManifestError(HistoDistError, ValueError):
    """A manifest that is missing, malformed, or does not describe what a caller asked for."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def sample_key(split: str, index: int) -> str:
    return f"{split}_{index:09d}"


@dataclass(frozen=True)
class ShardInfo:
    name: str
    num_samples: int
    class_counts: tuple[int, ...]
    sha256: str
    bytes: int


@dataclass(frozen=True)
class SplitInfo:
    num_samples: int
    class_counts: tuple[int, ...]
    shuffled: bool
    shards: tuple[ShardInfo, ...]


@dataclass(frozen=True)
class Manifest:
    codec: str
    image_shape: tuple[int, ...]
    label_names: tuple[str, ...]
    splits: dict[str, SplitInfo]
    source: dict[str, Any]
    samples_per_shard: int
    shuffle_seed: int | None
    created_by: str
    format_version: int = FORMAT_VERSION
    root: Path = field(default=Path("."), compare=False)
    """Folder the manifest was read from; shard names are relative to it (not stored in the file)."""
    dtype: str = "uint8"
    """uint8: images of `image_shape` (H, W, 3); float16: embedding vectors of `image_shape` (D,)."""

    # -- derived -------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def embeddings(self) -> bool:
        """Samples are embedding vectors (float16, shape (D,)), not images."""
        return self.dtype != "uint8"

    @property
    def total_samples(self) -> int:
        return sum(s.num_samples for s in self.splits.values())

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise ManifestError(
                f"{self.root / MANIFEST_NAME}: split {name!r} not in this dataset; "
                f"it has {', '.join(self.splits) or 'none'}"
            )
        return self.splits[name]

    def shard_paths(self, split: str) -> list[Path]:
        return [self.root / s.name for s in self.split(split).shards]

    # -- file I/O ------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        total_counts = [0] * self.num_classes
        for s in self.splits.values():
            total_counts = [a + b for a, b in zip(total_counts, s.class_counts)]
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "created_by": self.created_by,
            "codec": self.codec,
            **({"dtype": self.dtype} if self.dtype != "uint8" else {}),  # image manifests stay as they were
            "image_shape": list(self.image_shape),
            "label_names": list(self.label_names),
            "samples_per_shard": self.samples_per_shard,
            "shuffle_seed": self.shuffle_seed,
            "total_samples": self.total_samples,
            "total_class_counts": total_counts,
            "splits": {
                name: {
                    "num_samples": s.num_samples,
                    "class_counts": list(s.class_counts),
                    "shuffled": s.shuffled,
                    "shards": [dataclasses.asdict(sh) | {"class_counts": list(sh.class_counts)} for sh in s.shards],
                }
                for name, s in self.splits.items()
            },
            "source": self.source,
        }

    def save(self, folder: str | Path) -> Path:
        """Write `folder/manifest.json` atomically (temp file + rename): never a half manifest."""
        path = Path(folder) / MANIFEST_NAME
        write_atomic(path, (json.dumps(self.to_json(), indent=2) + "\n").encode())
        return path

    @classmethod
    def load(cls, location: str | Path) -> Manifest:
        """Read a manifest from a shard folder or the path of its manifest.json; errors name the file."""
        path = Path(location)
        if path.is_dir():
            path = path / MANIFEST_NAME
        try:
            text = path.read_text()
        except FileNotFoundError:
            hint = " (did the conversion finish? run `histo-dist convert` again to complete it)"
            raise ManifestError(
                f"{path}: no manifest; expected the {MANIFEST_NAME} that `histo-dist convert` writes{hint}"
            ) from None
        except OSError as e:
            raise ManifestError(f"{path}: cannot read the manifest ({e.strerror or e})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{path}: not a readable JSON manifest ({e})") from None
        try:
            return cls._from_json(data, path.parent)
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"{path}: malformed manifest: {e}") from None

    @classmethod
    def _from_json(cls, data: dict[str, Any], root: Path) -> Manifest:
        if data.get("format") != FORMAT_NAME:
            raise ValueError(f"'format' is {data.get('format')!r}, expected {FORMAT_NAME!r}")
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"format_version {data.get('format_version')!r} is not supported (this reader: {FORMAT_VERSION})"
            )
        if data["codec"] not in CODEC_EXTENSIONS:
            raise ValueError(f"codec {data['codec']!r} is not one of {', '.join(CODEC_EXTENSIONS)}")
        dtype, shape = data.get("dtype", "uint8"), tuple(int(d) for d in data["image_shape"])
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        if dtype == "uint8" and (len(shape) != 3 or shape[2] != 3):
            raise ValueError(f"image_shape {list(shape)}: uint8 images are [height, width, 3]")
        if dtype != "uint8" and (len(shape) != 1 or data["codec"] != "npy"):
            raise ValueError(
                f"{dtype} samples are vectors: image_shape [D] and codec npy, got {list(shape)}, {data['codec']}"
            )
        splits = {}
        for name, s in data["splits"].items():
            shards = tuple(
                ShardInfo(sh["name"], int(sh["num_samples"]), tuple(sh["class_counts"]), sh["sha256"], int(sh["bytes"]))
                for sh in s["shards"]
            )
            if sum(sh.num_samples for sh in shards) != s["num_samples"]:
                raise ValueError(f"split {name}: shard sample counts do not add up to num_samples={s['num_samples']}")
            splits[name] = SplitInfo(int(s["num_samples"]), tuple(s["class_counts"]), bool(s["shuffled"]), shards)
        return cls(
            codec=data["codec"],
            image_shape=shape,
            label_names=tuple(data["label_names"]),
            splits=splits,
            source=data["source"],
            samples_per_shard=int(data["samples_per_shard"]),
            shuffle_seed=data["shuffle_seed"],
            created_by=data["created_by"],
            format_version=data["format_version"],
            root=root,
            dtype=dtype,
        )
