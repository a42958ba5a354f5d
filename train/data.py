"""Training data: packed WebDataset shards (or Parquet features joined with source tars) as padded batches.

Determinism: the shard order of epoch ``e`` is a permutation seeded by ``(seed, e)``. Shards are split over
``world_size * num_workers`` slots (slot = ``rank * num_workers + worker``); when there are fewer shards
than slots every slot reads all shards and keeps every ``slots``-th sample. Each slot shuffles through a
buffer seeded by ``(seed, e, slot)`` and cycles its shards until it has produced its quota of batches,
so every rank runs the same number of steps per epoch. The random crop of a sample is seeded by
``(seed, e, key)``, so a batch does not depend on what was decoded before it.

Resuming: every batch carries ``worker``, ``consumed`` (raw samples that worker has taken from its stream
this epoch) and ``batches`` (batches it has produced this epoch); :meth:`TrainData.epoch_batches` given
those positions skips exactly that many raw samples per worker without decoding them, so a resumed run
sees the same batches as an uninterrupted one.

Corrupt input never stops training: unreadable tar members, samples whose features do not parse,
``status == "error"`` rows and undecodable images are skipped and counted in the batch's ``errors``.
"""

from __future__ import annotations

import collections
import dataclasses
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import braceexpand
import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import tarfile_samples

from softclip.pipeline.images import ImageDecodeError, decode_image
from softclip.pipeline.shards import ragged_column, read_feature_table, sample_to_record
from softclip.pipeline.sources import open_source
from softclip.train.config import DataConfig, resolve_data_path

__all__ = ["ERROR_KINDS", "TrainData", "count_samples", "expand_shards", "tagset_ids"]

ERROR_KINDS = ("bad_member", "bad_sample", "error_row", "bad_image", "unmatched")
_PARQUET_COLUMNS = ["key", "status", "caption", "tags", "roi_features", "geometry", "scores"]


@dataclasses.dataclass(slots=True)
class _Raw:
    """One sample before decoding: its features, caption, tags and encoded image."""

    key: str
    status: str
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
    (:func:`extract.vinvl.format_tags`). Its features are every whole phrase (``"p:large blue star"``) and
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


def expand_shards(spec: str, suffix: str) -> list[Path]:
    """Shard files of ``spec``: a directory (its ``*.suffix`` files, sorted), a brace pattern, or one file."""
    path = Path(spec)
    if "{" in spec:
        paths = [Path(p) for p in braceexpand.braceexpand(spec)]
    elif path.is_dir():
        paths = sorted(path.glob(f"*.{suffix}"))
    else:
        paths = [path]
    missing = [p for p in paths if not p.is_file()]
    if not paths or missing:
        raise FileNotFoundError(f"{spec}: no .{suffix} training shards found"
                                + (f" ({len(missing)} missing, e.g. {missing[0]})" if missing else "")
                                + "; check data.root / data.train_shards")
    return paths


def count_samples(paths: list[Path]) -> int:
    """Samples in packed tars (their ``.json`` members, read from the tar headers) or Parquet feature shards
    (row counts from the footers)."""
    total = 0
    for path in paths:
        if path.suffix == ".parquet":
            total += pq.ParquetFile(path).metadata.num_rows
        else:
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
        suffix = "tar" if cfg.format == "webdataset" else "parquet"
        self.shards = expand_shards(resolve_data_path(cfg.root, cfg.train_shards), suffix)
        self.sources: dict[str, Path] = {}
        if cfg.format == "parquet":
            tars = expand_shards(resolve_data_path(cfg.root, cfg.source_shards), "tar")
            self.sources = {p.name.removesuffix(".tar"): p for p in tars}
        num_samples = cfg.num_samples or count_samples(self.shards)
        steps = max(num_samples // cfg.batch_size, 1)
        self.batches_per_worker = -(-steps // self.num_workers)
        self.steps_per_epoch = self.batches_per_worker * self.num_workers

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
        if batches >= self.batches_per_worker:  # this worker's epoch is done: skip nothing, read nothing
            return
        errors = collections.Counter({kind: 0 for kind in ERROR_KINDS})
        stream = self._shuffled(epoch, self.rank * self.num_workers + worker, errors)
        for _ in range(consumed):
            next(stream)
        pending: list[dict] = []
        while batches < self.batches_per_worker:
            raw = next(stream)
            consumed += 1
            item = self._decode(raw, epoch, errors)
            if item is None:
                continue
            pending.append(item)
            if len(pending) == self.batch_size:
                batches += 1
                yield self._collate(pending) | {"worker": worker, "consumed": consumed, "batches": batches,
                                                "errors": dict(errors)}
                pending = []

    def _shuffled(self, epoch: int, slot: int, errors: collections.Counter) -> Iterator[_Raw]:
        rng = np.random.default_rng([self.seed, epoch, slot])
        buffer: list[_Raw] = []
        for raw in self._cycled(epoch, slot, errors):
            if len(buffer) < self.cfg.shuffle_buffer:
                buffer.append(raw)
                continue
            index = int(rng.integers(len(buffer)))
            buffer[index], raw = raw, buffer[index]
            yield raw

    def _cycled(self, epoch: int, slot: int, errors: collections.Counter) -> Iterator[_Raw]:
        slots = self.world_size * self.num_workers
        for repeat in range(1 << 30):
            order = np.random.default_rng([self.seed, epoch, repeat]).permutation(len(self.shards))
            shards = [self.shards[i] for i in order]
            by_shard = len(shards) >= slots
            seen = 0
            for index, raw in enumerate(self._read(shards[slot::slots] if by_shard else shards, errors)):
                if by_shard or index % slots == slot:
                    seen += 1
                    yield raw
            if seen == 0:
                raise ValueError(f"data slot {slot} of epoch {epoch} read no usable sample from "
                                 f"{len(shards)} shards (first: {shards[0]}); check the shards")

    def _read(self, shards: list[Path], errors: collections.Counter) -> Iterator[_Raw]:
        for shard in shards:
            yield from (self._read_tar(shard, errors) if self.cfg.format == "webdataset"
                        else self._read_parquet(shard, errors))

    def _read_tar(self, path: Path, errors: collections.Counter) -> Iterator[_Raw]:
        def handler(exn: Exception) -> bool:
            errors["bad_member"] += 1
            return True

        for sample in tarfile_samples([{"url": str(path)}], handler=handler):
            try:
                record = sample_to_record(sample, str(path))
            except (KeyError, ValueError, TypeError, OSError, EOFError):  # bad json, npy or schema version
                errors["bad_sample"] += 1
                continue
            yield _Raw(key=record.key, status=record.status, caption=record.caption or "", tags=record.tags,
                       roi=record.roi_features, geometry=record.geometry, scores=record.scores,
                       image=sample.get("jpg"))

    def _read_parquet(self, path: Path, errors: collections.Counter) -> Iterator[_Raw]:
        name = path.name.removesuffix(".parquet")
        if name not in self.sources:
            raise FileNotFoundError(f"{path}: no source tar {name}.tar in data.source_shards "
                                    f"({self.cfg.source_shards}); the feature and source shards must match")
        table = read_feature_table(path, columns=_PARQUET_COLUMNS)
        plain = table.select(["key", "status", "caption", "tags"]).to_pydict()
        rows = {key: i for i, key in enumerate(plain["key"])}
        ragged = {c: ragged_column(table, c) for c in ("roi_features", "geometry", "scores")}
        source = open_source(self.sources[name])
        for sample in source.iter_shard(source.shards[0]):
            i = rows.get(sample.key)
            if i is None:
                errors["unmatched"] += 1
                continue
            yield _Raw(key=sample.key, status=plain["status"][i], caption=plain["caption"][i] or "",
                       tags=plain["tags"][i] or "", roi=ragged["roi_features"].row(i),
                       geometry=ragged["geometry"].row(i), scores=ragged["scores"].row(i),
                       image=sample.image if sample.error is None else None)

    def _decode(self, raw: _Raw, epoch: int, errors: collections.Counter) -> dict | None:
        if raw.status == "error":
            errors["error_row"] += 1
            return None
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
