"""CUDA paths (skipped without a GPU, see conftest): the detector and a training step on the device agree
with the CPU, in fp32 and under bf16 autocast."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu


def test_detector_on_cuda_matches_cpu(tmp_path):
    from test_vinvl import ATTRIBUTES, CLASSES, TINY, _images, _randomise

    from softclip.extract.detector.checkpoint import write_checkpoint, write_labelmap
    from softclip.extract.detector.vinvl import VinVLDetector

    torch.manual_seed(0)
    write_checkpoint(tmp_path / "model.pth",
                     _randomise(VinVLDetector(TINY, class_names=CLASSES, attribute_names=ATTRIBUTES)).state_dict())
    write_labelmap(tmp_path / "labelmap.json", CLASSES, ATTRIBUTES)
    files = (tmp_path / "model.pth", tmp_path / "labelmap.json")
    cpu = VinVLDetector.from_checkpoint(*files, config=TINY).detect(_images())
    gpu = VinVLDetector.from_checkpoint(*files, config=TINY, device="cuda").detect(_images())
    bf16 = VinVLDetector.from_checkpoint(*files, config=TINY, device="cuda", precision="bf16").detect(_images())
    for a, b, c in zip(cpu, gpu, bf16):
        assert np.array_equal(a["labels"], b["labels"])
        np.testing.assert_allclose(a["boxes"], b["boxes"], atol=1e-2)
        np.testing.assert_allclose(a["features"], b["features"], atol=1e-2, rtol=1e-2)
        assert len(c["boxes"]) > 0 and np.isfinite(c["features"].astype(np.float32)).all()


def test_train_step_on_cuda_matches_cpu_and_bf16_is_finite():
    from pathlib import Path

    from softclip.train.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
    from softclip.train.data import tagset_ids
    from softclip.train.loop import param_groups, train_step
    from softclip.train.losses import SoftCLIPLoss
    from softclip.train.model import build_model

    def step(device: str, precision: str) -> float:
        torch.manual_seed(0)
        model, _, _, tokenizer = build_model(ModelConfig(name="shapes-tiny", roi_feature_dim=8, roi_width=32,
                                                         roi_heads=4))
        model.to(device)
        gen = torch.Generator().manual_seed(0)
        batch = {"images": torch.randn(8, 3, 64, 64, generator=gen), "texts": tokenizer(["a red circle"] * 8),
                 "tags": tokenizer(["red circle"] * 8), "roi_features": torch.rand(8, 3, 8, generator=gen).half(),
                 "roi_geometry": torch.rand(8, 3, 6, generator=gen), "roi_mask": torch.ones(8, 3, dtype=torch.bool),
                 "tagset": torch.tensor([tagset_ids("red circle, blue star")] * 8)}
        cfg = TrainConfig(run_dir=Path("unused"), model=ModelConfig(name="shapes-tiny"),
                          data=DataConfig(train_shards="x"), optim=OptimConfig(precision=precision))
        optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, fused=True)
        return float(train_step(model, SoftCLIPLoss(), optimizer, batch, cfg, torch.device(device))["loss"])

    cpu, gpu, bf16 = step("cpu", "fp32"), step("cuda", "fp32"), step("cuda", "bf16")
    assert gpu == pytest.approx(cpu, rel=1e-3) and np.isfinite(bf16) and bf16 == pytest.approx(cpu, rel=5e-2)
