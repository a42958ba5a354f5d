"""The extraction job: image-text shards in, one Parquet feature shard per input shard out, with Ray Data.

Design (shard-granular, streaming, detector-bound)::

    driver: list source shards, drop those the manifest verifies      (resume)
      -> ray.data.from_items([{spec, shard}], one block per shard)
      -> flat_map(read_shard_rows)             CPU tasks: read the tar, decode + validate every image,
                                               emit one row per sample (pixels, and with --pack the
                                               encoded image), then an end-of-shard marker
      -> map_batches(DetectorActor, compute=ActorPoolStrategy(size=N), num_gpus=1 | 0, batch_size=B)
                                               stateful actors: the model loads once per actor; out
                                               come Arrow tables (job.actor.feature_batch)
      -> iter_batches on the driver -> ShardAssembler: append row groups to a temporary file per
                                               shard (and, with --pack, each sample to a temporary
                                               packed tar), rename them into place when all its rows
                                               are in, record them (rows, SHA-256) in manifest.json

*One pass*: with ``pack`` the packed training shard is written from the same rows as the Parquet shard,
so the source is read once; a complete shard whose packed tar is missing or stale is extracted again.
*Driver stays light*: this module and the writer import neither torch nor the detector; the actor class
is imported by the workers only (:class:`_Detector`).

*Streaming*: Ray's streaming executor keeps a bounded number of blocks in flight (backpressure), and
the driver holds at most one row group per open shard, so memory does not grow with the dataset.
*Detector-bound*: reading and decoding run in their own CPU tasks, in parallel over shards; the
flat_map is never fused into the actors (it can change the row count, and Ray does not fuse such a map
into a batched one), so actors only detect. *Exactly once*: a shard is one file that appears atomically,
and it counts only when the manifest lists it with a checksum that still matches; the assembler drops
rows delivered twice by retried tasks; a rerun after any crash redoes exactly the shards not committed.
*Bad input*: every sample becomes a row; problems are ``status="error"`` rows with a reason, and a
shard that cannot be opened at all is a manifest entry (``"unreadable"``), retried on the next run.
*Checked first* (before Ray starts): ``--out`` must be new, empty (but for the job's own ``.tmp-*``
leftovers) or an extraction folder with ``manifest.json``, and outside the dataset's folder; the VinVL
checkpoint's class and attribute counts must match the label map.

Example::

    softclip extract --dataset cc3m --weights vinvl_vg_x152c4.pth --labelmap VG-SGG-dicts-vgoi6-clipped.json \
        --out $DATA_ROOT/features/cc3m                      # RAY_ADDRESS=auto joins a running cluster

    summary = run_extraction(load_extract_config("extract/configs/extract-default.yaml", dataset="cc3m",
                                                 weights=w, labelmap=l, out=out))
    print(summary.line())

On a cluster, the dataset and output paths must be on storage that the driver and every node see.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
from tqdm import tqdm

from softclip.extract.job.config import DEFAULT_LOADER, ExtractConfig
from softclip.extract.job.manifest import MANIFEST_NAME, Manifest, source_failure_totals
from softclip.extract.job.ray_local import start_local_ray, stop_local_ray
from softclip.extract.job.stages import read_shard_rows
from softclip.extract.job.writer import ShardAssembler, packed_ok, remove_stale_temporaries, stale_temporaries
from softclip.pipeline.config import save_config
from softclip.pipeline.img2dataset import img2dataset_stats
from softclip.pipeline.io import file_sha256
from softclip.pipeline.packed import PACKED_DIR
from softclip.pipeline.registry import resolve_dataset
from softclip.pipeline.sources import open_source

__all__ = ["ExtractSummary", "OutputDirError", "OutputNotEmptyError", "WorkerCrashError", "check_detector_files",
           "check_out_dir", "fingerprint", "resolve_dataset_spec", "run_extraction", "stage_worker_package"]

_CODE_DIRS = ("extract", "pipeline")  # the subpackages shipped to the workers of a joined cluster


class OutputDirError(ValueError):
    """``--out`` is the dataset's folder or lies inside it."""


class OutputNotEmptyError(FileExistsError):
    """``--out`` holds files but no ``manifest.json``: it is no extraction to resume."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ExtractSummary:
    """What a run did (this run) and what the directory holds (totals)."""

    out: str
    shards_total: int
    shards_skipped: int
    shards_written: int
    images_this_run: int
    seconds: float
    detector_seconds: float  # time inside detector.detect, summed over actors
    actor_seconds: float  # actors' time from model loaded to their last batch done, summed over actors
    startup_seconds: float  # from the start of the run to the first detector results
    actors: int
    totals: dict[str, Any]

    @property
    def images_per_second(self) -> float:
        """This run's throughput."""
        return self.images_this_run / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        """The one-line summary printed at the end."""
        t = self.totals
        errors = ", ".join(f"{k}={v}" for k, v in t["errors"].items()) or "none"
        return (f"extract: {t['images']} images, {t['ok']} ok, errors: {errors}; "
                f"{t['boxes_per_image']:.1f} boxes/image, {t['bytes_per_image'] / 1024:.1f} KiB/image; "
                f"shards {t['shards_complete']}/{self.shards_total} complete ({self.shards_skipped} skipped, "
                f"{t['shards_unreadable']} unreadable); this run {self.images_this_run} images in "
                f"{self.seconds:.1f} s ({self.images_per_second:.1f} img/s, {self.actors} actors) -> {self.out}")


def resolve_dataset_spec(name_or_path: str) -> str:
    """A dataset path or brace pattern as an absolute spec; a bare name (no path separator, no such
    file) is looked up in the dataset registry (``pipeline/datasets/<name>.yaml`` under ``DATA_ROOT``)."""
    if "{" in name_or_path or os.sep in name_or_path or Path(name_or_path).exists():
        return os.path.abspath(name_or_path)

    return os.path.abspath(resolve_dataset(name_or_path))


def fingerprint(cfg: ExtractConfig, spec: str) -> dict[str, Any]:
    """What makes two extractions comparable: dataset, detector file checksums, output settings."""
    for path in (cfg.weights, cfg.labelmap):
        if not path.is_file():
            raise FileNotFoundError(f"detector file not found: {path} (give --weights and --labelmap)")
    return {"dataset": spec, "weights_sha256": file_sha256(cfg.weights),
            "labelmap_sha256": file_sha256(cfg.labelmap), "settings": cfg.settings()}


def _dataset_folder(spec: str) -> Path:
    """The local folder holding the dataset ``spec`` (a folder, a brace pattern, a tar or captions file)."""
    if "{" in spec:
        return Path(os.path.dirname(spec[:spec.index("{")]) or ".").resolve()
    path = Path(spec)
    return (path if path.is_dir() else path.parent).resolve()


def check_out_dir(out: Path, spec: str) -> None:
    """Refuse an ``out`` that is (or is inside) the dataset's folder, a file, or a non-empty folder without
    ``manifest.json``. The job's own ``.tmp-*`` temporaries (a run killed before its first manifest write)
    do not count as content; they are removed when the run starts.

    Raises:
        OutputDirError: ``out`` is the dataset folder or inside it.
        OutputNotEmptyError, FileExistsError: ``out`` holds something else, or is a file.
    """
    out, folder = out.resolve(), _dataset_folder(spec)
    if out == folder or folder in out.parents:
        raise OutputDirError(f"--out {out} is the dataset folder {folder} or inside it: feature shards there would "
                             "mix with (and can overwrite, e.g. 00000.parquet) the dataset's own files; choose "
                             "an --out outside it")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a folder")
    if not out.is_dir() or (out / MANIFEST_NAME).is_file():
        return
    ours = set(stale_temporaries(out))
    foreign = sorted(p.name for p in out.iterdir() if p not in ours and not (
        p.name == PACKED_DIR and p.is_dir() and all(q in ours for q in p.iterdir())))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f", ... ({len(foreign) - 5} more)" if len(foreign) > 5 else "")
        raise OutputNotEmptyError(f"--out {out} is not empty ({shown}) and has no {MANIFEST_NAME}, so it holds "
                                  "no extraction to resume; refusing to write into it. Choose a new or empty "
                                  "folder")


def check_detector_files(cfg: ExtractConfig) -> None:
    """For the VinVL loader, check that the checkpoint's class and attribute counts match the label map
    (the check ``VinVLDetector.from_checkpoint`` makes inside each actor), so a mismatch stops the run
    before Ray starts. Other loaders are checked only where they load, in the actors.

    Raises:
        CheckpointError: unreadable files, or counts that differ.
    """
    if cfg.loader != DEFAULT_LOADER:
        return
    from softclip.extract.detector.checkpoint import (
        CheckpointError,
        infer_arch,
        read_labelmap_for,
        read_state_dict,
    )

    arch = infer_arch(read_state_dict(cfg.weights), str(cfg.weights))
    classes, attributes = read_labelmap_for(cfg.weights, cfg.labelmap)
    if (len(classes), len(attributes)) != (arch.num_classes, arch.num_attributes):
        raise CheckpointError(
            f"{cfg.labelmap}: {len(classes) - 1} classes / {len(attributes) - 1} attributes, but {cfg.weights} "
            f"has {arch.num_classes - 1} / {arch.num_attributes - 1} (plus index 0); give the label map that "
            "belongs to these weights")


def _init_ray(cfg: ExtractConfig) -> bool:
    """Join ``cfg.ray_address`` (else ``$RAY_ADDRESS``) or start a local Ray; returns whether this call
    started it."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS", "")  # ray.init would read it without runtime_env
    if address:
        with tempfile.TemporaryDirectory(prefix="softclip-ray-") as staging:  # ray.init uploads it here
            ray.init(address=address, runtime_env={"py_modules": [str(stage_worker_package(Path(staging)))]})
    else:
        start_local_ray(num_cpus=cfg.num_cpus or None)  # ends with this process, even a SIGKILLed one
    return True


def stage_worker_package(staging: Path) -> Path:
    """Copy the ``softclip`` package, with only the subpackages the workers run, to ``staging/softclip``.

    Ray names a shipped module after its folder, and the repository folder may have any name, so the
    workers of a joined cluster get a copy whose folder is named ``softclip``.
    """
    root = Path(__file__).resolve().parents[2]  # the softclip package (this file: extract/job/run.py)
    package = staging / "softclip"
    package.mkdir()
    shutil.copy2(root / "__init__.py", package / "__init__.py")
    for name in _CODE_DIRS:
        shutil.copytree(root / name, package / name, ignore=shutil.ignore_patterns("__pycache__", "weights"))
    return package


def _actor_plan(cfg: ExtractConfig) -> tuple[ExtractConfig, int, float]:
    """``(cfg with torch threads resolved, number of actors, GPUs per actor)`` for the connected cluster."""
    import ray

    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0.0) if cfg.device != "cpu" else 0.0
    if cfg.device == "cuda" and not gpus:
        raise ValueError("device=cuda but the Ray cluster has no GPUs; use device=auto or device=cpu")
    if gpus:
        return cfg, cfg.actors or max(1, int(gpus // cfg.gpus_per_actor)), cfg.gpus_per_actor
    actors = cfg.actors or 1
    free = resources.get("CPU", 0.0) - actors * cfg.cpus_per_actor
    if free < 1:
        raise ValueError(
            f"{actors} CPU actors x cpus_per_actor={cfg.cpus_per_actor} leave {free:g} of "
            f"{resources.get('CPU', 0):g} Ray CPUs for reading and decoding (need 1); lower actors or "
            "cpus_per_actor, or start Ray with more CPUs (num_cpus)")
    threads = cfg.torch_threads or max(1, math.floor(cfg.cpus_per_actor))
    return cfg.replace(torch_threads=threads), actors, 0.0


class _Detector:
    """The detector stage as Ray instantiates it in a worker: importing :mod:`softclip.extract.job.actor` (torch, the
    detector) happens there, never in the driver."""

    def __init__(self, cfg: ExtractConfig):
        from softclip.extract.job.actor import DetectorActor

        self.actor = DetectorActor(cfg)

    def __call__(self, rows: dict[str, Any]) -> Any:
        return self.actor(rows)


def _dataset(cfg: ExtractConfig, spec: str, shards: list[str], actors: int, gpus: float):
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver shows images/s itself
    items = [{"spec": spec, "shard": name} for name in shards]
    with warnings.catch_warnings():
        # Ray 2.60 deprecates ray_remote_args but has no named parameter for retries yet; bounded retries
        # (Ray Data's default retries a dying task or actor forever) matter more than the notice.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
        return _pipeline(cfg, items, actors, gpus)


def _pipeline(cfg: ExtractConfig, items: list[dict[str, str]], actors: int, gpus: float):
    import ray

    return (ray.data.from_items(items, override_num_blocks=len(items))
            .flat_map(read_shard_rows, fn_kwargs={"max_pixels": cfg.max_pixels,
                                                   "require_caption": cfg.require_caption,
                                                   "max_member_bytes": cfg.max_member_bytes,
                                                   "max_caption_chars": cfg.max_caption_chars,
                                                   "keep_image": cfg.pack},
                      max_retries=cfg.ray_retries)  # Ray Data's default retries a dying task forever
            .map_batches(_Detector, fn_constructor_kwargs={"cfg": cfg},
                         compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=gpus or None,
                         num_cpus=cfg.cpus_per_actor if not gpus else None, batch_size=cfg.batch_size,
                         batch_format="numpy", max_restarts=cfg.ray_retries, max_task_retries=cfg.ray_retries))


def _run_pending(cfg: ExtractConfig, spec: str, pending: list[str], manifest: Manifest,
                 start: float, total: int | None = None) -> dict[str, Any]:
    """Extract the ``pending`` shards (``total`` images, when the source's side files say); returns this run's
    counts and timings."""
    cfg, actors, gpus = _actor_plan(cfg)
    first: float | None = None
    assembler = ShardAssembler(cfg.out, manifest, row_group_size=cfg.row_group_size, pack=cfg.pack)
    images, detector_seconds, actor_seconds, written = 0, 0.0, 0.0, 0
    with tqdm(total=total, unit="img", desc="extract", disable=not cfg.progress, dynamic_ncols=True) as bar:
        try:
            for batch in _dataset(cfg, spec, pending, actors, gpus).iter_batches(batch_size=None,
                                                                                 batch_format="pyarrow"):
                added, done = assembler.add(batch)
                images += added
                first = first or time.perf_counter() - start
                detector_seconds += pc.sum(batch.column("detect_seconds")).as_py() or 0.0
                actor_seconds += pc.sum(batch.column("actor_seconds")).as_py() or 0.0
                bar.update(added)
                if done:
                    written += len(done)
                    bar.set_postfix_str(f"shards {written}/{len(pending)}", refresh=False)
        except BaseException as err:
            assembler.abort()
            _raise_if_workers_died(err, cfg, [n for n in pending if n not in manifest.shards])
            raise
    assembler.close()
    return {"images_this_run": images, "detector_seconds": detector_seconds, "actor_seconds": actor_seconds,
            "actors": actors, "startup_seconds": first or time.perf_counter() - start}


class WorkerCrashError(ValueError):
    """Ray worker processes kept dying (more than ``ray_retries`` times): an input that crashes the reader or
    the detector, or a node out of memory. The message names the shards that were not finished."""


def _raise_if_workers_died(err: BaseException, cfg: ExtractConfig, unfinished: list[str]) -> None:
    """Raise :class:`WorkerCrashError` from ``err`` when it is Ray giving up on a dead worker process."""
    import ray

    died = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError)
    if not isinstance(err, died) and not isinstance(getattr(err, "cause", None), died):
        return
    shown = ", ".join(unfinished[:10]) + (f", ... ({len(unfinished) - 10} more)" if len(unfinished) > 10 else "")
    raise WorkerCrashError(
        f"extraction of {cfg.dataset}: a Ray worker process died {cfg.ray_retries + 1} times, so the run stopped; "
        f"unfinished shards: {shown}. One of them likely holds an input that crashes the reader or the detector "
        "(or a node ran out of memory): check the workers' logs, move that shard aside and rerun (finished "
        f"shards are kept). Ray: {' '.join(str(err).split())[:300]}") from err


def run_extraction(cfg: ExtractConfig) -> ExtractSummary:
    """Run (or resume) the extraction described by ``cfg``; see the module docstring.

    Raises:
        ManifestMismatchError: ``cfg.out`` holds an extraction with another fingerprint (or a malformed
            manifest: ManifestFormatError).
        OutputDirError, OutputNotEmptyError: ``cfg.out`` is inside the dataset, or holds other files.
        CheckpointError: the checkpoint does not match the label map.
        FileNotFoundError, SourceError: the dataset or the detector files are missing.
    """
    start = time.perf_counter()
    spec = resolve_dataset_spec(cfg.dataset)
    cfg = cfg.replace(dataset=spec, out=cfg.out.resolve())
    check_out_dir(cfg.out, spec)
    source = open_source(spec, max_member_bytes=cfg.max_member_bytes, max_caption_chars=cfg.max_caption_chars)
    found = fingerprint(cfg, spec)
    check_detector_files(cfg)
    manifest = Manifest.open(cfg.out, found)
    stats = img2dataset_stats(source)  # img2dataset's side files: failures, and the total for the progress bar
    if stats:
        manifest.set_source_failures(source_failure_totals(stats))
    cfg.out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(cfg.out)
    names = [s.name for s in source.shards]
    pending = [n for n in names if not manifest.verified(n, cfg.verify)
               or (cfg.pack and not packed_ok(cfg.out, manifest.shards[n], cfg.verify))]
    for name in pending:
        manifest.shards.pop(name, None)
    manifest.save()  # first: a folder with our manifest is ours (see check_out_dir)
    save_config(cfg, cfg.out / "extract.yaml")
    run = {"images_this_run": 0, "detector_seconds": 0.0, "actor_seconds": 0.0, "actors": 0,
           "startup_seconds": 0.0}
    started_ray = False
    try:
        if pending:
            started_ray = _init_ray(cfg)
            known = all(name in stats for name in pending)
            run = _run_pending(cfg, spec, pending, manifest, start,
                               sum(stats[n].get("successes", 0) for n in pending) if known else None)
        remove_stale_temporaries(cfg.out)  # a Ray task killed and retried during this run may have left one
    finally:
        if started_ray:
            stop_local_ray()
    seconds = time.perf_counter() - start
    manifest.add_run({"started": time.time() - seconds, "seconds": round(seconds, 3), "shards": len(pending),
                      **{k: round(v, 3) if isinstance(v, float) else v for k, v in run.items()}})
    return ExtractSummary(out=str(cfg.out), shards_total=len(names), shards_skipped=len(names) - len(pending),
                          shards_written=sum(manifest.verified(n, "size") for n in pending), seconds=seconds,
                          totals=manifest.data["totals"], **run)
