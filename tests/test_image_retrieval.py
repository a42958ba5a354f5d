"""Revisited Oxford/Paris and Copydays mAP (issue 12, gap 7) on generated ground truth in the benchmarks'
pickle format, against a separate implementation of revisitop's loop; malicious pickles are refused."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from softclip.eval.image_retrieval import (
    UnsafePickleError,
    average_precision,
    copydays_map,
    load_ground_truth,
    rank_database,
    revisited_map,
)


def _reference_map(ranks: np.ndarray, gnd: list[dict]) -> float:
    """revisitop's compute_map as its loop reads: positive positions in the full ranking, each moved up by the
    junk ranked before it, then the trapezoidal AP; the mean over queries with positives."""
    total, counted = 0.0, 0
    for i, entry in enumerate(gnd):
        ok, junk = np.array(entry["ok"]), np.array(entry.get("junk", []))
        if ok.size == 0:
            continue
        pos = [p for p in range(ranks.shape[0]) if ranks[p, i] in ok]
        junk_pos = [p for p in range(ranks.shape[0]) if ranks[p, i] in junk]
        shifted = [p - sum(j < p for j in junk_pos) for p in pos]
        ap = 0.0
        for j, r in enumerate(shifted):
            p0 = 1.0 if r == 0 else j / r
            ap += (p0 + (j + 1) / (r + 1)) / 2 / len(ok)
        total, counted = total + ap, counted + 1
    return total / counted


def _generated_ground_truth(seed: int, num_db: int = 40, num_q: int = 6) -> dict:
    rng = np.random.default_rng(seed)
    gnd = []
    for _ in range(num_q):
        ids = rng.permutation(num_db)
        gnd.append({"easy": ids[:3].tolist(), "hard": ids[3:5].tolist(), "junk": ids[5:8].tolist(),
                    "bbx": np.array([1.0, 2.0, 30.0, 40.0])})
    return {"imlist": [f"db_{i}" for i in range(num_db)], "qimlist": [f"q_{i}" for i in range(num_q)], "gnd": gnd}


@pytest.mark.parametrize("seed", range(4))
def test_revisited_map_equals_the_reference_loop(seed, tmp_path):
    path = tmp_path / "gnd_roxford5k.pkl"
    path.write_bytes(pickle.dumps(_generated_ground_truth(seed), protocol=seed % 2 + 3))
    data = load_ground_truth(path)
    rng = np.random.default_rng(100 + seed)
    ranks = rank_database(torch.from_numpy(rng.normal(size=(6, 8))), torch.from_numpy(rng.normal(size=(40, 8))))
    ours = revisited_map(ranks, data["gnd"])
    protocols = {"mAP_easy": (("easy",), ("junk", "hard")), "mAP_medium": (("easy", "hard"), ("junk",)),
                 "mAP_hard": (("hard",), ("junk", "easy"))}
    for name, (ok_keys, junk_keys) in protocols.items():
        gnd = [{"ok": [v for k in ok_keys for v in g[k]], "junk": [v for k in junk_keys for v in g[k]]}
               for g in data["gnd"]]
        assert ours[name] == pytest.approx(_reference_map(ranks, gnd), abs=1e-12)
    assert 0.0 <= ours["mAP_hard"] <= 1.0


def test_average_precision_known_values():
    assert average_precision([0, 1], 2) == 1.0
    # positives at ranks 1 and 3 of 2: (0 + 1/2)/2/2 + (1/3 + 2/4)/2/2
    assert average_precision([1, 3], 2) == pytest.approx(0.125 + 5 / 24)


def test_copydays_map_from_file_name_blocks():
    database = ["200000.jpg", "200100.jpg", "200200.jpg", "distractor_a.jpg"]
    queries = ["200001.jpg", "200203.jpg"]
    # query 0 finds its original first; query 1 ranks its original third
    ranks = np.array([[0, 3], [1, 1], [2, 2], [3, 0]])
    # query 1: its original (index 2) at 0-based rank 2, AP = (0/2 + 1/3) / 2
    assert copydays_map(ranks, queries, database, distractors=1) == {"mAP": pytest.approx((1.0 + (0 + 1 / 3) / 2) / 2)}


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_pickle_naming_any_other_global_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "gnd_rparis6k.pkl"
    path.write_bytes(pickle.dumps({"imlist": [], "qimlist": [], "gnd": [_Exploit()]}))
    with pytest.raises(UnsafePickleError, match="posix.system|os.system|nt.system"):
        load_ground_truth(path)
    assert not (tmp_path / "pwned").exists()
    path.write_bytes(pickle.dumps({"imlist": [], "qimlist": [], "gnd": [], "x": torch.zeros(2)}))
    with pytest.raises(UnsafePickleError):
        load_ground_truth(path)


def test_ground_truth_layout_is_checked(tmp_path):
    path = tmp_path / "gnd.pkl"
    path.write_bytes(pickle.dumps({"imlist": ["a"], "qimlist": ["q"], "gnd": [{"easy": [3], "hard": [], "junk": []}]}))
    with pytest.raises(ValueError, match="outside imlist"):
        load_ground_truth(path)
    with pytest.raises(FileNotFoundError):
        load_ground_truth(tmp_path / "missing.pkl")


def _write_images(folder, names, seed):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / name)


def test_eval_runs_the_revisited_and_copydays_tasks_from_the_users_files(tiny_checkpoint, tmp_path):
    from softclip.eval.evaluate import EvalConfig, run_eval

    root = tmp_path / "data"
    for name in ("roxford5k", "rparis6k"):
        folder = root / "revisitop" / name
        truth = _generated_ground_truth(1, num_db=12, num_q=3)
        truth["gnd"] = [{**g, "easy": [i % 12], "hard": [(i + 5) % 12], "junk": [(i + 7) % 12]}
                        for i, g in enumerate(truth["gnd"])]
        _write_images(folder / "jpg", [f"{n}.jpg" for n in truth["imlist"] + truth["qimlist"]], seed=2)
        (folder / f"gnd_{name}.pkl").write_bytes(pickle.dumps(truth))
    _write_images(root / "copydays" / "original", ["200000.jpg", "200100.jpg"], seed=3)
    _write_images(root / "copydays" / "strong", ["200001.jpg", "200101.jpg"], seed=4)
    _write_images(root / "copydays" / "distractors", ["d0.jpg"], seed=5)
    cfg = EvalConfig(checkpoints=(tiny_checkpoint,), tasks=("roxford5k", "rparis6k", "copydays"),
                     out=tmp_path / "report", data_root=root, num_workers=0, device="cpu")
    payload = run_eval(cfg)
    results = payload["results"][payload["labels"][0]]
    assert set(results["roxford5k"]) == {"mAP_easy", "mAP_medium", "mAP_hard"}
    assert all(0.0 < v <= 1.0 for v in results["rparis6k"].values())
    assert 0.0 < results["copydays"]["mAP"] <= 1.0
    assert payload["task_notes"]["copydays"] == "2 queries, 3 database images"
    assert payload["files"]["clip_benchmark"] == []  # CLIP_benchmark has no image-to-image task
    assert "mAP_medium" in (tmp_path / "report" / "results.md").read_text()
