"""``softclip export`` and the export at the end of training: plain open_clip (in a process that never imports
softclip) loads ``local-dir:`` and gives bit-identical embeddings (issue 12, gap 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from softclip.eval.checkpoint import load_open_clip_checkpoint
from softclip.pipeline.annotation_features import write_annotation_shards
from softclip.pipeline.cli import build_app
from softclip.pipeline.config import apply_overrides, load_config
from softclip.train.config import TrainConfig
from softclip.train.export import CONFIG_NAME, WEIGHTS_NAME, export_open_clip
from softclip.train.loop import train

CONFIGS = Path(__file__).parents[1] / "train" / "configs"
CAPTIONS = ["a red circle", "two blue squares on a striped background", "a small green triangle"]

# Runs in a fresh interpreter with open_clip only; fails if anything imported softclip.
PLAIN_OPEN_CLIP = """
import sys, json, numpy as np, torch, open_clip
from PIL import Image
folder, images, captions, out = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + folder)
tokenizer = open_clip.get_tokenizer("local-dir:" + folder)
model.eval()
with torch.no_grad():
    x = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in images])
    np.savez(out, image=model.encode_image(x).numpy(), text=model.encode_text(tokenizer(captions)).numpy())
assert not any(name.split(".")[0] == "softclip" for name in sys.modules), "softclip was imported"
"""


@pytest.fixture(scope="module")
def run_dir(shapes_world, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export")
    write_annotation_shards(shapes_world / "train", root / "shapes" / "packed", progress=False)
    cfg = apply_overrides(load_config(TrainConfig, CONFIGS / "shapes-softclip.yaml"), [
        f"run_dir={root / 'run'}", f"data.root={root}", "data.batch_size=16", "data.num_workers=0",
        "data.shuffle_buffer=16", "model.roi_width=32", "optim.max_steps=2", "log.progress=false",
        "log.tensorboard=false"])
    threads = torch.get_num_threads()
    train(cfg)
    assert torch.get_num_threads() == threads  # training sets its own and puts the caller's back
    return root / "run"


def _plain_open_clip(folder: Path, images: list[Path], tmp_path: Path) -> dict[str, np.ndarray]:
    out = tmp_path / "plain.npz"
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}  # no PYTHONPATH: no softclip
    subprocess.run([sys.executable, "-c", PLAIN_OPEN_CLIP, str(folder), json.dumps(list(map(str, images))),
                    json.dumps(CAPTIONS), str(out)], check=True, env=env, cwd=tmp_path, timeout=300)
    return dict(np.load(out))


def test_training_writes_an_open_clip_folder_that_loads_bit_identically(run_dir, shapes_world, tmp_path):
    folder = run_dir / "open_clip"
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    images = sorted((shapes_world / "eval" / "retrieval" / "images").glob("*.jpg"))[:4]
    plain = _plain_open_clip(folder, images, tmp_path)
    loaded = load_open_clip_checkpoint(run_dir / "checkpoints" / "latest.pt")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the plain process (OMP_NUM_THREADS=1): reductions split by thread count
    try:
        with torch.no_grad():
            x = torch.stack([loaded.preprocess(Image.open(p).convert("RGB")) for p in images])
            ours_image = loaded.model.encode_image(x).numpy()
            ours_text = loaded.model.encode_text(loaded.tokenizer(CAPTIONS)).numpy()
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(plain["image"], ours_image) and np.array_equal(plain["text"], ours_text)


def test_export_command_drops_optimizer_state_and_is_reproducible(run_dir, tmp_path):
    checkpoint = run_dir / "checkpoints" / "latest.pt"
    result = CliRunner().invoke(build_app(), ["export", str(checkpoint), "--out", str(tmp_path / "x")])
    assert result.exit_code == 0, result.output
    assert "local-dir:" in result.output
    for name in (CONFIG_NAME, WEIGHTS_NAME):  # same bytes as the export written by training
        assert (tmp_path / "x" / name).read_bytes() == (run_dir / "open_clip" / name).read_bytes()
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "x" / WEIGHTS_NAME)
    ckpt = torch.load(checkpoint, weights_only=True)
    assert weights.keys() == ckpt["state_dict"].keys()
    assert (tmp_path / "x" / WEIGHTS_NAME).stat().st_size < checkpoint.stat().st_size / 2
    config = json.loads((tmp_path / "x" / CONFIG_NAME).read_text())
    assert config["model_cfg"] == ckpt["model_config"]


def test_export_refuses_what_is_not_a_training_checkpoint(tmp_path):
    bare = tmp_path / "bare.pt"
    torch.save({"weight": torch.zeros(2)}, bare)
    with pytest.raises(ValueError, match="no 'state_dict'"):
        export_open_clip(bare, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_open_clip(tmp_path / "missing.pt", tmp_path / "out")
