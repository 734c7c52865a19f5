"""Per-rank streaming loaders over WebDataset shards: exact epochs, exact resume, equal steps.

How an epoch is laid out (all of it a pure function of plain values, from the manifest alone):

1. The epoch's *stream* is the split's shards concatenated, in an order drawn from (seed, epoch)
   for training (the same on every rank: no communication needed) and in manifest order for
   evaluation.
2. Training (`TrainOrder`): the stream is cut into shuffle windows of whole shards (at least
   `shuffle_buffer` samples each), and each window's samples are permuted from (seed, epoch,
   window). That is the epoch's global sample order: it depends on the data, the seed, the epoch
   and shuffle_buffer, never on the number of ranks or loader workers. Global step s trains on
   global positions [s * B, (s + 1) * B), B the global batch (batch_size x accumulation x ranks);
   rank r takes the r-th slice of it, cut into its accumulation micro-batches. Every rank takes
   N // B steps per epoch. A rank's micro-batches are dealt to its loader workers in turn; a worker
   maps the shards of the windows its micro-batches come from and copies their images straight out
   of the mappings: one copy per image, no per-sample buffer.
3. Evaluation: ranks and then workers take contiguous ranges that partition the split exactly:
   every sample is read once, no padding duplicates. Each worker checks that its shards hold what
   the manifest says; a mismatch is an error, never a silent short count.
4. Resume: the state is (epoch, global samples consumed), with the global batch, seed and
   shuffle_buffer it needs. Any number of ranks and workers continues it (elastic resume): the
   rest of the epoch is exactly the samples not yet consumed, each once, spread over the new ranks,
   provided the global batch is the same (the trainer adjusts the accumulation to keep it). Workers
   are rotated so that PyTorch's round-robin over workers resumes at the right one.

Corrupt data stops the loader with a `ShardError` naming shard and key. With `skip_corrupt`, a
sample that cannot be decoded or lacks its label, and the samples lost where a shard's tar breaks
off, are skipped instead: each is logged, counted in the batch's `skipped`, and the batch comes out
shorter (never dropped, so every rank still takes the same number of steps). A shard that does not
match the manifest (an intact tar with fewer or more samples, samples of another split) is an
error either way.

Per-sample augmentation seeds come from (seed, epoch, position in the epoch's stream), so a resumed
run augments every sample the same way, on any number of ranks. Loaders are built per rank and do
*not* go through `accelerator.prepare` (that would make rank 0 read everything and broadcast it).
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from histo_dist.errors import HistoDistError
from histo_dist.manifest import Manifest
from histo_dist.preemption import ignore_in_worker, start_with_signals_blocked
from histo_dist.shards import ShardError, ShardIndex, decode_image, index_shard, load_shard, npy_header

log = logging.getLogger(__name__)


@dataclass
class LoaderConfig:
    batch_size: int = 128
    """Training samples per batch on each rank (global batch = batch_size x world size x accumulation)."""
    eval_batch_size: int = 256
    """Samples per batch for validation and test (the last batch of a worker may be smaller)."""
    num_workers: int = 2
    """Loader worker processes per rank; 0 reads in the training process."""
    shuffle_buffer: int = 4096
    """Training samples are shuffled within windows of at least this many samples: whole shards (or the
    part a worker reads) mapped together, ~30 KB each at 96x96 npy. A worker maps about this many
    samples plus one shard at a time (page cache, not copies). 0 or 1: no shuffle beyond the
    conversion's shuffle and the shard order."""
    prefetch_factor: int = 4
    """Batches each worker prepares ahead."""
    pin_memory: bool = True
    """Pin batches in page-locked memory when the run's device is a GPU (faster, asynchronous copies); a CPU run
    never pins (it would create a CUDA context per rank on a GPU node)."""
    shard_url: str = ""
    """Read shards from elsewhere: a template with {name}, e.g. 'pipe:aws s3 cp s3://bucket/pcam/{name} -' or
    'https://host/pcam/{name}'. Empty reads the files next to the manifest (fast local path)."""
    skip_corrupt: bool = False
    """Skip samples that cannot be decoded or lack their label, and the rest of a shard that breaks off
    (truncated tar), instead of stopping with an error naming shard and key. Each one is logged with
    its shard and key and counted; the count (skipped_samples) goes to metrics.jsonl, W&B and
    test_metrics.json. Batches with skipped samples are shorter. Off: any corrupt sample stops the run."""

    def validate(self) -> list[str]:
        problems = []
        for name in ("batch_size", "eval_batch_size", "prefetch_factor"):
            if getattr(self, name) < 1:
                problems.append(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("num_workers", "shuffle_buffer"):
            if getattr(self, name) < 0:
                problems.append(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.shard_url and "{name}" not in self.shard_url:
            problems.append(f"shard_url: must contain {{name}} (the shard file name), got {self.shard_url!r}")
        return problems


# ---------------------------------------------------------------------------------------------
# The plan: which samples each worker of each rank reads in an epoch. Pure functions.


@dataclass(frozen=True)
class Segment:
    shard: int
    """Index of the shard in the manifest's list for the split."""
    start: int
    stop: int
    """Sample positions [start, stop) within the shard."""
    position: int
    """Position of `start` in the epoch's stream (for augmentation seeds and checks)."""


@dataclass(frozen=True)
class WorkerPlan:
    segments: tuple[Segment, ...]
    num_samples: int


def shard_order(num_shards: int, seed: int, epoch: int, training: bool) -> np.ndarray:
    """Shard order of an epoch: a permutation from (seed, epoch) for training, manifest order otherwise."""
    if not training:
        return np.arange(num_shards)
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, 0x5AD0])).permutation(num_shards)


def _split_evenly(total: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of part `index` when `total` items are cut into `parts` contiguous, near-equal parts."""
    base, extra = divmod(total, parts)
    start = index * base + min(index, extra)
    return start, start + base + (index < extra)


def steps_per_epoch(num_samples: int, global_batch: int) -> int:
    """Optimizer steps per training epoch: the same on every rank, whatever the number of ranks."""
    return num_samples // global_batch


def eval_plan(shard_sizes: list[int], *, rank: int, world_size: int, num_workers: int, worker: int) -> WorkerPlan:
    """What worker `worker` of rank `rank` reads of an evaluation split (num_workers counts loader workers;
    0 -> 1): contiguous ranges, ranks then workers, that partition the split exactly."""
    sizes = np.asarray(shard_sizes, dtype=np.int64)
    rank_start, rank_stop = _split_evenly(int(sizes.sum()), world_size, rank)
    a, b = _split_evenly(rank_stop - rank_start, max(num_workers, 1), worker)
    start, stop = rank_start + a, rank_start + b
    ends = np.cumsum(sizes)
    segments = []
    i = bisect.bisect_right(ends.tolist(), start)
    pos = start
    while pos < stop:  # map the stream range [start, stop) onto shards
        shard_start = int(ends[i] - sizes[i])
        seg_stop = min(stop, int(ends[i]))
        segments.append(Segment(i, pos - shard_start, seg_stop - shard_start, pos))
        pos = seg_stop
        i += 1
    return WorkerPlan(tuple(segments), stop - start)


def augmentation_seeds(seed: int, epoch: int, positions: np.ndarray) -> np.ndarray:
    """One 63-bit seed per sample from (seed, epoch, stream position): splitmix64 finaliser."""
    with np.errstate(over="ignore"):
        z = (
            np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
            + np.uint64(epoch) * np.uint64(0xBF58476D1CE4E5B9)
            + positions.astype(np.uint64) * np.uint64(0x94D049BB133111EB)
        )
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(1)).astype(np.int64)


class TrainOrder:
    """The global sample order of a training epoch: shuffle windows of whole shards over the epoch's
    stream, each permuted from (seed, epoch, window). `refs(lo, hi)` says where global positions
    [lo, hi) are; window permutations are drawn when first needed (a resume never draws the ones before)."""

    def __init__(self, shard_sizes: list[int], seed: int, epoch: int, window: int):
        self.seed, self.epoch = seed, epoch
        self.order = shard_order(len(shard_sizes), seed, epoch, training=True)
        sizes = np.asarray(shard_sizes, dtype=np.int64)[self.order]
        self.shard_ends = np.cumsum(sizes)  # stream position where each ordered shard ends
        self.shard_starts = self.shard_ends - sizes
        self.stream_start = dict(zip(self.order.tolist(), self.shard_starts.tolist()))  # manifest shard -> start
        ends, size = [], 0
        for end, n in zip(self.shard_ends.tolist(), sizes.tolist()):
            size += n
            if size >= max(window, 1):
                ends.append(end)
                size = 0
        if size:
            ends.append(int(self.shard_ends[-1]))
        self.window_ends = np.asarray(ends, dtype=np.int64)
        self.window_starts = np.concatenate([[0], self.window_ends[:-1]]).astype(np.int64)
        self.shuffle = window > 1
        self._perms: dict[int, np.ndarray] = {}

    def window_of(self, positions: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.window_ends, positions, side="right")

    def _perm(self, window: int) -> np.ndarray:
        if window not in self._perms:
            size = int(self.window_ends[window] - self.window_starts[window])
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, window, 0xB0F]))
            self._perms[window] = rng.permutation(size) if self.shuffle else np.arange(size)
        return self._perms[window]

    def refs(self, lo: int, hi: int) -> np.ndarray:
        """(manifest shard index, row in the shard, stream position) of global positions [lo, hi)."""
        g = np.arange(lo, hi, dtype=np.int64)
        windows = self.window_of(g)
        stream = np.empty_like(g)
        for w in np.unique(windows).tolist():
            mine = windows == w
            start = self.window_starts[w]
            stream[mine] = start + self._perm(w)[g[mine] - start]
        j = np.searchsorted(self.shard_ends, stream, side="right")  # the ordered shard holding each
        return np.stack([self.order[j], stream - self.shard_starts[j], stream], axis=1)

    def forget_windows_before(self, window: int) -> None:
        for w in [w for w in self._perms if w < window]:
            del self._perms[w]


# ---------------------------------------------------------------------------------------------
# Reading: one worker's plan -> batches


class _EpochStream(torch.utils.data.IterableDataset):
    """The batches of one rank for one epoch, produced by the DataLoader's workers."""

    def __init__(self, loader: ShardLoader, epoch: int, start_batch: int, num_workers: int):
        self.urls = loader.shard_urls
        self.shard_sizes = loader.shard_sizes
        self.codec, self.shape, self.num_classes = loader.codec, loader.shape, loader.num_classes
        self.dtype = loader.dtype
        self.rank, self.world_size, self.seed = loader.rank, loader.world_size, loader.seed
        self.training, self.batch_size, self.buffer = loader.training, loader.batch_size, loader.shuffle_buffer
        self.accumulation, self.global_batch = loader.accumulation, loader.global_batch
        self.transform = loader.transform
        self.split, self.skip_corrupt = loader.split, loader.cfg.skip_corrupt
        self.epoch, self.start_batch, self.num_workers = epoch, start_batch, num_workers

    def __iter__(self) -> Iterator[dict[str, Any] | _WorkerError]:
        info = torch.utils.data.get_worker_info()
        try:
            yield from self._batches(info)
        except ShardError as e:
            if info is None:
                raise
            # PyTorch re-raises a worker's exception with the worker's traceback as its message; hand
            # the error over as data instead: the training process raises it with the message alone.
            yield _WorkerError(str(e))

    def _worker(self, info) -> int:
        """This worker's place in the round-robin: DataLoader's starts at worker 0, so workers are rotated
        to resume at the one that produces batch `start_batch` (batch b of an epoch comes from worker b % n)."""
        if info is not None:
            torch.set_num_threads(1)  # workers share the cores with the training process
        return ((info.id if info is not None else 0) + self.start_batch) % max(self.num_workers, 1)

    def _batches(self, info) -> Iterator[dict[str, Any]]:
        return self._train_batches(info) if self.training else self._eval_batches(info)

    def _train_batches(self, info) -> Iterator[dict[str, Any]]:
        """This worker's micro-batches: those of the rank's sequence it is dealt, each a slice of a global
        step (see the module docstring); shards stay mapped while the windows they belong to are in use."""
        workers, worker = max(self.num_workers, 1), self._worker(info)
        order = TrainOrder(self.shard_sizes, self.seed, self.epoch, self.buffer)
        per_rank = self.batch_size * self.accumulation
        opened: dict[int, _OpenShard] = {}  # manifest shard index -> its open shard
        last_window: dict[int, int] = {}  # manifest shard index -> the last window a batch used it in
        total = (sum(self.shard_sizes) // self.global_batch) * self.accumulation
        first = self.start_batch + (worker - self.start_batch) % workers  # this worker's first batch to make
        for batch in range(first, total, workers):
            step, micro = divmod(batch, self.accumulation)
            lo = step * self.global_batch + self.rank * per_rank + micro * self.batch_size
            refs = order.refs(lo, lo + self.batch_size)
            for shard, window in zip(refs[:, 0].tolist(), order.window_of(refs[:, 2]).tolist()):
                if shard not in opened:
                    opened[shard] = self._open(Segment(shard, 0, self.shard_sizes[shard], order.stream_start[shard]))
                last_window[shard] = max(last_window.get(shard, -1), window)
            yield self._collate(refs, opened)
            current = int(order.window_of(np.asarray([lo]))[0])
            for shard in [s for s, w in last_window.items() if w < current]:
                del opened[shard], last_window[shard]  # the last view of a shard's mapping goes: it is unmapped
            order.forget_windows_before(current)

    def _eval_batches(self, info) -> Iterator[dict[str, Any]]:
        """This worker's contiguous range of the split, in stream order, cut into batches across shards."""
        plan = eval_plan(
            self.shard_sizes,
            rank=self.rank,
            world_size=self.world_size,
            num_workers=self.num_workers,
            worker=self._worker(info),
        )
        opened: dict[int, _OpenShard] = {}  # segment number -> its shard, while batches still need it
        pending = np.empty((0, 3), dtype=np.int64)  # (segment, row in shard, stream position) not yet batched
        for j, seg in enumerate(plan.segments):
            opened[j] = self._open(seg)
            pending = np.concatenate([pending, _segment_refs(j, seg)])
            last = j == len(plan.segments) - 1
            while len(pending) >= self.batch_size or (last and len(pending)):
                yield self._collate(pending[: self.batch_size], opened)
                pending = pending[self.batch_size :]
            for k in [k for k in opened if k not in set(pending[:, 0].tolist())]:
                del opened[k]  # the last view of a shard's mapping goes: it is unmapped

    def _open(self, seg: Segment) -> _OpenShard:
        """Index the shard of a segment and check it against the manifest and the split."""
        url, planned = self.urls[seg.shard], self.shard_sizes[seg.shard]
        index = index_shard(load_shard(url), url, limit=seg.stop)
        if len(index) > planned or (index.more and seg.stop == planned):
            raise ShardError(
                f"{url}: holds more samples than the manifest's {planned}; "
                "it does not belong to this manifest (run `histo-dist verify`)"
            )
        if len(index) < seg.stop and not index.broken:  # an intact tar with fewer samples: a mismatch
            raise ShardError(
                f"{url}: ends after {len(index)} samples, the manifest says {planned}; "
                "the shard does not belong to this manifest (run `histo-dist verify`)"
            )
        if index.broken:
            if not self.skip_corrupt:
                raise ShardError(index.broken)
            lost = max(0, seg.stop - max(len(index), seg.start))
            log.warning(
                "%s: ends after %d samples, the manifest says %d (%s); skipping the %d sample(s) of it "
                "planned here (loader.skip_corrupt)",
                url,
                len(index),
                planned,
                index.broken.removeprefix(f"{url}: "),
                lost,
            )
        prefix = f"{self.split}_"
        for key in index.keys[seg.start : seg.stop]:
            if not key.startswith(prefix):
                raise ShardError(
                    f"{url}: sample {key!r} is not of split {self.split!r}: a shard of another "
                    "split or conversion (run `histo-dist verify`)"
                )
        return _OpenShard(index, self.codec, self.shape, self.dtype)

    def _collate(self, refs: np.ndarray, opened: dict[int, _OpenShard]) -> dict[str, Any]:
        n, sample_bytes = len(refs), int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize
        if torch.utils.data.get_worker_info() is not None:
            # Fill the batch straight into shared memory, as PyTorch's default collate does: handing
            # it to the training process is then free instead of one more copy of every image.
            storage = torch.UntypedStorage._new_shared(n * sample_bytes)
            raw = torch.empty(0, dtype=torch.uint8).set_(storage).view(n, sample_bytes)
        else:
            raw = torch.empty((n, sample_bytes), dtype=torch.uint8)
        rows = raw.numpy()  # a sample's bytes per row; `images` is the same memory as arrays of the manifest's dtype
        images = rows.view(self.dtype).reshape(n, *self.shape)
        labels = np.empty(len(refs), dtype=np.int64)
        keys, positions = [], np.empty(len(refs), dtype=np.int64)
        j = 0  # samples kept: all of them, unless skip_corrupt drops bad ones
        for segment, i, position in refs.tolist():
            shard = opened[segment]
            try:
                label = shard.labels[i] if i < len(shard.labels) else _MISSING
                if not 0 <= label < self.num_classes:
                    raise ShardError(shard.label_problem(i, label, self.num_classes))
                if shard.plain[i]:  # one copy straight out of the shard's mapping, nothing to parse
                    offset = shard.pixels[i]
                    rows[j] = shard.index.data[offset : offset + sample_bytes]
                else:
                    images[j] = shard.decode(i)
                labels[j] = label
            except ShardError as e:
                if not self.skip_corrupt:
                    raise
                if i < len(shard.labels):  # samples lost to a broken tar were logged with their shard
                    log.warning("%s; skipped (loader.skip_corrupt)", e)
                continue
            keys.append(shard.index.keys[i])
            positions[j] = position
            j += 1
        batch_tensor = raw.view(getattr(torch, self.dtype)).view(n, *self.shape)
        if j < len(refs):
            batch_tensor, labels, positions = batch_tensor[:j], labels[:j], positions[:j]
        out = {
            # Images (N,H,W,C) -> (N,C,H,W) as a view: the result is channels_last in memory, no copy.
            "image": batch_tensor.permute(0, 3, 1, 2) if batch_tensor.dim() == 4 else batch_tensor,
            "label": torch.from_numpy(labels),
            "key": keys,
            "seed": torch.from_numpy(augmentation_seeds(self.seed, self.epoch, positions)),
            "skipped": len(refs) - j,
        }
        if self.transform is not None:
            out["image"] = self.transform(out["image"], out["seed"])
        return out


def _segment_refs(segment: int, seg: Segment) -> np.ndarray:
    """(segment number, row in shard, stream position) of a segment's samples; rows past a broken
    tar's end stay in (they become skipped samples)."""
    rows = np.arange(seg.start, seg.stop, dtype=np.int64)
    return np.stack([np.full_like(rows, segment), rows, seg.position + rows - seg.start], axis=1)


_MISSING, _NOT_AN_INTEGER, _NO_LABEL = -1, -2, -3


class _OpenShard:
    """A shard being read: its index, and per sample the label and whether the image can be copied
    without decoding (an .npy of exactly the expected shape and dtype)."""

    def __init__(self, index: ShardIndex, codec: str, shape: tuple[int, ...], dtype: str = "uint8"):
        from histo_dist.manifest import CODEC_EXTENSIONS

        self.index, self.codec, self.shape, self.dtype = index, codec, shape, dtype
        self.ext = CODEC_EXTENSIONS[codec]
        n, data = len(index), index.data
        labels = np.full(n, _NO_LABEL, dtype=np.int64)
        if "cls" in index.members:
            offset, size = index.members["cls"].T
            one_digit = (size == 1) & (data[np.maximum(offset, 0)] - 48 < 10)
            labels[one_digit] = data[offset[one_digit]] - 48
            for i in np.flatnonzero((size >= 0) & ~one_digit).tolist():  # >= 10 classes, or not a number
                try:
                    labels[i] = int(bytes(index.member(i, "cls")))
                except ValueError:
                    labels[i] = _NOT_AN_INTEGER
        self.labels = labels
        self.plain = np.zeros(n, dtype=bool)
        self.pixels = np.zeros(n, dtype=np.int64)
        if codec == "npy" and self.ext in index.members and n:
            header, nbytes = npy_header(shape, dtype)
            offset, size = index.members[self.ext].T
            candidates = np.flatnonzero(size == len(header) + nbytes)
            starts = offset[candidates]
            steps = np.diff(starts)
            if len(starts) > 1 and (steps == steps[0]).all() and steps[0] >= len(header):  # evenly spaced: a view
                heads = np.lib.stride_tricks.as_strided(
                    data[starts[0] :], (len(starts), len(header)), (int(steps[0]), 1)
                )
            else:
                heads = data[starts[:, None] + np.arange(len(header))]  # a (n, 128) gather
            self.plain[candidates[(heads == np.frombuffer(header, np.uint8)).all(axis=1)]] = True
            self.pixels = offset + len(header)

    def label_problem(self, i: int, label: int, num_classes: int) -> str:
        if label == _MISSING:
            return f"{self.index.name}: sample at row {i} missing (the tar broke off before it)"
        where = f"{self.index.name}: sample {self.index.keys[i]!r}"
        if label == _NO_LABEL:
            return f"{where}: no label (.cls) member; run `histo-dist verify` on the shards"
        if label == _NOT_AN_INTEGER:
            return f"{where}: cannot decode the label {bytes(self.index.member(i, 'cls'))[:20]!r} (not an integer)"
        return f"{where}: label {label} outside 0..{num_classes - 1}"

    def decode(self, i: int) -> np.ndarray:
        data = self.index.member(i, self.ext)
        key = self.index.keys[i]
        if data is None:
            raise ShardError(
                f"{self.index.name}: sample {key!r}: no image (.{self.ext}) member; run `histo-dist verify` on the "
                "shards"
            )
        try:
            return decode_image(data, self.codec, self.shape, self.dtype)
        except Exception as e:  # any decoder failure (PIL raises OSError and others) is a bad sample
            raise ShardError(f"{self.index.name}: sample {key!r}: cannot decode ({e})") from None


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    """Batches are complete when a worker yields them (DataLoader's default would walk every key)."""
    return batch


@dataclass
class _WorkerError:
    """A ShardError of a loader worker, on its way to the training process."""

    message: str


# ---------------------------------------------------------------------------------------------
# The loader a trainer uses


class _StepPosition:
    """The position of a training loader in its epoch, as ShardLoader and MemoryLoader keep it: `batch`
    micro-batches handed out, `accumulation` per optimizer step of `global_batch` samples. The state is
    (epoch, global samples consumed) plus what the order depends on (`_order()`): no ranks, no workers,
    so any layout with the same global batch continues it."""

    epoch: int
    batch: int
    steps: int
    accumulation: int
    global_batch: int
    split: str

    def _order(self) -> dict[str, Any]:
        raise NotImplementedError

    def _set_geometry(self, cfg: LoaderConfig, *, training: bool, accumulation: int, world_size: int) -> None:
        """Batch sizes and (training) the steps per epoch of `self.num_samples`; raises if not one step fits."""
        self.batch_size = cfg.batch_size if training else cfg.eval_batch_size
        self.accumulation = accumulation if training else 1
        self.global_batch = self.batch_size * self.accumulation * world_size
        self.epoch, self.batch = 0, 0
        if training:
            self.steps = steps_per_epoch(self.num_samples, self.global_batch)
            if self.steps == 0:
                raise HistoDistError(
                    f"split {self.split!r} has {self.num_samples} samples: too few for a global batch of "
                    f"{self.global_batch} ({world_size} rank(s) x batch_size {self.batch_size} x {self.accumulation} "
                    f"accumulation steps); lower loader.batch_size"
                )

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.batch = epoch, 0

    def state_dict(self) -> dict[str, Any]:
        """(epoch, global samples consumed) and what the order depends on; no ranks, no workers: any layout
        with the same global batch continues it. Taken at optimizer-step boundaries."""
        if self.batch % self.accumulation:
            raise HistoDistError(
                f"loader state taken inside an optimizer step (batch {self.batch}, {self.accumulation} per step)"
            )
        return {"epoch": self.epoch, "samples": self.batch // self.accumulation * self.global_batch, **self._order()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "samples" not in state:
            raise HistoDistError(
                "the loader state was written by an earlier histo-dist (it counts batches of one "
                "layout, not samples); resume with that version, or start a new run"
            )
        mismatched = {k: (state.get(k), v) for k, v in self._order().items() if state.get(k) != v}
        if mismatched:
            detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in mismatched.items())
            raise HistoDistError(f"cannot resume the {self.split} loader exactly: {detail}")
        samples = int(state["samples"])
        if samples % self.global_batch or not 0 <= samples <= self.steps * self.global_batch:
            raise HistoDistError(
                f"loader state: {samples} samples consumed is not a step boundary of 0.."
                f"{self.steps} steps of {self.global_batch}"
            )
        self.epoch, self.batch = int(state["epoch"]), samples // self.global_batch * self.accumulation


class ShardLoader(_StepPosition):
    """The batches of one rank for one split, epoch after epoch, resumable at any step.

    Iterating yields dicts with `image` (uint8, N x 3 x H x W, channels_last memory; or the
    transform's output; float16 N x D for embeddings), `label` (int64), `key` (sample keys), `seed`
    (per-sample augmentation seeds) and `skipped` (corrupt samples left out of the batch: always 0
    unless `cfg.skip_corrupt`). Training batches are micro-batches of `cfg.batch_size`, `accumulation`
    of them per optimizer step.
    `transform(images, seeds)`, when given, runs in the loader workers. `device_type` is the device
    the batches go to (pinned memory only for "cuda").
    """

    def __init__(
        self,
        manifest: Manifest,
        split: str,
        cfg: LoaderConfig,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        training: bool = True,
        accumulation: int = 1,
        transform: Callable | None = None,
        device_type: str = "cpu",
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        info = manifest.split(split)
        self.split, self.rank, self.world_size, self.seed, self.training = split, rank, world_size, seed, training
        self.cfg = cfg
        self.shuffle_buffer = cfg.shuffle_buffer
        self.transform = transform
        self.pin_memory = cfg.pin_memory and device_type == "cuda"
        self.shard_sizes = [s.num_samples for s in info.shards]
        self.shard_urls = [
            cfg.shard_url.format(name=s.name) if cfg.shard_url else str(manifest.root / s.name) for s in info.shards
        ]
        self.codec, self.shape, self.num_classes = manifest.codec, tuple(manifest.image_shape), manifest.num_classes
        self.dtype = manifest.dtype
        self.num_samples = info.num_samples
        self._set_geometry(cfg, training=training, accumulation=accumulation, world_size=world_size)
        if not training and self.num_samples < world_size:
            raise HistoDistError(f"split {split!r} has {self.num_samples} samples, fewer than {world_size} ranks")
        # Never more workers than batches (a worker without work would only cost a process).
        self.num_workers = min(cfg.num_workers, len(self) if training else self.num_samples)

    # -- sizes -----------------------------------------------------------------------------------
    def _plans(self) -> list[WorkerPlan]:
        return [
            eval_plan(
                self.shard_sizes, rank=self.rank, world_size=self.world_size, num_workers=self.num_workers, worker=w
            )
            for w in range(max(self.num_workers, 1))
        ]

    def __len__(self) -> int:
        """Batches this rank yields in a full epoch (training: micro-batches, `accumulation` per step)."""
        if self.training:
            return self.steps * self.accumulation
        return sum(-(-p.num_samples // self.batch_size) for p in self._plans())

    @property
    def rank_samples(self) -> int:
        """Samples this rank reads in one epoch (evaluation: its exact share of the split)."""
        if self.training:
            return self.steps * self.batch_size * self.accumulation
        return sum(p.num_samples for p in self._plans())

    def _order(self) -> dict[str, Any]:
        """What the epoch's sample order and its steps depend on."""
        return {
            "split": self.split,
            "seed": self.seed,
            "global_batch": self.global_batch,
            "shuffle_buffer": self.shuffle_buffer,
            "shard_sizes": self.shard_sizes,
        }

    # -- iteration -------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Yield the rest of the current epoch; the position advances as batches are handed out."""
        if self.batch >= len(self):
            self.epoch, self.batch = self.epoch + 1, 0
        stream = _EpochStream(self, self.epoch, self.batch, self.num_workers)
        loader = torch.utils.data.DataLoader(
            stream,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_as_is,
            worker_init_fn=ignore_in_worker if self.num_workers else None,
            prefetch_factor=self.cfg.prefetch_factor if self.num_workers else None,
            pin_memory=self.pin_memory,
        )
        # Workers are forked with the preemption signals blocked (see preemption.py).
        for batch in start_with_signals_blocked(lambda: iter(loader)) if self.num_workers else loader:
            if isinstance(batch, _WorkerError):
                raise ShardError(batch.message)
            self.batch += 1
            yield batch


# ---------------------------------------------------------------------------------------------
# Embeddings: a split held in memory


class MemoryLoader(_StepPosition):
    """ShardLoader's batches, guarantees and state for a split of embeddings, read once into memory: a step
    then costs a gather of `batch_size` rows instead of a pass through tar shards and loader workers, so a
    head on embeddings trains at thousands of steps per second.

    Training: every rank reads and holds the whole split (any sample can fall into any rank's batch; PCam's
    262,144 training embeddings of 1,024 float16 values are 512 MiB). An epoch is a permutation of it from
    (seed, epoch), the same on every rank and independent of their number; optimizer step s takes its
    positions [s * B, (s + 1) * B), B the global batch, rank r the r-th slice of those, cut into
    `accumulation` micro-batches, as ShardLoader does: every rank takes the same number of steps, and the
    state (epoch, samples consumed) resumes on another number of ranks. Evaluation: each rank reads and
    holds only its own contiguous part (ShardLoader's), so every sample is read once across ranks. Reading
    goes through ShardLoader (in this process), with its checks against the manifest. Embeddings are not
    augmented: no transform, no workers, and batches carry no augmentation `seed`.
    """

    def __init__(
        self,
        manifest: Manifest,
        split: str,
        cfg: LoaderConfig,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        training: bool = True,
        accumulation: int = 1,
        transform: Callable | None = None,
        device_type: str = "cpu",
    ):
        if transform is not None:
            raise ValueError("MemoryLoader takes no transform: embeddings are not augmented")
        self.split, self.rank, self.world_size, self.seed, self.training = split, rank, world_size, seed, training
        self.cfg = cfg
        reader = ShardLoader(
            manifest,
            split,
            dataclasses.replace(cfg, num_workers=0, eval_batch_size=4096),
            rank=0 if training else rank,
            world_size=1 if training else world_size,
            training=False,
        )
        parts = list(reader)
        self.skipped = sum(b["skipped"] for b in parts)  # corrupt samples left out (loader.skip_corrupt)
        self.data = torch.cat([b["image"] for b in parts]) if parts else torch.empty((0, *manifest.image_shape))
        self.labels = torch.cat([b["label"] for b in parts]) if parts else torch.empty(0, dtype=torch.long)
        self.keys = np.array([k for b in parts for k in b["key"]])  # gathered per batch in one call
        self.num_samples = len(self.keys)
        self._set_geometry(cfg, training=training, accumulation=accumulation, world_size=world_size)
        self.num_workers = 0

    def __len__(self) -> int:
        """Batches this rank yields in a full epoch (training: micro-batches, `accumulation` per step)."""
        return self.steps * self.accumulation if self.training else -(-self.num_samples // self.batch_size)

    @property
    def rank_samples(self) -> int:
        """Samples this rank reads in one epoch (evaluation: its exact share of the split)."""
        return self.steps * self.batch_size * self.accumulation if self.training else self.num_samples

    def _order(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "seed": self.seed,
            "global_batch": self.global_batch,
            "num_samples": self.num_samples,
        }

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Yield the rest of the current epoch; the position advances as batches are handed out."""
        if self.batch >= len(self):
            self.epoch, self.batch = self.epoch + 1, 0
        if self.training:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, 0xE3B]))
            order = torch.from_numpy(rng.permutation(self.num_samples))
        else:
            order = torch.arange(self.num_samples)
        size, per_rank = self.batch_size, self.batch_size * self.accumulation
        while self.batch < len(self):
            b = self.batch
            if self.training:
                step, micro = divmod(b, self.accumulation)
                start = step * self.global_batch + self.rank * per_rank + micro * size
            else:
                start = b * size
            rows = order[start : start + size]
            self.batch += 1
            yield {
                "image": self.data.index_select(0, rows),  # (a tenth of the time of data[rows])
                "label": self.labels.index_select(0, rows),
                "key": self.keys[rows.numpy()].tolist(),
                "skipped": self.skipped if b == 0 and not self.training else 0,  # counted once per evaluation
            }


def first_images(manifest: Manifest, split: str, count: int, cfg: LoaderConfig) -> np.ndarray:
    """The first `count` images of `split` (fewer if it holds fewer), uint8 (N, H, W, C), read from its shards
    in order, outside any epoch's stream: the same on every rank, and reading them moves no loader. For
    statistics of the data (model.stem_init=whiten); converted shards are shuffled, so the first are a sample."""
    info = manifest.split(split)
    images: list[np.ndarray] = []
    for shard in info.shards:
        url = cfg.shard_url.format(name=shard.name) if cfg.shard_url else str(manifest.root / shard.name)
        index = index_shard(load_shard(url), url, limit=count - len(images))
        opened = _OpenShard(index, manifest.codec, tuple(manifest.image_shape), manifest.dtype)
        images += [opened.decode(i) for i in range(min(len(index), count - len(images)))]
        if index.broken and len(images) < count:
            raise ShardError(f"{index.broken}; run `histo-dist verify` on the shards")
        if len(images) >= count:
            break
    if not images:
        raise HistoDistError(f"split {split!r} of {manifest.root} has no samples to read")
    return np.stack(images)


def split_loader(manifest: Manifest, split: str, cfg: LoaderConfig, **kwargs) -> ShardLoader | MemoryLoader:
    """The loader of a split (arguments as ShardLoader's): embeddings are held in memory (`MemoryLoader`),
    images streamed from the shards (`ShardLoader`)."""
    return (MemoryLoader if manifest.embeddings else ShardLoader)(manifest, split, cfg, **kwargs)
