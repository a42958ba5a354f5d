"""End to end: a tiny open_clip checkpoint evaluated on a small shapes world through the CLI."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from softclip.eval.checkpoint import load_open_clip_checkpoint, register_model_config
from softclip.eval.cli import register
from softclip.eval.evaluate import EvalConfig, checkpoint_labels
from softclip.pipeline.shapes import ShapesConfig, generate

TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def _save_tiny(path: Path, *, name: str, seed: int, with_name: bool = True) -> Path:
    import open_clip

    register_model_config("softclip-test-tiny-base", TINY_CONFIG)
    torch.manual_seed(seed)
    model = open_clip.create_model("softclip-test-tiny-base")
    checkpoint = {"state_dict": model.state_dict(), "model_config": TINY_CONFIG}
    if with_name:
        checkpoint["model_name"] = name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    generate(root / "data" / "shapes", ShapesConfig(num_train=0, num_retrieval=24, num_classification_per_class=1),
             progress=False)
    clip = _save_tiny(root / "runs" / "clip" / "last.pt", name="softclip-test-tiny-a", seed=0)
    softclip = _save_tiny(root / "runs" / "softclip" / "checkpoints" / "epoch_1.pt",
                          name="softclip-test-tiny-a", seed=1)
    return root, clip, softclip


def _app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    app.callback()(lambda: None)  # keep `eval` as a subcommand
    return app


def test_loader_registers_an_unknown_architecture_from_the_checkpoint(world):
    _, clip, _ = world
    loaded = load_open_clip_checkpoint(clip)
    assert loaded.model_name == "softclip-test-tiny-a"
    saved = torch.load(clip, weights_only=True)["state_dict"]
    for key, value in loaded.model.state_dict().items():
        torch.testing.assert_close(value, saved[key])
    assert loaded.tokenizer(["a red circle."]).shape == (1, 32)


def test_loader_needs_an_architecture_name(tmp_path):
    path = _save_tiny(tmp_path / "x.pt", name="", seed=0, with_name=False)
    with pytest.raises(ValueError, match="pass --model NAME"):
        load_open_clip_checkpoint(path)
    assert load_open_clip_checkpoint(path, model_name="softclip-test-tiny-base").model_name == "softclip-test-tiny-base"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_open_clip_checkpoint(tmp_path / "missing.pt")


def test_truncated_checkpoint_is_named(tmp_path):
    path = _save_tiny(tmp_path / "x.pt", name="softclip-test-tiny-a", seed=0)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"x.pt: cannot read the checkpoint"):
        load_open_clip_checkpoint(path)


def test_default_labels_are_run_directories():
    assert checkpoint_labels((Path("runs/clip/last.pt"), Path("runs/softclip/checkpoints/epoch_1.pt"))) == [
        "clip", "softclip"]
    assert checkpoint_labels((Path("runs/a/epoch_1.pt"), Path("runs/a/epoch_2.pt"))) == ["a/epoch_1", "a/epoch_2"]


def test_config_rejects_bad_values(tmp_path):
    with pytest.raises(ValueError, match="unknown evaluation task"):
        EvalConfig(checkpoints=(tmp_path,), out=tmp_path, tasks=("cifar",))
    with pytest.raises(ValueError, match="2 labels for 1 checkpoints"):
        EvalConfig(checkpoints=(tmp_path,), out=tmp_path, labels=("a", "b"))


def test_cli_writes_side_by_side_report(world):
    root, clip, softclip = world
    out = root / "report"
    result = CliRunner().invoke(_app(), [
        "eval", "--checkpoint", str(clip), "--checkpoint", str(softclip), "--tasks", "shapes",
        "--out", str(out), "--data-root", str(root / "data"), "--batch-size", "32", "--set", "num_workers=0",
        "--set", "ties=strict",  # the policy of the many-to-many metrics, so that they bound strict recall
    ])
    assert result.exit_code == 0, result.output
    summary = result.output.strip().splitlines()[-1]
    assert "eval: 2 checkpoint(s) (clip, softclip) x 3 task(s)" in summary
    payload = json.loads((out / "results.json").read_text())
    assert payload["labels"] == ["clip", "softclip"]
    assert payload["tasks"] == ["shapes-shape", "shapes-colour_shape", "shapes-retrieval"]
    retrieval = payload["results"]["softclip"]["shapes-retrieval"]
    strict = {f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)}
    many = {f"consistent_{d}_{m}" for d in ("image_to_text", "text_to_image") for m in ("R@1", "R@5", "R@10", "mAP")}
    assert set(retrieval) == strict | many  # the shapes world lists every image a caption fits
    assert all(0.0 <= v <= 1.0 for v in retrieval.values())
    assert all(retrieval[f"consistent_{key}"] >= retrieval[key] for key in strict)  # its own image is one
    assert payload["results"]["clip"]["shapes-shape"]["top5"] is not None
    table = (out / "results.md").read_text()
    assert "| Δ (softclip − clip) |" in table and "## shapes-retrieval (24 images, 120 captions)" in table
    assert (out / "results.png").stat().st_size > 0 and (out / "eval.yaml").is_file()


def test_cli_missing_dataset_fails_before_loading_models(world, tmp_path):
    _, clip, _ = world
    result = CliRunner().invoke(_app(), [
        "eval", "-c", f"CLIP={clip}", "--tasks", "coco", "--out", str(tmp_path / "r"), "--data-root", str(tmp_path),
    ])
    assert result.exit_code != 0
    assert "dataset_coco.json" in str(result.exception) and "val2014" in str(result.exception)
    assert not (tmp_path / "r" / "results.json").exists()


def test_rerun_reuses_unchanged_results_and_recomputes_a_changed_checkpoint(world, tmp_path, monkeypatch):
    import os

    import softclip.eval.evaluate as evaluate

    root, clip, _ = world
    cfg = EvalConfig(checkpoints=(clip,), tasks=("shapes-shape",), out=tmp_path / "r",
                     data_root=root / "data", num_workers=0)
    first = evaluate.run_eval(cfg)

    def refuse(*args, **kwargs):
        raise AssertionError("the model should not be loaded again")

    with monkeypatch.context() as patch:
        patch.setattr(evaluate, "load_open_clip_checkpoint", refuse)
        assert evaluate.run_eval(cfg)["results"] == first["results"]
        os.utime(clip, ns=(clip.stat().st_atime_ns, clip.stat().st_mtime_ns + 10**9))
        with pytest.raises(AssertionError, match="should not be loaded"):
            evaluate.run_eval(cfg)
    assert evaluate.run_eval(cfg)["results"] == first["results"]


def test_classifier_matches_open_clip_build_zero_shot_classifier(world):
    from open_clip import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES, build_zero_shot_classifier

    from softclip.eval.datasets import imagenet_templates
    from softclip.eval.embed import zero_shot_classifier

    _, clip, _ = world
    loaded = load_open_clip_checkpoint(clip)
    classnames = list(IMAGENET_CLASSNAMES[:3])
    ours = zero_shot_classifier(loaded.model, loaded.tokenizer, classnames, imagenet_templates()[:7],
                                batch_size=5, device=torch.device("cpu"))
    reference = build_zero_shot_classifier(loaded.model, loaded.tokenizer, classnames,
                                           OPENAI_IMAGENET_TEMPLATES[:7], num_classes_per_batch=2)
    torch.testing.assert_close(ours, reference.T, atol=1e-5, rtol=1e-5)


def test_rerun_recomputes_a_task_regenerated_in_the_same_folder(world, tmp_path, monkeypatch):
    import softclip.eval.evaluate as evaluate

    _, clip, _ = world
    data = tmp_path / "data"
    tiny = dict(num_train=0, num_retrieval=8, num_classification_per_class=0)
    generate(data / "shapes", ShapesConfig(**tiny, seed=1), progress=False)
    cfg = EvalConfig(checkpoints=(clip,), tasks=("shapes-retrieval",), out=tmp_path / "r", data_root=data,
                     num_workers=0)
    evaluate.run_eval(cfg)
    generate(data / "shapes", ShapesConfig(**tiny, seed=2), progress=False)  # same folder, other content
    with monkeypatch.context() as patch:
        patch.setattr(evaluate, "load_open_clip_checkpoint", lambda *a, **k: pytest.fail("stale metrics reused"))
        with pytest.raises(pytest.fail.Exception, match="stale metrics reused"):
            evaluate.run_eval(cfg)
    rerun = evaluate.run_eval(cfg)["results"]
    fresh = evaluate.run_eval(dataclasses.replace(cfg, out=tmp_path / "fresh"))["results"]
    assert rerun == fresh


def test_cache_key_holds_device_and_precision(world):
    import softclip.eval.evaluate as evaluate
    from softclip.eval.datasets import load_retrieval_set, task_directory

    root, _, _ = world
    directory = task_directory("shapes-retrieval", root / "data")
    data = load_retrieval_set("shapes-retrieval", directory)
    cfg = EvalConfig(checkpoints=(Path("x.pt"),), out=root / "unused", data_root=root / "data")
    cpu = evaluate._task_data_key("shapes-retrieval", directory, data, cfg, torch.device("cpu"))
    cuda = evaluate._task_data_key("shapes-retrieval", directory, data, cfg, torch.device("cuda"))
    fp32 = evaluate._task_data_key("shapes-retrieval", directory, data, dataclasses.replace(cfg, precision="fp32"),
                                   torch.device("cuda"))
    assert (cpu["device"], cpu["precision"]) == ("cpu", "fp32")
    assert (cuda["device"], cuda["precision"], fp32["precision"]) == ("cuda", "bf16", "fp32")
    assert cpu["num_images"] == 24 and cpu["annotation_sha256"] and cpu["images_sha256"]


def test_corrupt_evaluation_cache_names_the_file(world, tmp_path):
    import softclip.eval.evaluate as evaluate

    root, clip, _ = world
    cache = tmp_path / "r" / "per_checkpoint" / "clip.json"
    cache.parent.mkdir(parents=True)
    cache.write_text("{truncated")
    cfg = EvalConfig(checkpoints=(clip,), tasks=("shapes-shape",), out=tmp_path / "r", data_root=root / "data",
                     num_workers=0)
    with pytest.raises(ValueError, match=r"clip.json: unreadable evaluation cache"):
        evaluate.run_eval(cfg)


# --- an oracle model: proves that images stay aligned with their labels and captions -----------------------
#
# Each image is a flat PNG whose grey level names what it shows (a class for classification, a picture
# number for retrieval); each text names the same thing as its first number ("shape 2", "picture 7, ...").
# The oracle embeds both as one-hot vectors of that number, so a correct pipeline scores exactly 1.0 and
# any shift between an image and its label or caption scores (close to) 0.

_ORACLE_DIM = 32
_GREY_STEP = 7  # grey level = 7 * id: exact in PNG, one id per image


def _oracle_preprocess(image) -> torch.Tensor:  # module level, so DataLoader workers can pickle it
    return torch.tensor([image.getpixel((0, 0))[0] // _GREY_STEP])


def _oracle_tokenizer(texts: list[str]) -> torch.Tensor:
    import re

    return torch.tensor([[int(re.search(r"\d+", text).group())] for text in texts])


class _OracleModel(torch.nn.Module):
    def encode_image(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(ids[:, 0].long(), _ORACLE_DIM).float()

    encode_text = encode_image


def _write_oracle_world(root: Path) -> None:
    """A shapes-layout data root: 9 classification images of 3 classes (neighbours differ) and 13
    retrieval pictures with 2 captions each, listed in a shuffled order."""
    from PIL import Image

    def png(path: Path, grey: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (grey * _GREY_STEP,) * 3).save(path)

    classification = root / "shapes" / "eval" / "classification"
    samples = [{"file": f"images/{i:02d}.png", "label": i % 3} for i in range(9)]
    for sample in samples:
        png(classification / sample["file"], sample["label"])
    (classification / "shape.json").write_text(json.dumps({
        "classnames": ["shape 0", "shape 1", "shape 2"], "templates": ["a {}.", "a photo of a {}."],
        "samples": samples}))

    retrieval = root / "shapes" / "eval" / "retrieval"
    entries = []
    for n in (7, 3, 11, 0, 9, 5, 12, 1, 8, 2, 10, 4, 6):  # JSON order != file-name order != grey order
        png(retrieval / "images" / f"p{(n * 5) % 13:02d}.png", n)
        entries.append({"filepath": "images", "filename": f"p{(n * 5) % 13:02d}.png", "split": "test",
                        "sentences": [{"raw": f"picture {n}, caption {k}."} for k in range(2)]})
    (retrieval / "dataset_karpathy.json").write_text(json.dumps({"images": entries}))


def test_a_perfect_model_scores_perfectly_at_any_batch_size_and_worker_count(tmp_path, monkeypatch):
    """run_eval (dataset loading, DataLoader batching and workers, embedding, metrics) gives an exactly
    right model top-1 = 1 and R@1 = 1 both ways, identically for batch sizes 1 / 4 / 64 and 0 / 2 workers.
    A regression that misaligns images with their labels or captions (e.g. a shifted embedding) fails."""
    import softclip.eval.evaluate as evaluate
    from softclip.eval.checkpoint import LoadedModel

    _write_oracle_world(tmp_path / "data")
    checkpoint = tmp_path / "oracle.pt"
    checkpoint.write_bytes(b"unused: the loader is replaced by the oracle")
    oracle = LoadedModel(_OracleModel(), _oracle_preprocess, _oracle_tokenizer, "oracle")
    monkeypatch.setattr(evaluate, "load_open_clip_checkpoint", lambda *args, **kwargs: oracle)

    results = {}
    for batch_size, num_workers in ((1, 0), (4, 2), (64, 0)):
        cfg = EvalConfig(checkpoints=(checkpoint,), labels=("oracle",), tasks=("shapes-shape", "shapes-retrieval"),
                         out=tmp_path / f"r{batch_size}_{num_workers}", data_root=tmp_path / "data",
                         batch_size=batch_size, num_workers=num_workers, device="cpu")
        results[batch_size, num_workers] = evaluate.run_eval(cfg)["results"]["oracle"]

    first = results[1, 0]
    assert first["shapes-shape"] == {"top1": 1.0, "top5": None, "mean_per_class_recall": 1.0}
    assert first["shapes-retrieval"]["image_to_text_R@1"] == 1.0
    assert first["shapes-retrieval"]["text_to_image_R@1"] == 1.0
    assert all(result == first for result in results.values()), results


def test_eval_refuses_a_training_checkpoint_that_fails_its_checksum(tmp_path):
    from softclip.eval.checkpoint import read_checkpoint_metadata
    from softclip.train.checkpoint import CorruptCheckpointError, save_checkpoint

    path = save_checkpoint(tmp_path, 5, {"model_name": "RN50", "step": 5, "state_dict": {"w": torch.zeros(64)}})
    assert read_checkpoint_metadata(path) == {"model_name": "RN50", "step": 5}
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match=str(path)):
        read_checkpoint_metadata(path)


def test_clip_benchmark_records_keep_the_many_to_many_metrics_under_their_own_names():
    from softclip.eval.clip_benchmark import clip_benchmark_metrics

    kind, metrics = clip_benchmark_metrics({"image_to_text_R@1": 0.5, "text_to_image_R@5": 0.25,
                                            "consistent_text_to_image_mAP": 0.75})
    assert kind == "zeroshot_retrieval"
    assert metrics == {"text_retrieval_recall@1": 0.5, "image_retrieval_recall@5": 0.25,
                       "consistent_text_to_image_mAP": 0.75}
    with pytest.raises(ValueError, match="no CLIP_benchmark name"):
        clip_benchmark_metrics({"image_to_text_R@1": 0.5, "mystery": 1.0})
