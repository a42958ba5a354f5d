"""Training data: packed WebDataset shards (:mod:`softclip.pipeline.packed`) as padded batches.

An epoch is one pass: every sample of the rank's partition exactly once, with any number of loader workers
and however unevenly the samples are split over shards. The epoch's sample order is the shards in a
permutation seeded by ``(seed, e)``, each read front to back; its first ``N - N mod world_size`` samples
(``N`` all samples, or ``data.num_samples`` when smaller) are cut into ``world_size`` equal contiguous
ranges, one per rank, so every rank runs the same number of steps and reads only its own shards. A rank's
range of ``n`` samples makes ``ceil(n / B)`` batches (the last one partial when ``B`` does not divide
``n``); batch ``t`` comes from worker ``t mod num_workers`` (the DataLoader's round-robin order), and each
worker owns the contiguous part of the range that its batches need. A worker shuffles its part through a
buffer seeded by ``(seed, e, slot)`` (slot = ``rank * num_workers + worker``) and empties the buffer at the
end, so nothing is dropped. The random crop of a sample is seeded by ``(seed, e, key)``, so a batch does
not depend on what was decoded before it.

Resuming: every batch carries ``worker``, ``consumed`` (raw samples that worker has taken from its stream
this epoch) and ``batches`` (batches it has produced this epoch); :meth:`TrainData.epoch_batches` given
those positions skips exactly that many raw samples per worker without decoding them, so a resumed run
sees the same batches as an uninterrupted one.

Corrupt input never stops training: unreadable tar members, samples whose features do not parse and
undecodable images are skipped and counted in the batch's ``errors``; the
worker fills the places they leave with repeats of its own decoded samples (seeded), so that batch sizes
stay the same on every rank.
"""

from __future__ import annotations

import collections
import dataclasses
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import tarfile_samples

from softclip.pipeline.images import ImageDecodeError, decode_image
from softclip.pipeline.packed import read_packed_sample
from softclip.pipeline.sources import expand_shard_spec
from softclip.train.config import DataConfig, resolve_data_path

__all__ = ["ERROR_KINDS", "TrainData", "count_samples", "tagset_ids"]

ERROR_KINDS = ("bad_member", "bad_sample", "bad_image")
_SHARDS_HINT = "check data.train_shards (relative paths are under data.root)"


@dataclasses.dataclass(slots=True)
class _Raw:
    """One sample before decoding: its features, caption, tags and encoded image."""

    key: str
    caption: str
    tags: str
    roi: np.ndarray  # [n, D]
    geometry: np.ndarray  # [n, 6]
    scores: np.ndarray  # [n]
    image: bytes | None


def tagset_ids(tags: str) -> list[int]:
    """The tag set of one image as sorted, distinct 32-bit feature ids (the input of
    :func:`train.losses.tagset_vectors`).

    ``tags`` is the detector's text, ``"attr attr class"`` per box, boxes joined by ``", "``
    (:func:`extract.detector.vinvl.format_tags`). Its features are every whole phrase (``"p:large blue star"``) and
    every word (``"w:blue"``), lower-cased; VinVL's vocabulary is 1,600 classes and 400 attributes, so the
    word features alone are a multi-hot over at most 2,000 names and the phrase features keep which
    attribute goes with which class. A feature's id is ``zlib.crc32`` of its UTF-8 text: deterministic
    across processes and machines, no vocabulary file, and the same id whichever shard or labelmap the
    tags came from. Repeated boxes count once (a set, not a bag).

    Example: ``tagset_ids("red circle, red star")`` has 5 ids: 2 phrases and the words red, circle, star.
    """
    features = set()
    for phrase in tags.lower().split(","):
        words = phrase.split()
        if words:
            features.add("p:" + " ".join(words))
            features.update("w:" + word for word in words)
    return sorted(zlib.crc32(f.encode()) for f in features)


def count_samples(paths: list[Path]) -> int:
    """Samples in packed tars (their ``.json`` members, read from the tar headers)."""
    total = 0
    for path in paths:
        with tarfile.open(path, "r") as tar:
            total += sum(1 for m in tar if m.isfile() and m.name.endswith(".json"))
    return total


def _one_thread(worker_id: int) -> None:
    """Loader workers decode with one torch thread, so workers and the main process share the cores."""
    torch.set_num_threads(1)


class _Stream(IterableDataset):
    """Batches of one epoch for one rank; the DataLoader runs one copy per worker."""

    def __init__(self, data: TrainData, epoch: int, positions: list[list[int]]):
        super().__init__()
        self.data, self.epoch, self.positions = data, epoch, positions

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        # The DataLoader takes batches round-robin starting at its worker 0; when resuming after `done`
        # batches the next one is due from logical worker done % num_workers, so the ids are rotated.
        done = sum(batches for _, batches in self.positions)
        worker = ((info.id if info is not None else 0) + done) % len(self.positions)
        yield from self.data._worker_batches(self.epoch, worker, *self.positions[worker])


class TrainData:
    """The training stream of one rank.

    Args:
        cfg: the data config (shards, global batch size, workers, boxes).
        transform: open_clip's train transform (PIL image -> ``[3, H, W]`` tensor).
        tokenizer: open_clip tokenizer (list of strings -> ``[n, L]`` token ids).
        feature_dim: expected ROI feature channels (the model's ``roi_feature_dim``).
        seed, rank, world_size: run seed and this rank's place.

    A batch is a dict: ``images [B, 3, H, W]``, ``texts``/``tags`` ``[B, L]``, ``roi_features [B, M, D]``
    float16, ``roi_geometry [B, M, 6]``, ``roi_mask [B, M]`` (True for a box), with ``B`` the per-rank batch
    and ``M = max_boxes``, ``tagset [B, K]`` int64 (:func:`tagset_ids` per sample, padded with -1), plus
    ``keys`` (list of sample keys), ``worker``, ``consumed``, ``batches`` and ``errors`` (cumulative per
    worker and epoch).
    """

    def __init__(self, cfg: DataConfig, *, transform, tokenizer, feature_dim: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if cfg.batch_size % world_size:
            raise ValueError(f"data.batch_size={cfg.batch_size} is not divisible by the {world_size} ranks")
        self.cfg, self.transform, self.tokenizer = cfg, transform, tokenizer
        self.feature_dim, self.seed, self.rank, self.world_size = feature_dim, seed, rank, world_size
        self.batch_size = cfg.batch_size // world_size
        self.num_workers = max(cfg.num_workers, 1)
        self.shards = expand_shard_spec(resolve_data_path(cfg.root, cfg.train_shards), hint=_SHARDS_HINT)
        self.shard_sizes = [count_samples([path]) for path in self.shards]
        total = min(sum(self.shard_sizes), cfg.num_samples or sum(self.shard_sizes))
        self.rank_samples = total // world_size  # the rank's partition: one contiguous range per epoch
        if self.rank_samples == 0:
            raise ValueError(f"{cfg.train_shards}: {total} samples cannot give each of {world_size} ranks one")
        self.steps_per_epoch = -(-self.rank_samples // self.batch_size)

    def worker_plan(self, worker: int) -> tuple[int, int, list[int]]:
        """``(start, stop, sizes)``: the part ``[start, stop)`` of the rank's range that ``worker`` reads and
        the sizes of the batches it makes from it (round-robin: batch ``t`` of the epoch is the worker's
        ``t // num_workers``-th)."""
        steps, size, n = self.steps_per_epoch, self.batch_size, self.rank_samples
        sizes = [[] for _ in range(self.num_workers)]
        for t in range(steps):
            sizes[t % self.num_workers].append(min(size, n - t * size))
        start = sum(sum(s) for s in sizes[:worker])
        return start, start + sum(sizes[worker]), sizes[worker]

    def epoch_batches(self, epoch: int, positions: list[list[int]] | None = None) -> Iterator[dict]:
        """The ``steps_per_epoch`` batches of ``epoch``. ``positions[w] = [consumed, batches]`` of the last batch
        seen from worker ``w`` resumes the epoch there: those raw samples are skipped, not decoded."""
        positions = [list(p) for p in positions] if positions else [[0, 0]] * self.num_workers
        if len(positions) != self.num_workers:
            raise ValueError(f"the data position has {len(positions)} workers, this run has "
                             f"{self.num_workers}: resume with data.num_workers={len(positions)} "
                             "(and the same number of ranks)")
        loader = DataLoader(_Stream(self, epoch, positions), batch_size=None, num_workers=self.cfg.num_workers,
                            generator=torch.Generator().manual_seed(self.seed + epoch),
                            worker_init_fn=_one_thread,
                            pin_memory=torch.cuda.is_available(),
                            prefetch_factor=4 if self.cfg.num_workers else None)
        return iter(loader)

    # --- inside a worker -------------------------------------------------------------------------------

    def _worker_batches(self, epoch: int, worker: int, consumed: int, batches: int) -> Iterator[dict]:
        start, stop, sizes = self.worker_plan(worker)
        if batches >= len(sizes):  # this worker's epoch is done: skip nothing, read nothing
            return
        slot = self.rank * self.num_workers + worker
        errors = collections.Counter({kind: 0 for kind in ERROR_KINDS})
        stream = self._shuffled(epoch, slot, start, stop, errors)
        for _ in range(consumed):
            next(stream)
        pending: list[dict] = []
        refill = None  # repeats of the part's usable samples, in the places of unusable ones
        while batches < len(sizes):
            raw = next(stream, None)
            if raw is not None:
                consumed += 1
                item = self._decode(raw, epoch, errors)
                if item is not None:
                    pending.append(item)
            else:
                refill = refill or self._repeats(epoch, slot, start, stop)
                pending.append(next(refill))
            if len(pending) == sizes[batches]:
                batches += 1
                yield self._collate(pending) | {"worker": worker, "consumed": consumed, "batches": batches,
                                                "errors": dict(errors)}
                pending = []

    def _repeats(self, epoch: int, slot: int, start: int, stop: int) -> Iterator[dict]:
        """The usable samples of a worker's part in its shuffled order, cycled (the same after a resume)."""
        quiet = collections.Counter()
        while True:
            found = False
            for raw in self._shuffled(epoch, slot, start, stop, quiet):
                item = self._decode(raw, epoch, quiet)
                if item is not None:
                    found = True
                    yield item
            if not found:
                raise ValueError(f"data slot {slot} of epoch {epoch} has no usable sample in its part of the "
                                 f"shards (first: {self.shards[0]}); check the shards")

    def _shuffled(self, epoch: int, slot: int, start: int, stop: int,
                  errors: collections.Counter) -> Iterator[_Raw]:
        """Samples ``[start, stop)`` of this rank's range through a shuffle buffer, emptied at the end."""
        rng = np.random.default_rng([self.seed, epoch, slot])
        buffer: list[_Raw] = []
        for raw in self._range(epoch, start, stop, errors):
            if len(buffer) < self.cfg.shuffle_buffer:
                buffer.append(raw)
                continue
            index = int(rng.integers(len(buffer)))
            buffer[index], raw = raw, buffer[index]
            yield raw
        for index in rng.permutation(len(buffer)):
            yield buffer[index]

    def _range(self, epoch: int, start: int, stop: int, errors: collections.Counter) -> Iterator[_Raw]:
        """Samples ``[start, stop)`` of this rank's range in the epoch's shard order; shards outside the range
        are not opened. Positions count the samples a shard was counted to hold, so a shard with fewer
        readable samples shortens its own part of the range, never moves the others."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        first = self.rank * self.rank_samples + start
        end = first + stop - start
        offset = 0
        for i in order:
            size = self.shard_sizes[i]
            if offset >= end:
                return
            low, high = max(first - offset, 0), min(end - offset, size)
            if low < high:
                for index, raw in enumerate(self._read([self.shards[i]], errors)):
                    if index >= high:
                        break
                    if index >= low:
                        yield raw
            offset += size

    def _read(self, shards: list[Path], errors: collections.Counter) -> Iterator[_Raw]:
        for shard in shards:
            yield from self._read_tar(shard, errors)

    def _read_tar(self, path: Path, errors: collections.Counter) -> Iterator[_Raw]:
        def handler(exn: Exception) -> bool:
            errors["bad_member"] += 1
            return True

        for sample in tarfile_samples([{"url": str(path)}], handler=handler):
            try:
                packed = read_packed_sample(sample, str(path))
            except (KeyError, ValueError, TypeError, OSError, EOFError):  # bad json, npy or format version
                errors["bad_sample"] += 1
                continue
            yield _Raw(key=packed.key, caption=packed.caption, tags=packed.tags,
                       roi=packed.roi_features, geometry=packed.geometry, scores=packed.scores, image=packed.image)

    def _decode(self, raw: _Raw, epoch: int, errors: collections.Counter) -> dict | None:
        if raw.roi.ndim != 2 or (len(raw.roi) and raw.roi.shape[1] != self.feature_dim):
            raise ValueError(f"sample {raw.key}: ROI features of shape {raw.roi.shape}, the model expects "
                             f"{self.feature_dim} channels: set model.roi_feature_dim={raw.roi.shape[-1]}")
        try:
            image = decode_image(raw.image or b"")
        except ImageDecodeError:
            errors["bad_image"] += 1
            return None
        seed = int(np.random.SeedSequence([self.seed, epoch, zlib.crc32(raw.key.encode())]).generate_state(1)[0])
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed also queues CUDA seeding
            pixels = self.transform(image)
        keep = np.argsort(-raw.scores, kind="stable")[: self.cfg.max_boxes]
        return {"key": raw.key, "image": pixels, "caption": raw.caption, "tags": raw.tags,
                "roi": raw.roi[keep], "geometry": raw.geometry[keep]}

    def _collate(self, items: list[dict]) -> dict:
        size, boxes = len(items), self.cfg.max_boxes
        roi = torch.zeros(size, boxes, self.feature_dim, dtype=torch.float16)
        geometry = torch.zeros(size, boxes, 6)
        mask = torch.zeros(size, boxes, dtype=torch.bool)
        for i, item in enumerate(items):
            n = len(item["roi"])
            roi[i, :n] = torch.from_numpy(np.asarray(item["roi"], dtype=np.float16))
            geometry[i, :n] = torch.from_numpy(np.asarray(item["geometry"], dtype=np.float32))
            mask[i, :n] = True
        ids = [tagset_ids(item["tags"]) for item in items]
        tagset = torch.full((size, max(map(len, ids), default=0)), -1, dtype=torch.int64)
        for i, row in enumerate(ids):
            tagset[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
        return {"images": torch.stack([item["image"] for item in items]),
                "texts": self.tokenizer([item["caption"] for item in items]),
                "tags": self.tokenizer([item["tags"] for item in items]),
                "roi_features": roi, "roi_geometry": geometry, "roi_mask": mask, "tagset": tagset,
                "keys": [item["key"] for item in items]}
