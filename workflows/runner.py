"""Run a workflow: dataset -> detector -> extract (+ pack) -> train (each config) -> eval, cached by content.

Every stage's key is a hash of its own settings and of its inputs' keys (:mod:`workflows.cache`). A
stage whose artifact is complete is skipped; an incomplete one is run again into the same folder, where
the stage's own resume picks up (extraction skips finished shards, training resumes from
``checkpoints/latest.pt``). Paths that connect stages (dataset, detector files, shard folders, run folders,
checkpoints) are filled in by the runner and are not part of the keys; execution-only settings (actors,
batch sizes of the detector, worker counts) are not either, so changing them reuses the cache.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from softclip.pipeline.config import apply_overrides, from_dict, load_config, to_dict
from softclip.pipeline.packed import PACKED_DIR
from softclip.pipeline.registry import data_root, resolve_dataset
from softclip.pipeline.shapes import generate as generate_shapes
from softclip.workflows.cache import (
    Artifact,
    ArtifactCache,
    ArtifactInUseError,
    artifact_key,
    file_fingerprint,
    tree_fingerprint,
)
from softclip.workflows.config import TrainStep, WorkflowConfig, project_file, stage_config, user_file

__all__ = ["STAGES", "StageRecord", "UnreadableShardsError", "WorkflowResult", "WorkflowRunner"]

STAGES = ("dataset", "detector", "extract", "train", "eval")

@dataclasses.dataclass
class StageRecord:
    """What one stage did: its key, its folder (if it has one), whether it came from the cache."""

    stage: str
    name: str
    key: str
    path: Path | None
    cached: bool
    seconds: float = 0.0
    outputs: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class WorkflowResult:
    workflow: str
    records: list[StageRecord]
    seconds: float

    @property
    def report(self) -> Path | None:
        evals = [r for r in self.records if r.stage == "eval"]
        return evals[0].path if evals else None

    def summary(self) -> str:
        ran = [r for r in self.records if not r.cached]
        line = (f"workflow {self.workflow}: {len(self.records)} stages, {len(self.records) - len(ran)} cached, "
                f"{len(ran)} ran, {self.seconds:.1f}s")
        return line + (f"; report in {self.report}" if self.report else "")


class WorkflowRunner:
    """Plans and runs one workflow against an artifact cache.

    Args:
        workflow: the workflow config.
        cache: where artifacts live (default ``$SOFTCLIP_CACHE`` or ``./cache``).
        force: stages to recompute; every later stage is recomputed too.
        until: the last stage to run (``extract`` for ``make extract``).
        nproc: processes per node for training (``torchrun`` when > 1).
        log: a callable taking one line of progress text.
    """

    def __init__(self, workflow: WorkflowConfig, *, cache: ArtifactCache | None = None,
                 force: tuple[str, ...] = (), until: str = "eval", nproc: int = 1, log=print):
        unknown = [s for s in (*force, until) if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage '{unknown[0]}' (stages: {', '.join(STAGES)})")
        self.workflow = workflow
        self.cache = cache or ArtifactCache()
        first_forced = min((STAGES.index(s) for s in force), default=len(STAGES))
        self.forced = set(STAGES[first_forced:])
        self.last = STAGES.index(until)
        self.nproc = nproc
        self.log = log
        self.records: list[StageRecord] = []
        self._recomputed: set[str] = set()  # forced artifacts are cleared once per run, not per use
        self.dry_run = False

    # -- the stages ----------------------------------------------------------------------------------------

    def _dataset(self) -> StageRecord:
        step = self.workflow.dataset
        if step.shapes is None:
            location = (Path(os.path.expandvars(step.path)) if step.path else resolve_dataset(step.name)).resolve()
            if not location.exists():
                raise FileNotFoundError(f"dataset not found: {location} (from '{step.path or step.name}')")
            key = artifact_key("dataset", {"location": str(location), "files": tree_fingerprint(location)}, {})
            return StageRecord("dataset", step.name or str(location), key, None, True,
                               outputs={"root": str(location), "train": str(location), "eval": None})
        settings = to_dict(step.shapes)
        artifact = self.cache.artifact("dataset", artifact_key("dataset", {"shapes": settings}, {}))
        return self._produce(artifact, "shapes world", settings, {},
                             lambda: generate_shapes(artifact.path, step.shapes, progress=True),
                             outputs={"root": str(artifact.path), "train": str(artifact.path / "train"),
                                      "eval": str(artifact.path / "eval")})

    def _detector(self, dataset: StageRecord) -> StageRecord:
        step = self.workflow.detector
        if step.annotations:
            from softclip.pipeline.annotation_features import ANNOTATION_DETECTOR

            return StageRecord("detector", ANNOTATION_DETECTOR, artifact_key("detector", {"annotations": True}, {}),
                               None, True, outputs={"annotations": True})
        if not step.train:
            weights = user_file(step.weights, "detector weights")
            labelmap = user_file(step.labelmap, "detector label map")
            identity = {"weights": file_fingerprint(weights), "labelmap": file_fingerprint(labelmap)}
            outputs = {"weights": str(weights), "labelmap": str(labelmap)}
            if step.config:
                config = user_file(step.config, "detector config")
                identity["config"], outputs["config"] = file_fingerprint(config), str(config)
            return StageRecord("detector", weights.name, artifact_key("detector", identity, {}), None, True,
                               outputs=outputs)
        from softclip.extract.detector.config import DetectorConfig
        from softclip.extract.detector.training import train_detector

        cfg = apply_overrides(load_config(DetectorConfig, project_file(step.train)), step.overrides)
        settings, inputs = to_dict(cfg), {"dataset": dataset.key}
        artifact = self.cache.artifact("detector", artifact_key("detector", settings, inputs))
        weights, labelmap = artifact.path / "model.pth", artifact.path / "labelmap.json"
        return self._produce(artifact, cfg.name, settings, inputs,
                             lambda: train_detector(cfg, Path(dataset.outputs["root"]), artifact.path),
                             outputs={"weights": str(weights), "labelmap": str(labelmap),
                                      "config": str(artifact.path / "detector.yaml")})

    def _extract(self, dataset: StageRecord, detector: StageRecord) -> StageRecord:
        from softclip.extract.job.config import ExtractConfig

        if detector.outputs.get("annotations"):
            return self._annotation_features(dataset, detector)
        step = self.workflow.extract
        managed = {"dataset": dataset.outputs["train"], "weights": detector.outputs["weights"],
                   "labelmap": detector.outputs["labelmap"], "out": "", "pack": True}
        # Execution-only settings from the environment (`make extract RAY_ADDRESS=auto NUM_GPUS=8`).
        if os.environ.get("RAY_ADDRESS"):
            managed["ray_address"] = os.environ["RAY_ADDRESS"]
        if int(os.environ.get("NUM_GPUS") or 0) > 0:
            managed["actors"] = int(os.environ["NUM_GPUS"])
        cfg, _ = stage_config(ExtractConfig, project_file(step.config), managed, step.overrides)
        settings, inputs = cfg.settings(), {"dataset": dataset.key, "detector": detector.key}
        if "config" in detector.outputs:  # extract with the detector's own config (its key covers the file)
            cfg = cfg.replace(detector_overrides={**cfg.detector_overrides, "config": detector.outputs["config"]})
            settings["detector_overrides"]["config"] = "<the detector's config>"
        artifact = self.cache.artifact("extract", artifact_key("extract", settings, inputs))
        cfg = cfg.replace(out=artifact.path)
        features = self._produce(artifact, "features", settings, inputs, lambda: _extract_every_shard(cfg),
                                 outputs={"features": str(artifact.path), "packed": str(artifact.path / PACKED_DIR)},
                                 describe=_feature_dim)
        return self._annotation_tags(dataset, features) if step.tags == "annotations" else features

    def _annotation_tags(self, dataset: StageRecord, features: StageRecord) -> StageRecord:
        """The detector's packed shards with the dataset's annotated objects as their tags."""
        from softclip.pipeline.annotation_features import write_annotation_tag_shards

        settings, inputs = {"tags": "annotations"}, {"dataset": dataset.key, "extract": features.key}
        artifact = self.cache.artifact("extract", artifact_key("extract", settings, inputs))
        make = lambda: write_annotation_tag_shards(features.outputs["packed"], dataset.outputs["train"],  # noqa: E731
                                                   artifact.path / PACKED_DIR, progress=False)
        return self._produce(artifact, "annotation tags", settings, inputs, make,
                             outputs={"features": str(artifact.path / PACKED_DIR),
                                      "packed": str(artifact.path / PACKED_DIR),
                                      "feature_dim": features.outputs.get("feature_dim")})

    def _annotation_features(self, dataset: StageRecord, detector: StageRecord) -> StageRecord:
        """Packed and Parquet shards from the dataset's box annotations (no detector, no Ray)."""
        from softclip.pipeline.annotation_features import write_annotation_shards

        settings, inputs = {"annotations": True}, {"dataset": dataset.key, "detector": detector.key}
        artifact = self.cache.artifact("extract", artifact_key("extract", settings, inputs))
        make = lambda: write_annotation_shards(dataset.outputs["train"], artifact.path / PACKED_DIR,  # noqa: E731
                                               parquet=True, progress=False)
        return self._produce(artifact, "annotation features", settings, inputs, make,
                             outputs={"features": str(artifact.path / PACKED_DIR),
                                      "packed": str(artifact.path / PACKED_DIR)},
                             describe=lambda path: _feature_dim(path / PACKED_DIR))

    def _train(self, extract: StageRecord, step: TrainStep) -> StageRecord:
        from softclip.train.config import TrainConfig

        managed = {"run_dir": "", "data.root": extract.outputs["packed"],
                   "data.train_shards": ".", "model.roi_feature_dim": extract.outputs.get("feature_dim", 1)}  # not in the key
        cfg, settings = stage_config(TrainConfig, project_file(step.config), managed, step.overrides)
        settings["data"].pop("num_workers", None)  # execution only, like logging: not in the key
        settings.pop("log", None)
        inputs = {"extract": extract.key}
        artifact = self.cache.artifact("train", artifact_key("train", settings, inputs))
        cfg = dataclasses.replace(cfg, run_dir=artifact.path)
        checkpoint = artifact.path / "checkpoints" / "latest.pt"
        return self._produce(artifact, step.name, settings, inputs, lambda: self._run_training(cfg, artifact),
                             outputs={"checkpoint": str(checkpoint)})

    def _run_training(self, cfg, artifact: Artifact) -> None:
        """Train in this process, or under torchrun for several processes or nodes (``TORCHRUN_ARGS``)."""
        # any checkpoint means an interrupted run: "latest" also finds a step file whose link was not made yet
        resume = "latest" if any((artifact.path / "checkpoints").glob("*.pt")) else None
        torchrun_args = os.environ.get("TORCHRUN_ARGS", "").split()
        if self.nproc <= 1 and not torchrun_args:
            from softclip.train.loop import train

            train(cfg, resume=resume)
            return
        from softclip.pipeline.config import save_config

        config_path = save_config(cfg, artifact.path / "workflow-train.yaml")
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={self.nproc}",
                   *torchrun_args, "-m", "softclip", "train",
                   "--config", str(config_path)] + (["--resume", resume] if resume else [])
        self.log("  " + " ".join(command))
        subprocess.run(command, check=True)

    def _eval(self, dataset: StageRecord, trains: list[StageRecord]) -> StageRecord:
        from softclip.eval.datasets import expand_tasks, task_relative_dir
        from softclip.eval.evaluate import EvalConfig, run_eval

        step = self.workflow.eval
        paths = {}
        if dataset.outputs.get("eval"):  # a generated shapes world: its own evaluation sets
            shapes_eval = Path(dataset.outputs["eval"])
            paths = {"shapes-retrieval": str(shapes_eval / "retrieval"),
                     "shapes-shape": str(shapes_eval / "classification"),
                     "shapes-colour_shape": str(shapes_eval / "classification")}
        data = {"checkpoints": [t.outputs["checkpoint"] for t in trains], "labels": [t.name for t in trains],
                "tasks": list(step.tasks), "out": "", "data_root": str(data_root().resolve()), "paths": paths}
        cfg = apply_overrides(from_dict(EvalConfig, data, source="workflow eval"), step.overrides)
        settings = {"tasks": list(step.tasks), "overrides": list(step.overrides)}
        from_data_root = [task for task in expand_tasks(cfg.tasks) if task not in cfg.paths]
        if from_data_root:  # these tasks read DATA_ROOT: its location and a shallow fingerprint of their folders
            settings["data_root"] = str(Path(cfg.data_root).resolve())
            folders = {task: Path(settings["data_root"]) / task_relative_dir(task) for task in from_data_root}
            settings["task_data"] = {task: tree_fingerprint(folder, max_depth=1) if folder.is_dir() else "missing"
                                     for task, folder in folders.items()}
        inputs = {"dataset": dataset.key, **{f"train:{t.name}": t.key for t in trains}}
        artifact = self.cache.artifact("eval", artifact_key("eval", settings, inputs))
        cfg = dataclasses.replace(cfg, out=artifact.path)
        return self._produce(artifact, "report", settings, inputs, lambda: run_eval(cfg),
                             outputs={"markdown": str(artifact.path / "results.md"),
                                      "chart": str(artifact.path / "results.png"),
                                      "json": str(artifact.path / "results.json")})

    # -- machinery -----------------------------------------------------------------------------------------

    def _produce(self, artifact: Artifact, name: str, settings: Any, inputs: dict[str, str], make,
                 outputs: dict[str, Any], describe=None) -> StageRecord:
        """Return the cached artifact, or run ``make`` into its folder and mark it complete."""
        if not self.dry_run:  # a plan removes nothing and does not count as this run's recomputation
            if artifact.kind in self.forced and artifact.key not in self._recomputed and artifact.path.exists():
                if not self.cache.remove(artifact):
                    raise ArtifactInUseError(f"cannot recompute {artifact.path}: another running workflow uses "
                                             "it; wait for that run to end")
            self._recomputed.add(artifact.key)
            self.cache.hold(artifact)  # until this run ends: `softclip cache gc` leaves it alone
        complete = artifact.complete
        if self.dry_run or complete:
            # Paths come from the artifact's current folder (the cache may have moved); the marker adds
            # what only the run knew (feature_dim).
            saved = artifact.record().get("outputs", {}) if complete else {}
            record = StageRecord(artifact.kind, name, artifact.key, artifact.path, complete,
                                 outputs={**saved, **outputs})
            if not self.dry_run:
                self.log(f"[cached] {artifact.kind:<8} {name:<16} {artifact.path}")
            return record
        resumed = artifact.path.exists()
        self.log(f"[{'resume' if resumed else 'run'}] {artifact.kind:<8} {name:<16} {artifact.path}")
        artifact.path.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        make()
        seconds = time.perf_counter() - start
        if describe is not None:
            outputs = {**outputs, **describe(artifact.path)}
        artifact.mark_complete(settings=settings, inputs=inputs, made_by=f"workflow {self.workflow.name}",
                               seconds=seconds, outputs=outputs)
        self.log(f"[done] {artifact.kind:<8} {name:<16} {seconds:.1f}s")
        return StageRecord(artifact.kind, name, artifact.key, artifact.path, False, seconds, outputs)

    def run(self) -> WorkflowResult:
        """Run the workflow up to ``until``; returns what each stage did. Every stage's inputs (config files,
        detector files, the dataset) are checked first, by planning the whole run, so a missing or broken
        one stops the run before its first stage."""
        if self.dry_run:
            return self._run_stages()
        self.plan()
        try:
            return self._run_stages()
        finally:
            self.cache.release()

    def _run_stages(self) -> WorkflowResult:
        start = time.perf_counter()
        self.records = []
        dataset = self._add(self._dataset())
        if self.last >= STAGES.index("detector"):
            detector = self._add(self._detector(dataset))
        if self.last >= STAGES.index("extract"):
            extract = self._add(self._extract(dataset, detector))
        trains = []
        if self.last >= STAGES.index("train"):
            trains = [self._add(self._train(extract, step)) for step in self.workflow.train]
        if self.last >= STAGES.index("eval") and self.workflow.eval is not None:
            self._add(self._eval(dataset, trains))
        return WorkflowResult(self.workflow.name, self.records, time.perf_counter() - start)

    def plan(self) -> list[StageRecord]:
        """The stages' keys and folders without running anything (``cached`` says what is complete)."""
        self.dry_run = True
        try:
            return self.run().records
        finally:
            self.dry_run = False

    def _add(self, record: StageRecord) -> StageRecord:
        if record.path is None and not self.dry_run:  # given inputs (a dataset path, released weights)
            self.log(f"[given]  {record.stage:<8} {record.name:<16} {record.outputs.get('train') or record.outputs.get('weights')}")
        self.records.append(record)
        return record


class UnreadableShardsError(ValueError):
    """Some dataset shards could not be read: the extraction artifact stays incomplete (a rerun retries them)."""


def _extract_every_shard(cfg) -> None:
    """Run the extraction; raise when a shard could not be read, so the artifact is not marked complete
    and the next run retries that shard (finished shards are kept)."""
    from softclip.extract.job.manifest import Manifest
    from softclip.extract.job.run import run_extraction

    run_extraction(cfg)
    shards = Manifest.load(cfg.out).shards
    unreadable = {name: entry["error"] for name, entry in shards.items() if entry["status"] == "unreadable"}
    if unreadable:
        shown = "; ".join(f"{name}: {error}" for name, error in list(unreadable.items())[:3])
        raise UnreadableShardsError(
            f"extraction {cfg.out}: {len(unreadable)} of {len(shards)} dataset shards could not be read ({shown}"
            f"{'; ...' if len(unreadable) > 3 else ''}); replace or remove them and rerun, which retries them "
            "and keeps the finished shards")


def _feature_dim(features_dir: Path) -> dict[str, Any]:
    """The ROI feature width of an extraction, read from its Parquet shards' metadata."""
    import pyarrow.parquet as pq

    shards = sorted(features_dir.glob("*.parquet"))
    if not shards:
        raise RuntimeError(f"{features_dir}: the extraction wrote no Parquet feature shards")
    metadata = pq.read_schema(shards[0]).metadata or {}
    return {"feature_dim": int(metadata[b"softclip.feature_dim"]), "num_shards": len(shards)}
