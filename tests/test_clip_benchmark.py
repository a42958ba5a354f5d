"""CLIP_benchmark interoperability (issue 12, gap 3): its webdataset sets are read, its metric functions give
the same numbers on the same embeddings (ties included), its own evaluation of the same model on the same
generated set equals ``softclip eval`` to the last digit, and ``clip_benchmark build`` reads our JSON."""

from __future__ import annotations

import builtins
import csv
import io
import json
import tarfile
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from softclip.eval.clip_benchmark import load_wds_set
from softclip.eval.datasets import ClassificationSet, RetrievalSet, load_retrieval_set, task_directory
from softclip.eval.evaluate import EvalConfig, run_eval
from softclip.eval.retrieval import retrieval_metrics
from softclip.eval.zeroshot import classification_metrics

pytestmark = pytest.mark.filterwarnings("ignore:WebDataset\\(shardshuffle:UserWarning")  # CLIP_benchmark's reader

cb_cls = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
cb_ret = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")

CLASSNAMES = ["red", "green", "blue", "yellow", "purple", "orange"]
TEMPLATES = ["a photo of a {c} square.", "a {c} thing."]
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 220), (230, 220, 40), (140, 40, 160), (240, 140, 20)]


def _float_0d(value) -> float:
    return builtins.float(np.asarray(value).reshape(()))


# CLIP_benchmark 1.6.2's accuracy() calls float() on a 1-element 1-D array, which NumPy >= 2.4 refuses;
# this is its own code object with only float() made to accept that array.
cb_accuracy = types.FunctionType(cb_cls.accuracy.__code__, {**cb_cls.accuracy.__globals__, "float": _float_0d})


def _png(rgb: tuple[int, int, int], seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(rgb) + rng.integers(-40, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _write_tar(path: Path, samples: list[dict[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            key = sample.pop("__key__")
            for ext, data in sample.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def make_classification_set(root: Path, per_class: int = 4) -> Path:
    """A CLIP_benchmark wds classification set: 2 shards, classnames.txt, templates with {c}."""
    samples = [{"__key__": f"s{c:02d}{i:03d}", "png": _png(COLOURS[c], 10 * c + i), "cls": str(c).encode()}
               for c in range(len(CLASSNAMES)) for i in range(per_class)]
    half = len(samples) // 2
    _write_tar(root / "test" / "0.tar", samples[:half])
    _write_tar(root / "test" / "1.tar", samples[half:])
    (root / "test" / "nshards.txt").write_text("2\n")
    (root / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    return root


def make_retrieval_set(root: Path) -> Path:
    """A CLIP_benchmark wds retrieval set: 12 images, two captions each (one per line of .txt)."""
    samples = [{"__key__": f"{i:04d}", "png": _png(COLOURS[i % 6], 100 + i),
                "txt": f"a {CLASSNAMES[i % 6]} square\nsomething {CLASSNAMES[(i * 5) % 6]} and noisy\n".encode()}
               for i in range(12)]
    _write_tar(root / "test" / "0.tar", samples)
    (root / "test" / "nshards.txt").write_text("1\n")
    (root / "dataset_type.txt").write_text("retrieval\n")
    return root


def test_wds_sets_are_read_in_clip_benchmark_order(tmp_path):
    data = load_wds_set("wds/colours", make_classification_set(tmp_path / "cls"))
    assert isinstance(data, ClassificationSet) and data.classnames == CLASSNAMES
    assert data.templates == ["a photo of a {} square.", "a {} thing."]
    assert data.labels == [c for c in range(6) for _ in range(4)]
    assert Image.open(io.BytesIO(data.files[5].read_bytes())).size == (32, 32)
    retrieval = load_wds_set("wds/pairs", make_retrieval_set(tmp_path / "ret"))
    assert isinstance(retrieval, RetrievalSet) and len(retrieval.files) == 12
    assert retrieval.captions[:2] == ["a red square", "something red and noisy"]
    assert retrieval.caption_to_image[:4] == [0, 0, 1, 1]


def _tied_embeddings(seed: int, n: int, dim: int = 8) -> torch.Tensor:
    """Unit embeddings on a coarse grid, so many scores tie exactly."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.randint(-1, 2, (n, dim), generator=g).float()
    grid[:, 0] = 1.0  # no zero row
    return F.normalize(grid, dim=-1)


@pytest.mark.parametrize("seed", range(5))
def test_classification_equals_clip_benchmark_functions_with_ties(seed):
    from sklearn.metrics import balanced_accuracy_score

    images = _tied_embeddings(seed, 60)
    classifier = _tied_embeddings(seed + 100, 7)
    classifier[3] = classifier[2]  # two identical classes: every score ties
    labels = torch.randint(0, 7, (60,), generator=torch.Generator().manual_seed(seed))
    ours = classification_metrics(images, classifier, labels)
    logits = 100.0 * images @ torch.stack(list(classifier), dim=1)  # CLIP_benchmark's logits on the same tensors
    acc1, acc5 = cb_accuracy(logits, labels, topk=(1, 5))
    expected = {"top1": acc1, "top5": acc5, "mean_per_class_recall": balanced_accuracy_score(labels, logits.argmax(1))}
    assert ours == expected
    strict = classification_metrics(images, classifier, labels, ties="strict")
    assert strict["top1"] <= ours["top1"]


@pytest.mark.parametrize("seed", range(5))
def test_retrieval_equals_clip_benchmark_functions_with_ties(seed):
    images, texts = _tied_embeddings(seed, 20), _tied_embeddings(seed + 50, 50)
    owner = torch.cat([torch.arange(20), torch.randint(0, 20, (30,), generator=torch.Generator().manual_seed(seed))])
    ours = retrieval_metrics(images, texts, owner, ks=(1, 5, 10))
    scores = texts @ images.T
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(scores)), owner] = True
    for k in (1, 5, 10):
        i2t = (cb_ret.batchify(cb_ret.recall_at_k, scores.T, positive.T, 8, "cpu", k=k) > 0).float().mean().item()
        t2i = (cb_ret.batchify(cb_ret.recall_at_k, scores, positive, 8, "cpu", k=k) > 0).float().mean().item()
        assert (ours[f"image_to_text_R@{k}"], ours[f"text_to_image_R@{k}"]) == (i2t, t2i)
    strict = retrieval_metrics(images, texts, owner, ks=(1,), ties="strict")
    assert strict["text_to_image_R@1"] <= ours["text_to_image_R@1"] + 1e-6  # float32 mean vs exact fraction


def _clip_benchmark_run(checkpoint: Path, root: Path, task: str) -> dict:
    """CLIP_benchmark's own pipeline (its wds reader, dataloader and metrics) on the same model."""
    from clip_benchmark.datasets.builder import build_wds_dataset, image_captions_collate_fn

    from softclip.eval.checkpoint import load_open_clip_checkpoint

    loaded = load_open_clip_checkpoint(checkpoint)
    dataset = build_wds_dataset("x", transform=loaded.preprocess, split="test", data_dir=str(root))
    collate = image_captions_collate_fn if task == "retrieval" else None
    loader = torch.utils.data.DataLoader(dataset.batched(64, collation_fn=collate) if collate else
                                         dataset.batched(64), batch_size=None)
    if task == "retrieval":
        return cb_ret.evaluate(loaded.model, loader, loaded.tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])
    loader.dataset.classes = dataset.classes
    cb_cls.accuracy = cb_accuracy  # the NumPy 2.4 shim above, nothing else changed
    return cb_cls.evaluate(loaded.model, loader, loaded.tokenizer, dataset.classes, dataset.templates, "cpu",
                           amp=False)


def test_softclip_eval_equals_clip_benchmark_on_the_same_model_and_set(tiny_checkpoint, tmp_path, monkeypatch):
    checkpoint = tiny_checkpoint
    make_classification_set(tmp_path / "wds_colours")
    make_retrieval_set(tmp_path / "wds_pairs")
    cfg = EvalConfig(checkpoints=(checkpoint,), tasks=("wds/colours", "wds/pairs"), out=tmp_path / "report",
                     data_root=tmp_path, num_workers=0, device="cpu")
    payload = run_eval(cfg)
    records = {json.loads(Path(p).read_text())["dataset"]: json.loads(Path(p).read_text())
               for p in payload["files"]["clip_benchmark"]}
    assert records["wds/colours"]["task"] == "zeroshot_classification"
    assert records["wds/colours"]["metrics"] == _clip_benchmark_run(checkpoint, tmp_path / "wds_colours", "cls")
    assert records["wds/pairs"]["metrics"] == _clip_benchmark_run(checkpoint, tmp_path / "wds_pairs", "retrieval")
    # clip_benchmark build aggregates the JSON files into its CSV
    from clip_benchmark import cli

    monkeypatch.setattr("sys.argv", ["clip_benchmark", "build", str(tmp_path / "report" / "clip_benchmark"),
                                     "--output", str(tmp_path / "benchmark.csv")])
    cli.main()
    rows = list(csv.DictReader((tmp_path / "benchmark.csv").open()))
    assert {row["dataset"] for row in rows} == {"wds/colours", "wds/pairs"}
    assert float(next(r for r in rows if r["dataset"] == "wds/pairs")["text_retrieval_recall@1"]) == \
        records["wds/pairs"]["metrics"]["text_retrieval_recall@1"]


def test_coco_reads_clip_benchmarks_karpathy_annotation_in_its_order(tmp_path):
    coco = tmp_path / "coco"
    (coco / "val2014").mkdir(parents=True)
    annotation = {"images": [{"id": 42, "file_name": "COCO_val2014_000000000042.jpg"},
                             {"id": 7, "file_name": "COCO_val2014_000000000007.jpg"}],
                  "annotations": [{"image_id": 42, "caption": "a dog "}, {"image_id": 7, "caption": "a cat"},
                                  {"image_id": 42, "caption": "a brown dog"}]}
    (coco / "coco_test_karpathy.json").write_text(json.dumps(annotation))
    assert task_directory("coco", tmp_path) == coco  # no dataset_coco.json needed
    data = load_retrieval_set("coco", coco)
    assert [p.name for p in data.files] == ["COCO_val2014_000000000007.jpg", "COCO_val2014_000000000042.jpg"]
    assert data.files[0].parent == coco / "val2014"
    assert data.captions == ["a cat", "a dog", "a brown dog"] and data.caption_to_image == [0, 1, 1]
