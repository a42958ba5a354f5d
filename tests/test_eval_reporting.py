"""Evaluation reporting (issue 12, gap 6): chance levels on the chart, metrics in the run's TensorBoard."""

from __future__ import annotations

import itertools
import shutil
from math import comb

import pytest
from PIL import Image

from softclip.eval.evaluate import EvalConfig, run_eval
from softclip.eval.retrieval import chance_recall
from softclip.eval.zeroshot import chance_accuracy


def _enumerated_recall(owner: list[int], k: int) -> float:
    """Image-to-text chance by enumerating every set of k retrieved captions (independent of the formula)."""
    texts, images = range(len(owner)), sorted(set(owner))
    hits = [sum(any(owner[t] == i for t in top) for top in itertools.combinations(texts, k)) for i in images]
    return sum(h / comb(len(owner), k) for h in hits) / len(images)


@pytest.mark.parametrize("owner", [[0, 0, 1], [0, 1, 1, 1, 2, 3], [0, 1, 2, 3, 4, 0, 1]])
def test_chance_recall_equals_enumeration(owner):
    for k in (1, 2, 3):
        chance = chance_recall(owner, ks=(k,))
        assert chance[f"image_to_text_R@{k}"] == pytest.approx(_enumerated_recall(owner, k), abs=1e-12)
        assert chance[f"text_to_image_R@{k}"] == pytest.approx(min(k, len(set(owner))) / len(set(owner)))


def test_chance_accuracy():
    assert chance_accuracy(8) == {"top1": 0.125, "top5": 0.625, "mean_per_class_recall": 0.125}
    assert chance_accuracy(4)["top5"] is None


def test_eval_writes_chance_and_the_runs_tensorboard(tiny_checkpoint, shapes_world, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("run_dir: run\n")
    shutil.copy(tiny_checkpoint, run / "checkpoints" / "latest.pt")
    cfg = EvalConfig(checkpoints=(run / "checkpoints" / "latest.pt",), tasks=("shapes-shape",),
                     out=tmp_path / "report", data_root=shapes_world.parent, paths={"shapes-shape": shapes_world /
                     "eval" / "classification"}, num_workers=0, device="cpu")
    payload = run_eval(cfg)
    assert payload["chance"]["shapes-shape"]["top1"] == 1 / 8
    assert payload["files"]["tensorboard_runs"] == [str(run.resolve())]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("eval/shapes-shape/top1")
    assert [(s.step, s.value) for s in scalars] == [(7, pytest.approx(payload["results"]["run"]["shapes-shape"]["top1"]))]
    assert Image.open(payload["files"]["chart"]).size[0] > 0
