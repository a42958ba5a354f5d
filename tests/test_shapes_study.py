"""The study script's bookkeeping: per-seed aggregation and the soft-target entropy read from metrics files."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("shapes_study", ROOT / "benchmarks" / "shapes_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _result(shape, colour_shape, i2t, t2i):
    return {"shapes-shape": {"top1": shape}, "shapes-colour_shape": {"top1": colour_shape},
            "shapes-retrieval": {"image_to_text_R@1": i2t, "text_to_image_R@1": t2i}}


def test_summarise_gives_percent_mean_std_and_every_seed(study):
    results = {"clip@seed0": _result(0.20, 0.10, 0.30, 0.05), "clip@seed1": _result(0.30, 0.20, 0.10, 0.15)}
    row = study.summarise(results, ["clip"], [0, 1])["clip"]
    assert row["zero-shot shape top-1"]["mean"] == pytest.approx(25.0)
    assert row["zero-shot shape top-1"]["std"] == pytest.approx(7.0711, abs=1e-4)  # sample std of 20, 30
    assert row["image->text R@1"]["per_seed"] == pytest.approx([30.0, 10.0])
    assert row["text->image R@1"]["n"] == 2
    assert "| clip | 25.0 ± 7.1 |" in study.markdown("t", {"clip": row}, "note")


def test_target_entropy_reads_steps_1_10_and_last(study, tmp_path):
    dirs = {}
    for seed, last in [(0, 1.6), (1, 1.8)]:
        run = tmp_path / f"run{seed}"
        run.mkdir()
        rows = [{"step": 1, "neg_entropy_i2t": 1.0}, {"step": 10, "neg_entropy_i2t": 1.6, "neg_entropy_t2i": 2.0},
                {"step": 20, "neg_entropy_i2t": 1.7, "loss": 2.0}, {"step": 23, "neg_entropy_t2i": last}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        dirs[f"softclip@seed{seed}"] = run
    table = study.target_entropy(dirs, ["softclip"], [0, 1])
    assert table["softclip"] == pytest.approx({"step1": 1.0, "step10": 1.8, "last": 1.7})
    assert "| softclip @ noise 0.4 | 1.000 | 1.800 | 1.700 |" in study.entropy_markdown({"noise 0.4": table})
