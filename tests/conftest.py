"""Shared fixtures: small shapes worlds generated once per test session."""

from __future__ import annotations

import pytest

from softclip.pipeline.shapes import ShapesConfig, generate

SMALL_WORLD = ShapesConfig(num_train=120, num_retrieval=12, num_classification_per_class=1,
                           samples_per_shard=50, seed=7)


@pytest.fixture(scope="session")
def shapes_world(tmp_path_factory):
    """A small clean shapes world: 120 training pairs in 3 shards, 12 retrieval images, 64 classification."""
    out = tmp_path_factory.mktemp("shapes_world")
    generate(out, SMALL_WORLD, progress=False)
    return out


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped where torch sees no CUDA device."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """An untrained ``shapes-tiny`` open_clip model saved as softclip train saves its towers (seed 0)."""
    import open_clip
    import torch

    from softclip.train.model import register_model_configs

    register_model_configs()
    torch.manual_seed(0)
    model = open_clip.create_model("shapes-tiny")
    path = tmp_path_factory.mktemp("tiny_checkpoint") / "tiny.pt"
    torch.save({"state_dict": model.state_dict(), "model_name": "shapes-tiny", "step": 7,
                "model_config": open_clip.get_model_config("shapes-tiny")}, path)
    return path
