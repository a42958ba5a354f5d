"""The study script's bookkeeping: paired differences against the matched control, subsets, monitors."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("shapes_study", ROOT / "benchmarks" / "shapes_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _result(study, value):
    """Every metric of the study at ``value`` (a fraction)."""
    out = {}
    for task, key in study.METRICS.values():
        out.setdefault(task, {})[key] = value
    return out


def test_paired_differences_per_seed_against_the_matched_control(study):
    results = {("control", 0.4, 0): _result(study, 0.20), ("control", 0.4, 1): _result(study, 0.30),
               ("softclip", 0.4, 0): _result(study, 0.25), ("softclip", 0.4, 1): _result(study, 0.31),
               ("softclip", 0.4, 2): _result(study, 0.90),  # no control on seed 2: not paired
               ("oracle_pixels_control", 0.4, 0): _result(study, 0.10), ("oracle_pixels", 0.4, 0): _result(study, 0.40),
               ("oracle", 0.4, 1): _result(study, 0.50)}
    absolute, paired = study.tables(results, 0.4, ["control", "softclip", "oracle_pixels_control", "oracle_pixels",
                                                   "oracle"], [0, 1, 2])
    metric = next(iter(study.METRICS))
    assert absolute["softclip"][metric]["per_seed"] == pytest.approx([25.0, 31.0, 90.0])
    assert paired["softclip"][metric]["per_seed"] == pytest.approx([5.0, 1.0])
    assert paired["softclip"][metric]["mean"] == pytest.approx(3.0)
    assert paired["softclip"][metric]["std"] == pytest.approx(2.8284, abs=1e-4)  # sample std of 5, 1
    assert paired["oracle_pixels"]["baseline"] == "oracle_pixels_control"
    assert paired["oracle_pixels"][metric]["per_seed"] == pytest.approx([30.0])
    assert "control" not in paired  # the baseline itself
    assert paired["oracle_pixels_control"][metric]["per_seed"] == pytest.approx([-10.0])  # annotation vs detector ROIs
    assert paired["oracle"]["baseline"] == "control"  # the detector's features, ground-truth tags
    assert paired["oracle"][metric]["per_seed"] == pytest.approx([20.0])
    table = study.markdown_table("t", {"softclip": paired["softclip"]}, paired=True)
    assert "| softclip | control | +3.0 ± 2.8 (+5.0, +1.0) |" in table


def test_subsets_add_each_methods_baseline(study):
    args = study.parse_args(["--methods", "oracle_pixels,oracle,softclip", "--seeds", "0,2", "--noise", "0.4",
                             "--ablations", "aggregator=mean"])
    runs = {(name, noise, seed) for name, _, _, noise, seed in study.planned_runs(args)}
    expected = {(m, 0.4, s) for m in ("oracle_pixels", "oracle_pixels_control", "oracle", "softclip", "control",
                                      "softclip aggregator=mean") for s in (0, 2)}
    assert runs == expected
    with pytest.raises(SystemExit):
        study.parse_args(["--methods", "clipp"])


def test_final_monitors_keep_the_last_value_logged_at_a_regular_step(study, tmp_path):
    rows = [{"step": 10, "loss": 3.0, "neg_entropy_i2t": 1.0, "lr": 0.1},
            {"step": 20, "loss": 2.5, "lift": 1.8}, {"step": 23, "epoch": 1, "neg_entropy_i2t": 0.5, "loss": 1.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # step 23, the run's last (a partial batch), is left out
    assert study.final_monitors(tmp_path) == {"loss": 2.5, "neg_entropy_i2t": 1.0, "lift": 1.8}


def test_annotation_methods_use_the_annotations_workflow(study):
    args = study.parse_args(["--noise", "0.4", "--seeds", "0"])
    pixels = study.run_workflow("oracle_pixels", "annotations", ["seed=0"], 0.4, 0, args)
    oracle = study.run_workflow("oracle", "annotation_tags", ["seed=0"], 0.4, 0, args)
    control = study.run_workflow("control", "detector", ["seed=0"], 0.4, 0, args)
    assert pixels.detector.annotations and not control.detector.annotations
    assert oracle.detector == control.detector and oracle.extract.tags == "annotations"
    assert control.extract.tags == "detector"
    assert oracle.dataset == control.dataset == pixels.dataset  # one shared world
    assert oracle.dataset.shapes.caption_noise == 0.4 and oracle.dataset.shapes.num_retrieval == 2000


def test_tagset_lift_of_ground_truth_tags_is_informative(study, tmp_path):
    from softclip.workflows.cache import ArtifactCache

    args = study.parse_args(["--noise", "0.4", "--num-train", "96", "--num-eval", "4"])
    config = study.run_workflow("calibration", "annotations", [], 0.4, 0, args)
    cache = ArtifactCache(tmp_path / "cache")
    sharp = study.tagset_lift(config, cache, 0.05, batches=4)
    flat = study.tagset_lift(config, cache, 50.0, batches=4)
    assert 0 < sharp["H(~Y)"] < flat["H(~Y)"] <= np.log(63) + 1e-9
    assert sharp["lift"] > 3.0  # ground-truth tags point at the images that share an object
    assert flat["lift"] == pytest.approx(1.0, abs=0.05)  # a flat target is uninformative


def test_every_method_and_ablation_is_a_valid_training_config(study):
    from softclip.pipeline.config import apply_overrides, load_config
    from softclip.train.config import TrainConfig

    base = load_config(TrainConfig, ROOT / study.TRAIN_CONFIG)
    configs = {name: apply_overrides(base, overrides) for name, (_, overrides) in study.METHODS.items()}
    configs |= {name: apply_overrides(base, overrides) for name, overrides in study.ABLATIONS.items()}
    assert configs["clip"].loss.lam == configs["clip"].loss.roi_weight == 0
    assert configs["control"].loss.lam == configs["control"].loss.mu == 0 < configs["control"].loss.roi_weight
    assert configs["oracle"].loss.image_target == configs["oracle"].loss.text_target == "tagset"
    assert configs["softclip"] == base


def test_cached_only_runs_nothing_and_lists_what_is_missing(study, tmp_path):
    payload = study.main(["--cached-only", "--methods", "softclip", "--seeds", "0", "--noise", "0.4",
                          "--ablations", "none", "--num-train", "8", "--num-eval", "2",
                          "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out")])
    assert payload["not_run"] == ["control @ 0.4 seed 0", "softclip @ 0.4 seed 0"]
    assert payload["tagset_calibration"] == {} and payload["paired"] == {"noise 0.4": {}}
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("artifact.json"))
    assert "Not run yet (2, left out of every table)" in (tmp_path / "out" / "study.md").read_text()


def test_eval_set_stats_give_the_chance_of_a_random_ranking(study, tmp_path):
    from softclip.workflows.cache import ArtifactCache

    args = study.parse_args(["--noise", "0.4", "--num-train", "4", "--num-eval", "30"])
    stats = study.eval_set_stats(study.run_workflow("x", "detector", [], 0.4, 0, args), ArtifactCache(tmp_path))
    assert stats["images"] == 30 and stats["captions"] == 150 and 0 < stats["fit_several"] < 1
    # a random ranking puts a fitting image first with probability (images it fits) / images
    assert stats["chance_text_to_image_R@1"] == pytest.approx(100 * stats["mean_fit"] / 30)
    assert stats["chance_image_to_text_R@1"] == pytest.approx(stats["chance_text_to_image_R@1"])  # same pairs


def test_teacher_lift_reads_a_trained_runs_own_targets(study, tmp_path):
    from softclip.workflows.cache import ArtifactCache
    from softclip.workflows.runner import WorkflowRunner

    args = study.parse_args(["--noise", "0.4", "--num-train", "64", "--num-eval", "4", "--quick"])
    # ground-truth tags on the text side, the ROI aggregator (20 steps old) on the image side
    overrides = ["loss.image_target=roi", "loss.text_target=tagset", *study.ROI]
    config = study.run_workflow("lift", "annotations", overrides, 0.4, 0, args)
    cache = ArtifactCache(tmp_path / "cache")
    train = next(r for r in WorkflowRunner(config, cache=cache, log=lambda _: None, until="train").run().records
                 if r.stage == "train")
    objects = study.ground_truth_objects(config, cache)
    lift = study.cached_teacher_lift(train.path, objects, tmp_path / "lift")
    assert set(lift) == {"teacher_H(~Y)_i2t", "teacher_lift_i2t", "teacher_H(~Y)_t2i", "teacher_lift_t2i"}
    assert 0 < lift["teacher_H(~Y)_t2i"] < np.log(63) and lift["teacher_lift_t2i"] > 3.0  # the true objects
    assert 0 < lift["teacher_H(~Y)_i2t"] <= np.log(63) + 1e-9 and lift["teacher_lift_i2t"] > 0
    assert json.loads((tmp_path / "lift" / f"{train.path.name}.json").read_text()) == lift  # kept for reruns
    assert "| lift | 0.4 | 1 |" in "\n".join(study.lift_table({("lift", 0.4, 0): lift}))


def test_the_default_grid_is_the_issues_study(study):
    from softclip.pipeline.config import apply_overrides, load_config, to_dict
    from softclip.train.config import TrainConfig

    runs = study.planned_runs(study.parse_args([]))
    assert {r[0] for r in runs if r[3] == 0.2} == {"clip", "control", "softclip", "label_smoothing", "oracle"}
    assert set(study.shipped_ablations()) == {"aggregator=pool", "image_target=roi", "text_target=tagset"}
    assert not {f"softclip {a}" for a in study.shipped_ablations()} & {r[0] for r in runs}  # the softclip row
    base = load_config(TrainConfig, ROOT / study.TRAIN_CONFIG)
    distinct = {(features, noise, seed, json.dumps(to_dict(apply_overrides(base, overrides)), sort_keys=True))
                for _, features, overrides, noise, seed in runs}
    # 5 methods x 2 noise levels x 3 seeds, and 12 ablations that differ from the default x 3 seeds
    assert len(distinct) == 30 + 12 * 3
