"""The model: ROI aggregators (masking, zero boxes) and checkpoints that open_clip loads."""

from __future__ import annotations

import open_clip
import pytest
import torch

from softclip.eval.checkpoint import load_open_clip_checkpoint
from softclip.train.config import ModelConfig
from softclip.train.model import (
    ROIEncoder,
    TextEMA,
    build_model,
    encode_text_trimmed,
    register_model_configs,
)

TINY = ModelConfig(name="shapes-tiny", roi_feature_dim=72, roi_width=32, roi_heads=4)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model(TINY)


@pytest.mark.parametrize("aggregator", ["pool", "mhsa", "mean", "max", "min"])
def test_roi_encoder_masks_padding_and_handles_zero_boxes(aggregator):
    torch.manual_seed(0)
    encoder = ROIEncoder(10, 16, 8, heads=4, aggregator=aggregator).eval()
    features, geometry = torch.randn(3, 5, 10), torch.rand(3, 5, 6)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    out = encoder(features, geometry, mask)
    assert out.shape == (3, 8) and torch.isfinite(out).all()
    noisy = features.clone()
    noisy[~mask] = 1e3  # padding content must not matter
    torch.testing.assert_close(encoder(noisy, geometry, mask), out)
    # an image without boxes gets the learned no-box embedding, whatever its padding holds
    torch.testing.assert_close(out[2], encoder(noisy[2:], geometry[2:] * 0, mask[2:])[0])
    out.sum().backward()
    assert encoder.no_box.grad is not None and encoder.no_box.grad.abs().sum() > 0


def test_mhsa_attends_among_the_boxes_and_pool_does_not():
    torch.manual_seed(0)
    features, geometry = torch.randn(1, 2, 10), torch.rand(1, 2, 6)
    first = torch.tensor([[True, False]])
    mhsa = ROIEncoder(10, 16, 8, heads=4, aggregator="mhsa").eval()
    tokens = mhsa.input_norm(mhsa.input_proj(torch.cat([features, geometry], -1)))
    with_other = mhsa.encoder(tokens)[0, 0]
    alone = mhsa.encoder(tokens[:, :1])[0, 0]
    assert not torch.allclose(with_other, alone, atol=1e-4)  # box 0's token depends on box 1: self-attention
    assert not hasattr(mhsa, "query") and hasattr(ROIEncoder(10, 16, 8, heads=4, aggregator="pool"), "query")
    assert torch.isfinite(mhsa(features, geometry, first)).all()


def test_text_ema_follows_the_text_tower_only(tiny):
    model, _, _, tokenizer = tiny
    ema = TextEMA(model.clip)
    assert not any(name.startswith("visual.") and p.numel() for name, p in ema.clip.named_parameters())
    assert not any(p.requires_grad for p in ema.parameters()) and model.clip.visual is not None
    tags = tokenizer(["red circle, blue star", "green square"])
    torch.testing.assert_close(ema(tags), encode_text_trimmed(model.clip, tags))
    online = dict(model.clip.named_parameters())
    before = {n: p.clone() for n, p in ema.clip.named_parameters()}
    with torch.no_grad():
        online["token_embedding.weight"].add_(1.0)
    ema.update(model.clip, 0.9)
    moved = dict(ema.clip.named_parameters())["token_embedding.weight"]
    torch.testing.assert_close(moved, before["token_embedding.weight"] + 0.1)
    with torch.no_grad():
        online["token_embedding.weight"].sub_(1.0)


def test_unknown_aggregator_and_model_name():
    with pytest.raises(ValueError, match="aggregator"):
        ROIEncoder(4, 8, 8, aggregator="median")
    with pytest.raises(ValueError, match="unknown open_clip model config"):
        build_model(ModelConfig(name="no-such-model"))


def test_forward_returns_unit_embeddings(tiny):
    model, _, _, tokenizer = tiny
    texts = tokenizer(["a red circle", "two blue stars"])
    out = model(torch.randn(2, 3, 64, 64), texts, tags=tokenizer(["red circle", ""]),
                roi_features=torch.randn(2, 3, 72), roi_geometry=torch.rand(2, 3, 6),
                roi_mask=torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool))
    for key in ("image", "text", "tag", "roi"):
        assert out[key].shape == (2, 64)
        torch.testing.assert_close(out[key].norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(out["logit_scale"], torch.tensor(1 / 0.07), rtol=1e-4, atol=0)
    torch.testing.assert_close(out["text"], model.clip.encode_text(texts, normalize=True))


def test_checkpoint_loads_through_open_clip(tiny, tmp_path):
    assert "shapes-tiny" in register_model_configs()
    model, _, _, tokenizer = tiny
    path = tmp_path / "latest.pt"
    torch.save({"state_dict": model.clip.state_dict(), "model_name": "shapes-tiny-copy",
                "model_config": open_clip.get_model_config("shapes-tiny")}, path)
    loaded_model = load_open_clip_checkpoint(path)  # registers the unknown name
    loaded, loaded_tokenizer = loaded_model.model, loaded_model.tokenizer
    image = torch.randn(1, 3, 64, 64)
    model.eval()
    torch.testing.assert_close(loaded.encode_image(image), model.clip.encode_image(image))
    via_open_clip, _, _ = open_clip.create_model_and_transforms("shapes-tiny-copy", pretrained=str(path))
    torch.testing.assert_close(via_open_clip.state_dict()["logit_scale"], model.clip.state_dict()["logit_scale"])
    assert torch.equal(loaded_tokenizer(["a star"]), tokenizer(["a star"]))
    with pytest.raises(FileNotFoundError):
        load_open_clip_checkpoint(tmp_path / "missing.pt")


def test_trimmed_text_encoding_is_exact(tiny):
    model, _, _, tokenizer = tiny
    model.eval()
    texts = tokenizer(["a red circle", "a big blue star to the left of a small green square", ""])
    trimmed = encode_text_trimmed(model.clip, texts)
    torch.testing.assert_close(trimmed, model.clip.encode_text(texts, normalize=True), rtol=1e-5, atol=1e-6)
    full = torch.full_like(texts, 400)  # no padding at all: nothing to trim
    torch.testing.assert_close(encode_text_trimmed(model.clip, full), model.clip.encode_text(full, normalize=True))
