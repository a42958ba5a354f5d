"""The shapes-world study: does SoftCLIP beat its matched control under caption noise, and which parts matter?

Every run is one (method, noise level, seed); runs of one seed share the data order and initialisation, so
each method is reported as *paired differences* against its baseline (the matched control: CLIP plus the
ROI-to-caption InfoNCE, no soft terms, on the same features): mean, standard deviation and every seed's value. Retrieval is scored many-to-many (a hit when
any image the caption fits is ranked first, :mod:`eval.consistent`) beside strict single-positive R@1.

Methods (part 1, at every ``--noise``): ``clip``, ``control``, ``softclip`` (the shipped config),
``label_smoothing``, and ``oracle``, the positive control: the detector's shards with their tags replaced by
the ground-truth objects (:func:`pipeline.annotation_features.write_annotation_tag_shards`), both targets from
those tag sets, plus the ROI loss; its ROI features, images and captions are the control's, so its baseline
is ``control``. ``oracle_pixels`` is the first, failed attempt at a positive control (the annotations replace
the detector: ground-truth boxes with a 72-number pixel descriptor as their ROI features, tagset targets),
paired with ``oracle_pixels_control`` on the same features.
Ablations (part 2, at ``--ablation-noise``): SoftCLIP with one switch changed.

Each run is its own workflow (dataset, detector and features are shared artifacts; training and
evaluation are cached per run), so any subset can run now and the rest later: rerunning computes only
what is missing. Results: ``--out`` gets ``study.json``, ``study.md`` and ``study.png``.

    python benchmarks/shapes_study.py --noise 0.4 --methods clip,control,softclip,oracle --ablations none
    python benchmarks/shapes_study.py --quick --seeds 0 --noise 0.4 --ablations none --out /tmp/s   # smoke
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path

from softclip.pipeline.io import atomic_write_json, atomic_write_text
from softclip.pipeline.shapes import ShapesConfig
from softclip.workflows.cache import ArtifactCache
from softclip.workflows.config import (
    DatasetStep,
    DetectorStep,
    EvalStep,
    ExtractStep,
    TrainStep,
    WorkflowConfig,
)
from softclip.workflows.runner import WorkflowRunner

ROOT = Path(__file__).resolve().parents[1]
TRAIN_CONFIG = "train/configs/shapes-softclip.yaml"  # every run: this file plus its overrides
DETECTOR = "extract/weights/shapes"
ROI = ["loss.roi_weight=1.0"]  # the ROI-to-caption InfoNCE that trains the ROI branch
CLIP = ["loss.lam=0", "loss.mu=0"]
METHODS = {  # name -> (features, training overrides); features: "detector", "annotation_tags" or "annotations"
    "clip": ("detector", [*CLIP, "loss.roi_weight=0"]),
    "control": ("detector", [*CLIP, *ROI]),
    "softclip": ("detector", []),
    "label_smoothing": ("detector", ["loss.image_target=uniform", "loss.text_target=uniform"]),
    "oracle": ("annotation_tags", ["loss.image_target=tagset", "loss.text_target=tagset", *ROI]),
    "oracle_pixels": ("annotations", ["loss.image_target=tagset", "loss.text_target=tagset", *ROI]),
    "oracle_pixels_control": ("annotations", [*CLIP, *ROI]),
}
DEFAULT_METHODS = ("clip", "control", "softclip", "label_smoothing", "oracle")  # oracle_pixels*: on request
BASELINE = {"oracle_pixels": "oracle_pixels_control"}  # every other method is paired with "control"
ABLATIONS = {  # SoftCLIP with one switch changed
    **{f"aggregator={a}": ["model.aggregator=" + a] for a in ("mhsa", "pool", "mean", "max", "min")},
    "image_target=roi_mean": ["loss.image_target=roi_mean", "loss.tau_image=0.01"],  # its calibrated tau
    **{f"image_target={t}": ["loss.image_target=" + t] for t in ("roi", "tagset")},
    **{f"text_target={t}": ["loss.text_target=" + t] for t in ("tagset", "text", "ema_text")},
    "target=student": ["loss.image_target=student", "loss.text_target=student"],  # own detached embeddings
    "detach=off": ["loss.detach_targets=false"],
    **{f"tau_s={t}": [f"loss.tau_image={t}", f"loss.tau_text={t}"] for t in ("0.05", "0.2")},
}
TAGSET_TAUS = (0.05, 0.1, 0.2, 0.5)  # the calibration grid of the parameter-free tag-set target
METRICS = {  # column -> (task, key); the first two decide the study's goal
    "text->image R@1 (any fit)": ("shapes-retrieval", "consistent_text_to_image_R@1"),
    "image->text R@1 (any fit)": ("shapes-retrieval", "consistent_image_to_text_R@1"),
    "text->image mAP": ("shapes-retrieval", "consistent_text_to_image_mAP"),
    "image->text mAP": ("shapes-retrieval", "consistent_image_to_text_mAP"),
    "text->image R@1 (strict)": ("shapes-retrieval", "text_to_image_R@1"),
    "image->text R@1 (strict)": ("shapes-retrieval", "image_to_text_R@1"),
    "zero-shot shape": ("shapes-shape", "top1"),
    "zero-shot colour+shape": ("shapes-colour_shape", "top1"),
}


def run_workflow(name: str, features: str, overrides: list[str], noise: float, seed: int, args) -> WorkflowConfig:
    """The workflow of one run: the study's shapes world, the shipped detector (``features``: "detector", or
    "annotation_tags" with the ground-truth tags) or the annotations, one training run, evaluation on the
    world's clean sets."""
    shapes = ShapesConfig(num_train=args.num_train, num_retrieval=args.num_eval,
                          **{f"{args.noise_kind}_noise": noise}, seed=0)
    detector = (DetectorStep(annotations=True) if features == "annotations" else
                DetectorStep(weights=f"{DETECTOR}/model.pth", labelmap=f"{DETECTOR}/labelmap.json",
                             config=f"{DETECTOR}/detector.yaml"))
    schedule = [f"optim.epochs={args.epochs}"] + (["optim.max_steps=20"] if args.quick else [])
    return WorkflowConfig(
        name=f"shapes-study-{name}-{args.noise_kind}{noise}-seed{seed}",
        dataset=DatasetStep(shapes=shapes), detector=detector,
        extract=ExtractStep(config="extract/configs/extract-shapes.yaml", overrides=("progress=false",),
                            tags="annotations" if features == "annotation_tags" else "detector"),
        train=(TrainStep(name=name, config=TRAIN_CONFIG, overrides=tuple(schedule + overrides + [f"seed={seed}"])),),
        eval=EvalStep(tasks=("shapes",), overrides=("num_workers=0",)),
    )


def run_one(config: WorkflowConfig, cache: ArtifactCache, compute: dict[str, tuple[str, float]]) -> tuple[dict, Path]:
    """The run's evaluation metrics and its training folder. ``compute`` collects ``key -> (stage,
    seconds)`` as each artifact recorded when it was made, so the cost is known even from the cache."""
    result = WorkflowRunner(config, cache=cache, log=print).run()
    payload = json.loads((result.report / "results.json").read_text())
    for record in result.records:
        if record.path is not None:
            compute[record.key] = (record.stage, cache.artifact(record.stage, record.key).record()["seconds"])
    print(result.summary(), flush=True)
    train = next(r for r in result.records if r.stage == "train")
    return next(iter(payload["results"].values())), train.path


def tagset_lift(config: WorkflowConfig, cache: ArtifactCache, tau_s: float, *, batch: int = 64,
                batches: int = 40) -> dict[str, float]:
    """The parameter-free ``tagset`` target on the run's features, before any training: its negatives-only
    entropy H(~Y) (nats, uniform = ln(batch - 1)) and its lift over random batches of the training set
    (:func:`pipeline.shapes_captions.target_lift` against the ground-truth objects; 1.0 = uninformative)."""
    import numpy as np
    import torch

    from softclip.pipeline.shapes_captions import sharing_matrix, target_lift
    from softclip.pipeline.shards import read_feature_table
    from softclip.train.data import tagset_ids
    from softclip.train.losses import tagset_vectors

    records = {r.stage: r for r in WorkflowRunner(config, cache=cache, log=lambda _: None, until="extract").run().records}
    tags = {}
    for shard in sorted(Path(records["extract"].outputs["features"]).glob("*.parquet")):
        tags |= {row["key"]: row["tags"] for row in read_feature_table(shard, ["key", "status", "tags"]).to_pylist()
                 if row["status"] == "success"}
    objects = {k: v for k, v in ground_truth_objects(config, cache).items() if k in tags}
    keys, rng, lifts, entropies = sorted(objects), np.random.default_rng(0), [], []
    for _ in range(batches):
        chosen = [keys[i] for i in rng.choice(len(keys), size=batch, replace=False)]
        ids = [tagset_ids(tags[k]) for k in chosen]
        padded = torch.full((batch, max(map(len, ids))), -1, dtype=torch.int64)
        for i, row in enumerate(ids):
            padded[i, : len(row)] = torch.tensor(row)
        h = tagset_vectors(padded).double()
        negatives = torch.softmax((h @ h.T / tau_s).fill_diagonal_(float("-inf")), dim=1)
        entropies.append(float(-(negatives * negatives.clamp_min(1e-300).log()).sum(dim=1).mean()))
        lifts.append(target_lift(negatives.numpy(), sharing_matrix([objects[k] for k in chosen])))
    return {"H(~Y)": statistics.fmean(entropies), "lift": statistics.fmean(lifts)}


def ground_truth_objects(config: WorkflowConfig, cache: ArtifactCache) -> dict[str, list]:
    """Sample key -> its annotated objects (:class:`pipeline.shapes_captions.ShapesObject`), from the run's
    shapes training set."""
    from softclip.pipeline.shapes_captions import ShapesObject
    from softclip.pipeline.sources import open_source

    dataset = WorkflowRunner(config, cache=cache, log=lambda _: None, until="dataset").run().records[0]
    source = open_source(dataset.outputs["train"])
    return {s.key: [ShapesObject(**{**o, "box": tuple(o["box"])}) for o in s.meta["objects"]]
            for shard in source.shards for s in source.iter_shard(shard)}


def teacher_lift(train_dir: Path, objects: dict[str, list], *, batches: int = 20) -> dict[str, float]:
    """The trained run's own soft targets at the end of training, on ``batches`` batches of its training data
    (first epoch's order): per direction, the negatives-only entropy ``H(~Y)`` and the lift against the
    ground-truth objects (:func:`pipeline.shapes_captions.target_lift`; 1.0 = uninformative). Built by the
    run's own loss (:meth:`train.losses.SoftCLIPLoss._log_similarity`) from the views the training step gives
    it; empty for runs without soft targets or with uniform ones."""
    import dataclasses

    import torch

    from softclip.pipeline.config import from_dict
    from softclip.pipeline.shapes_captions import sharing_matrix, target_lift
    from softclip.train.checkpoint import load_checkpoint
    from softclip.train.config import TrainConfig
    from softclip.train.data import TrainData
    from softclip.train.loop import _loss_fn, _teacher_views
    from softclip.train.losses import disentangled_negatives, negatives_entropy
    from softclip.train.model import build_model

    checkpoint = load_checkpoint(train_dir / "checkpoints" / "latest.pt")
    cfg = from_dict(TrainConfig, checkpoint["config"], source=str(train_dir))
    loss_fn = _loss_fn(cfg, 1)
    sides = {d: t for d, t in (("i2t", cfg.loss.image_target), ("t2i", cfg.loss.text_target))
             if t not in ("none", "uniform")}
    if (cfg.loss.lam == 0 and cfg.loss.mu == 0) or not sides:
        return {}
    model, transform, _, tokenizer = build_model(cfg.model, ema_text="ema_text" in loss_fn.views)
    model.clip.load_state_dict(checkpoint["state_dict"])
    model.roi.load_state_dict(checkpoint["roi_state_dict"])
    if model.ema_text is not None:
        model.ema_text.load_state_dict(checkpoint["ema_state_dict"])
    data = TrainData(dataclasses.replace(cfg.data, num_workers=0), transform=transform, tokenizer=tokenizer,
                     feature_dim=cfg.model.roi_feature_dim, seed=cfg.seed)
    values, tau = collections.defaultdict(list), {"i2t": cfg.loss.tau_image, "t2i": cfg.loss.tau_text}
    model.eval()
    with torch.no_grad():
        for _, batch in zip(range(batches), data.epoch_batches(0)):
            out = model(batch["images"], batch["texts"], tags=batch["tags"], ema_tags=batch["tags"]
                               if model.ema_text is not None else None, roi_features=batch["roi_features"],
                               roi_geometry=batch["roi_geometry"], roi_mask=batch["roi_mask"])
            views = _teacher_views(out, batch, loss_fn.views, torch.device("cpu"))
            own = {"i2t": out["image"], "t2i": out["text"]}
            shared = sharing_matrix([objects[k] for k in batch["keys"]])
            for direction, source in sides.items():
                log_y = loss_fn._log_similarity(source, views, own[direction], tau[direction]).double()
                values[f"teacher_H(~Y)_{direction}"].append(float(negatives_entropy(log_y)))
                values[f"teacher_lift_{direction}"].append(
                    target_lift(disentangled_negatives(log_y).exp().numpy(), shared))
    return {name: statistics.fmean(v) for name, v in values.items()}


def eval_set_stats(config: WorkflowConfig, cache: ArtifactCache) -> dict[str, float]:
    """How many-to-many the retrieval set is: the share of captions fitting several images, the median and
    mean number they fit, and the expected "any fit" R@1 of a random ranking (chance, in %)."""
    dataset = WorkflowRunner(config, cache=cache, log=lambda _: None, until="dataset").run().records[0]
    path = Path(dataset.outputs["eval"]) / "retrieval" / "dataset_karpathy.json"
    images = json.loads(path.read_text())["images"]
    fits = [len(s["consistent_imgids"]) for e in images for s in e["sentences"]]
    per_image = collections.Counter(i for e in images for s in e["sentences"] for i in s["consistent_imgids"])
    return {"captions": len(fits), "images": len(images), "fit_several": sum(n > 1 for n in fits) / len(fits),
            "median_fit": statistics.median(fits), "mean_fit": statistics.fmean(fits),
            "chance_text_to_image_R@1": 100 * statistics.fmean(n / len(images) for n in fits),
            "chance_image_to_text_R@1": 100 * statistics.fmean(per_image[e["imgid"]] / len(fits) for e in images)}


def complete(config: WorkflowConfig, cache: ArtifactCache, until: str) -> bool:
    """Whether every stage of ``config`` up to ``until`` is complete in ``cache`` (nothing is run)."""
    return all(r.cached for r in WorkflowRunner(config, cache=cache, until=until).plan())


def final_monitors(train_dir: Path, every_n_steps: int = 10) -> dict[str, float]:
    """The last value of every monitor the training loop wrote to ``metrics.jsonl`` (entropies, cosines, loss
    terms, lift) at a regular log step (``step`` a multiple of ``every_n_steps``, the study's
    ``log.every_n_steps``), so the study reports whatever the loss logs. The run's final step is left out:
    here it is the last, partial batch of an epoch (5,000 = 78 x 64 + 8), whose H(~Y) is bounded by ln 7."""
    last: dict[str, float] = {}
    for row in map(json.loads, (train_dir / "metrics.jsonl").read_text().splitlines()):
        if row.get("step", 0) % every_n_steps == 0:
            last |= {k: v for k, v in row.items() if isinstance(v, (int, float)) and
                     k.startswith(("loss", "entropy", "neg_entropy", "cos_", "lift"))}
    return last


def cached_teacher_lift(train_dir: Path, objects: dict[str, list], folder: Path) -> dict[str, float]:
    """:func:`teacher_lift` of a training run, kept in ``folder/<run key>.json`` (a finished run's teacher
    does not change, and a rerun of the study should not recompute it)."""
    path = folder / f"{train_dir.name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    values = teacher_lift(train_dir, objects)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, values)
    return values


def lift_table(lifts: dict) -> list[str]:
    """Markdown lines: per run and noise level, the trained teachers' H(~Y) and lift, mean over seeds."""
    rows = collections.defaultdict(list)
    for (name, noise, _), values in lifts.items():
        if "teacher_lift_i2t" in values or "teacher_lift_t2i" in values:
            rows[name, noise].append(values)
    text = ["### The trained teachers", "",
            "Each run's own soft targets after training, on 20 batches of 64 of its training data: negatives-only "
            "entropy H(~Y) in nats and lift (as above), image->text target (i2t) and text->image target (t2i), mean "
            "over seeds; '-' where that side has no target or a uniform one.", "",
            "| run | noise | seeds | H(~Y) i2t | lift i2t | H(~Y) t2i | lift t2i |", "|---|---|---|---|---|---|---|"]
    for (name, noise), values in sorted(rows.items(), key=lambda x: (x[0][1], x[0][0])):
        cells = []
        for key in ("teacher_H(~Y)_i2t", "teacher_lift_i2t", "teacher_H(~Y)_t2i", "teacher_lift_t2i"):
            have = [v[key] for v in values if key in v]
            cells.append(f"{statistics.fmean(have):.2f}" if have else "-")
        text.append(f"| {name} | {noise} | {len(values)} | " + " | ".join(cells) + " |")
    return text + [""]


def summary(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "per_seed": values}


def tables(results: dict, noise: float, names: list[str], seeds: list[int]) -> tuple[dict, dict]:
    """``(absolute, paired)``: per run name and metric, in %, over the seeds that have both the run and its
    baseline; ``paired`` holds run minus baseline per seed."""
    absolute, paired = {}, {}
    for name in names:
        have = [s for s in seeds if (name, noise, s) in results]
        if not have:
            continue
        absolute[name] = {m: summary([100 * results[name, noise, s][t][k] for s in have])
                          for m, (t, k) in METRICS.items()}
        base = BASELINE.get(name, "control")
        both = [s for s in have if (base, noise, s) in results]
        if name != base and both:
            paired[name] = {"baseline": base, **{
                m: summary([100 * (results[name, noise, s][t][k] - results[base, noise, s][t][k]) for s in both])
                for m, (t, k) in METRICS.items()}}
    return absolute, paired


def markdown_table(title: str, rows: dict, *, paired: bool) -> str:
    head = "| run | " + ("baseline | " if paired else "") + " | ".join(METRICS) + " |"
    lines = [f"### {title}", "", head, "|---|" + ("---|" if paired else "") + "---|" * len(METRICS)]
    for name, row in rows.items():
        cells = []
        for m in METRICS:
            cell = f"{row[m]['mean']:+.1f}" if paired else f"{row[m]['mean']:.1f}"
            if row[m]["n"] > 1:
                cell += f" ± {row[m]['std']:.1f}"
            if paired:
                cell += " (" + ", ".join(f"{v:+.1f}" for v in row[m]["per_seed"]) + ")"
            cells.append(cell)
        lines.append(f"| {name} | " + (f"{row['baseline']} | " if paired else "") + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(paired: dict[str, dict], path: Path) -> None:
    """Paired differences against the baseline, one panel per noise level: mean bar and each seed's dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = list(METRICS)[:2]
    fig, axes = plt.subplots(1, max(len(paired), 1), figsize=(5.5 * max(len(paired), 1), 3.8), squeeze=False)
    for ax, (setting, rows) in zip(axes[0], paired.items()):
        names = list(rows)
        for j, metric in enumerate(shown):
            x = [i + (j - 0.5) * 0.38 for i in range(len(names))]
            ax.bar(x, [rows[n][metric]["mean"] for n in names], width=0.36, label=metric, alpha=0.7)
            for xi, n in zip(x, names):
                ax.plot([xi] * len(rows[n][metric]["per_seed"]), rows[n][metric]["per_seed"], "k.", ms=4)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{setting}: minus the matched control (points)", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "shapes-study")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    parser.add_argument("--noise", default="0.2,0.4", help="comma-separated noise levels of part 1")
    parser.add_argument("--noise-kind", default="caption", choices=("caption", "attribute", "partial", "hallucination"))
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"part 1 methods, of {', '.join(METHODS)} (default: {', '.join(DEFAULT_METHODS)})")
    parser.add_argument("--ablation-noise", type=float, default=0.4)
    parser.add_argument("--ablations", default=",".join(ABLATIONS), help="part 2 variants, or 'none'")
    parser.add_argument("--num-train", type=int, default=5000)
    parser.add_argument("--num-eval", type=int, default=2000, help="retrieval images (5 captions each)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="20 training steps per run (a smoke test)")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--cached-only", action="store_true",
                        help="report the runs already complete in the cache; run nothing (the rest are listed)")
    args = parser.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.noise = [float(x) for x in args.noise.split(",")]
    args.methods = [m for m in args.methods.split(",") if m]
    args.ablations = [] if args.ablations == "none" else [a for a in args.ablations.split(",") if a]
    unknown = [m for m in args.methods if m not in METHODS] + [a for a in args.ablations if a not in ABLATIONS]
    if unknown:
        parser.error(f"unknown method or ablation {unknown[0]!r}")
    return args


def shipped_ablations() -> list[str]:
    """The ablations that change nothing: their switch is already the shipped config's setting, so the
    ``softclip`` run is that variant (they are not run twice)."""
    from softclip.pipeline.config import apply_overrides, load_config
    from softclip.train.config import TrainConfig

    shipped = load_config(TrainConfig, ROOT / TRAIN_CONFIG)
    return [name for name, overrides in ABLATIONS.items() if apply_overrides(shipped, overrides) == shipped]


def planned_runs(args) -> list[tuple[str, str, list[str], float, int]]:
    """``(name, features, overrides, noise, seed)`` of every run asked for; a method's baseline is added."""
    methods = list(dict.fromkeys(m for name in args.methods for m in (BASELINE.get(name, "control"), name)))
    # seed by seed, so that an interrupted study already holds complete pairs
    runs = [(m, *METHODS[m], noise, seed) for noise in args.noise for seed in args.seeds for m in methods]
    if args.ablations:
        shipped = shipped_ablations()
        runs += [(f"softclip {a}", "detector", ABLATIONS[a], args.ablation_noise, seed)
                 for a in args.ablations if a not in shipped for seed in args.seeds]
        runs += [(m, *METHODS[m], args.ablation_noise, seed) for m in ("control", "softclip") for seed in args.seeds
                 if (m, args.ablation_noise) not in {(r[0], r[3]) for r in runs}]
    return runs


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    cache = ArtifactCache(args.cache_dir)
    results, monitors, compute, objects, lifts = {}, {}, {}, {}, {}
    runs = planned_runs(args)
    missing = []
    for i, (name, features, overrides, noise, seed) in enumerate(runs, start=1):
        print(f"== run {i}/{len(runs)}: {name} noise {noise} seed {seed}", flush=True)
        config = run_workflow(name.replace(" ", "_").replace("=", "-"), features, overrides, noise, seed, args)
        if args.cached_only and not complete(config, cache, "eval"):
            missing.append(f"{name} @ {noise} seed {seed}")
            continue
        results[name, noise, seed], train_dir = run_one(config, cache, compute)
        if noise not in objects:
            objects[noise] = ground_truth_objects(config, cache)
        monitors[f"{name} @ {noise} seed {seed}"] = final_monitors(train_dir) | cached_teacher_lift(
            train_dir, objects[noise], args.out / "teacher_lift")
        lifts[name, noise, seed] = monitors[f"{name} @ {noise} seed {seed}"]
    calibration = {}
    for features in ("detector", "annotations"):
        config = run_workflow("calibration", features, [], args.noise[0], 0, args)
        if not args.cached_only or complete(config, cache, "extract"):
            calibration |= {f"{features} tags, tau_s {tau}": tagset_lift(config, cache, tau) for tau in TAGSET_TAUS}
    first = run_workflow("calibration", "detector", [], args.noise[0], 0, args)
    stats = eval_set_stats(first, cache) if not args.cached_only or complete(first, cache, "dataset") else {}
    names = list(dict.fromkeys(r[0] for r in runs))
    levels = sorted({r[3] for r in runs})
    absolute, paired = {}, {}
    for noise in levels:
        absolute[f"noise {noise}"], paired[f"noise {noise}"] = tables(results, noise, names, args.seeds)
    command = "python benchmarks/shapes_study.py " + " ".join(argv if argv is not None else sys.argv[1:])
    stage_seconds = collections.Counter()
    for stage, seconds in compute.values():
        stage_seconds[stage] += seconds
    cost = (f"{sum(stage == 'train' for stage, _ in compute.values())} training runs, "
            f"{sum(stage_seconds.values()) / 60:.0f} min of compute as the artifacts recorded it ("
            + ", ".join(f"{stage} {s / 60:.1f} min" for stage, s in sorted(stage_seconds.items()))
            + f"); this invocation took {time.perf_counter() - start:.0f} s")
    text = [f"Command: `{command.strip()}`", "",
            f"Shapes world: {args.num_train} training pairs, {args.noise_kind} noise, {args.num_eval} clean "
            f"retrieval images x 5 captions, {args.epochs} epochs, seeds {args.seeds}; numbers in %. "
            "Paired: run minus its baseline on the same seed, mean ± std (each seed's value).", "",
            f"Cost: {cost}.", ""]
    if stats:
        text += [f"Evaluation set: {stats['images']} images, {stats['captions']} captions; "
                 f"{100 * stats['fit_several']:.0f}% of the captions fit several images (median "
                 f"{stats['median_fit']:g}, mean {stats['mean_fit']:.1f}); a random ranking scores "
                 f"{stats['chance_text_to_image_R@1']:.1f}% text->image and {stats['chance_image_to_text_R@1']:.1f}% "
                 "image->text \"any fit\" R@1 (chance).", ""]
    if missing:
        text += [f"Not run yet ({len(missing)}, left out of every table): " + "; ".join(missing) + ".", ""]
    same = [a for a in args.ablations if a in shipped_ablations()]
    if same:
        text += [f"Ablations that are the shipped setting, so the `softclip` row: {', '.join(same)}.", ""]
    for setting in absolute:
        text.append(markdown_table(f"Paired differences at {setting}", paired[setting], paired=True))
        text.append(markdown_table(f"Absolute values at {setting}", absolute[setting], paired=False))
    text += ["### The parameter-free tag-set target before training", "",
             "Negatives-only entropy H(~Y) in nats (uniform: ln 63 = 4.14) and lift (target mass on pairs that "
             "truly share a colour+shape over its base rate; 1.0 = uninformative), mean of 40 random batches of 64.",
             "", "| tags, tau_s | H(~Y) | lift |", "|---|---|---|"]
    text += [f"| {name} | {row['H(~Y)']:.2f} | {row['lift']:.2f} |" for name, row in calibration.items()] + [""]
    text += lift_table(lifts)
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"command": command.strip(), "seeds": args.seeds, "noise_kind": args.noise_kind,
               "epochs": args.epochs, "num_train": args.num_train, "num_eval": args.num_eval,
               "absolute": absolute, "paired": paired, "monitors": monitors, "tagset_calibration": calibration, "eval_set": stats,
               "not_run": missing,
               "compute_seconds": {stage: round(s, 1) for stage, s in sorted(stage_seconds.items())},
               "seconds": round(time.perf_counter() - start, 1)}
    atomic_write_json(args.out / "study.json", payload)
    atomic_write_text(args.out / "study.md", "\n".join(text))
    plot(paired, args.out / "study.png")
    print(f"study: {len(runs)} runs, {cost} -> {args.out}")
    return payload


if __name__ == "__main__":
    main()
