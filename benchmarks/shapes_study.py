"""The shapes-world study: does SoftCLIP help under caption noise, and which of its parts matter?

Part 1 trains CLIP, a label-smoothing baseline and SoftCLIP at caption noise 0, 0.2, 0.4 and 0.6. Part 2,
at noise 0.4, varies SoftCLIP's target source, ROI aggregator and target detaching. Every run is repeated
over seeds; the tables give mean and standard deviation of zero-shot top-1 (shape, and colour + shape) and
retrieval R@1 (both directions) on the clean evaluation sets.

Everything goes through the workflow runner, so the study is cached by content: rerunning it computes
nothing, and an interrupted study continues where it stopped. Results: ``--out`` gets ``study.json``,
``study.md`` and ``study.png``; the command line is recorded in them.

    python benchmarks/shapes_study.py --out docs/shapes-study              # the full study
    python benchmarks/shapes_study.py --seeds 1 --noise 0.4 --quick        # a smoke run
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path

from softclip.pipeline.config import load_config
from softclip.pipeline.io import atomic_write_json, atomic_write_text
from softclip.pipeline.shapes import ShapesConfig
from softclip.train.config import TrainConfig
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

METHODS = {  # part 1: name -> training overrides
    "clip": ["loss.lam=0", "loss.mu=0", "loss.roi_weight=0"],
    "matched_control": ["loss.lam=0", "loss.mu=0"],  # CLIP + the ROI-to-caption InfoNCE, no soft terms
    "label_smoothing": ["loss.image_target=uniform", "loss.text_target=uniform"],
    "softclip": [],
}
VARIANTS = {  # part 2, at the ablation noise level: SoftCLIP with one switch changed
    "softclip": [],
    "image=roi_mean": ["loss.image_target=roi_mean", "loss.tau_image=0.01"],
    "text=text": ["loss.text_target=text"],
    "text=ema_text": ["loss.text_target=ema_text"],
    "target=student": ["loss.image_target=student", "loss.text_target=student"],  # own detached embeddings
    "aggregator=mhsa": ["model.aggregator=mhsa"],
    "aggregator=mean": ["model.aggregator=mean"],
    "aggregator=max": ["model.aggregator=max"],
    "aggregator=min": ["model.aggregator=min"],
    "detach_targets=false": ["loss.detach_targets=false"],
}
METRICS = {
    "zero-shot shape top-1": ("shapes-shape", "top1"),
    "zero-shot colour+shape top-1": ("shapes-colour_shape", "top1"),
    "image->text R@1": ("shapes-retrieval", "image_to_text_R@1"),
    "text->image R@1": ("shapes-retrieval", "text_to_image_R@1"),
}
DETECTOR = "extract/weights/shapes"
TRAIN_CONFIG = "train/configs/shapes-softclip.yaml"  # every run: this file plus its overrides


def workflow(noise: float, runs: dict[str, list[str]], seeds: list[int], args) -> WorkflowConfig:
    """One workflow per noise level: the shipped shapes detector, one training run per (name, seed)."""
    train_overrides = [f"optim.epochs={args.epochs}"] + (["optim.max_steps=20"] if args.quick else [])
    steps = tuple(
        TrainStep(name=f"{name}@seed{seed}", config=TRAIN_CONFIG,
                  overrides=tuple(train_overrides + overrides + [f"seed={seed}"]))
        for name, overrides in runs.items() for seed in seeds
    )
    return WorkflowConfig(
        name=f"shapes-study-noise{noise}",
        dataset=DatasetStep(shapes=ShapesConfig(num_train=args.num_train, caption_noise=noise, seed=0)),
        detector=DetectorStep(weights=f"{DETECTOR}/model.pth", labelmap=f"{DETECTOR}/labelmap.json",
                              config=f"{DETECTOR}/detector.yaml"),
        extract=ExtractStep(config="extract/configs/extract-shapes.yaml", overrides=("progress=false",)),
        train=steps,
        eval=EvalStep(tasks=("shapes",), overrides=("num_workers=0",)),
    )


def summarise(results: dict, runs: list[str], seeds: list[int]) -> dict[str, dict[str, dict[str, float]]]:
    """``run -> metric -> {mean, std, n, per_seed}`` over seeds, in percent."""
    table = {}
    for name in runs:
        table[name] = {}
        for metric, (task, key) in METRICS.items():
            values = [100 * results[f"{name}@seed{seed}"][task][key] for seed in seeds]
            table[name][metric] = {"mean": statistics.fmean(values),
                                   "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                                   "n": len(values), "per_seed": values}
    return table


def markdown(title: str, table: dict, note: str) -> str:
    lines = [f"### {title}", "", note, "", "| run | " + " | ".join(METRICS) + " |",
             "|---|" + "---|" * len(METRICS)]
    for name, row in table.items():
        cells = [f"{row[m]['mean']:.1f} ± {row[m]['std']:.1f}" if row[m]["n"] > 1 else f"{row[m]['mean']:.1f}"
                 for m in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(part1: dict[float, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.6))
    for ax, metric in zip(axes, METRICS):
        for name in METHODS:
            levels = sorted(part1)
            means = [part1[n][name][metric]["mean"] for n in levels]
            stds = [part1[n][name][metric]["std"] for n in levels]
            ax.errorbar(levels, means, yerr=stds, marker="o", capsize=3, label=name)
        ax.set_title(metric, fontsize=10)
        ax.set_xlabel("caption noise")
        ax.set_ylabel("%")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_workflow(config: WorkflowConfig, cache: ArtifactCache, compute: dict[str, tuple[str, float]]
                 ) -> tuple[dict, dict[str, Path]]:
    """Evaluation results per run, and each run's training folder (which holds its ``metrics.jsonl``).

    ``compute`` collects ``key -> (stage, seconds)``: the wall time each artifact took when it was made, as
    its ``artifact.json`` records it, so the study's cost is known even when it comes from the cache."""
    result = WorkflowRunner(config, cache=cache, log=print).run()
    payload = json.loads((result.report / "results.json").read_text())
    for record in result.records:
        if record.path is not None:  # given datasets and detectors are not artifacts
            compute[record.key] = (record.stage, cache.artifact(record.stage, record.key).record()["seconds"])
    print(result.summary(), flush=True)
    return payload["results"], {r.name: r.path for r in result.records if r.stage == "train"}


def target_entropy(train_dirs: dict[str, Path], runs: list[str], seeds: list[int]) -> dict[str, dict[str, float]]:
    """``run -> {step1, step10, last}``: the negatives-only target entropy H(~Y) in nats (mean of the two
    directions), averaged over seeds.

    Read from each run's ``metrics.jsonl`` (``neg_entropy_i2t`` / ``neg_entropy_t2i``, logged by
    ``train.losses.SoftCLIPLoss``); a target that collapsed to label smoothing is at ln(N - 1)."""
    table = {}
    for name in runs:
        points = collections.defaultdict(list)
        for seed in seeds:
            lines = (train_dirs[f"{name}@seed{seed}"] / "metrics.jsonl").read_text().splitlines()
            rows = map(json.loads, lines)
            by_step = {row["step"]: statistics.fmean(row[k] for k in row if k.startswith("neg_entropy_"))
                       for row in rows if any(k.startswith("neg_entropy_") for k in row)}
            points["step1"].append(by_step[min(by_step)])
            points["step10"].append(by_step[10])
            points["last"].append(by_step[max(by_step)])
        table[name] = {point: statistics.fmean(values) for point, values in points.items()}
    return table


def entropy_markdown(entropy: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = ["### Soft-target entropy", "",
             "Negatives-only target entropy H(~Y) in nats (both directions and seeds averaged) at training "
             "step 1, step 10 and the last step; uniform (label smoothing, or a collapsed teacher) is "
             "ln(N - 1).", "",
             "| run | step 1 | step 10 | last step |", "|---|---|---|---|"]
    for setting, table in entropy.items():
        for name, row in table.items():
            lines.append(f"| {name} @ {setting} | {row['step1']:.3f} | {row['step10']:.3f} | {row['last']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "shapes-study")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--noise", default="0,0.2,0.4,0.6", help="caption noise levels of part 1")
    parser.add_argument("--ablation-noise", type=float, default=0.4)
    parser.add_argument("--num-train", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--skip-ablation", action="store_true")
    parser.add_argument("--quick", action="store_true", help="20 training steps per run (a smoke test)")
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    cache = ArtifactCache(args.cache_dir)
    seeds = list(range(args.seeds))
    levels = [float(x) for x in args.noise.split(",")]
    part1, part2, entropy, compute = {}, None, {}, {}
    for noise in levels:
        ablate = noise == args.ablation_noise and not args.skip_ablation
        runs = {**METHODS, **VARIANTS} if ablate else METHODS  # the ablation shares its noise level's workflow
        results, train_dirs = run_workflow(workflow(noise, runs, seeds, args), cache, compute)
        part1[noise] = summarise(results, list(METHODS), seeds)
        entropy[f"noise {noise}"] = target_entropy(train_dirs, ["label_smoothing", "softclip"], seeds)
        if ablate:
            part2 = summarise(results, list(VARIANTS), seeds)
            entropy[f"noise {noise}"] |= target_entropy(train_dirs, [v for v in VARIANTS if v != "softclip"], seeds)
    command = "python benchmarks/shapes_study.py " + " ".join(argv if argv is not None else sys.argv[1:])
    stage_seconds = collections.Counter()
    for stage, seconds in compute.values():
        stage_seconds[stage] += seconds
    runs_trained = sum(stage == "train" for stage, _ in compute.values())
    text = [f"Command: `{command.strip()}`", "",
            f"Shapes world: {args.num_train} training pairs, the shipped shapes detector "
            f"({DETECTOR}), model `{load_config(TrainConfig, ROOT / TRAIN_CONFIG).model.name}`, {args.epochs} epochs; {len(seeds)} seed(s); "
            f"{'mean ± std' if len(seeds) > 1 else 'single runs (no std with one seed)'} in %; chance: shape "
            "12.5, colour+shape 1.6, R@1 0.2 (image->text, 5 of 2,500 captions) and 0.2 (text->image).", "",
            f"Cost: {runs_trained} training runs, {sum(stage_seconds.values()) / 60:.0f} min of compute in all "
            "(the sum of the wall times its artifacts recorded when they were made: "
            + ", ".join(f"{stage} {seconds / 60:.1f} min" for stage, seconds in sorted(stage_seconds.items()))
            + f"); this invocation took {time.perf_counter() - start:.0f} s.", ""]
    for noise in levels:
        text.append(markdown(f"Caption noise {noise}", part1[noise], "Part 1: CLIP, label smoothing, SoftCLIP."))
    if part2 is not None:
        text.append(markdown(f"Ablations at caption noise {args.ablation_noise}", part2,
                             "Part 2: SoftCLIP with one switch changed."))
    text.append(entropy_markdown(entropy))
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"command": command.strip(), "seeds": seeds, "noise_levels": levels,
               "part1": {str(n): t for n, t in part1.items()},
               "part2": part2,
               "target_entropy": entropy,
               "compute_seconds": {stage: round(seconds, 1) for stage, seconds in sorted(stage_seconds.items())},
               "seconds": round(time.perf_counter() - start, 1)}
    atomic_write_json(args.out / "study.json", payload)
    atomic_write_text(args.out / "study.md", "\n".join(text))
    plot(part1, args.out / "study.png")
    print(json.dumps({"out": str(args.out), "seconds": payload["seconds"]}))
    return payload


if __name__ == "__main__":
    main()
