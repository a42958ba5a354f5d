"""Retrieval math on hand-made embeddings with exactly known recalls."""

import pytest
import torch

from softclip.eval.retrieval import image_to_text_ranks, recall_at_k, retrieval_metrics, text_to_image_ranks

IMAGES = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
# Captions 0 and 1 belong to image 0, caption 2 to image 1.
TEXTS = torch.tensor([[0.0, 1.0], [1.0, 0.1], [1.0, 0.0]])
OWNER = torch.tensor([0, 0, 1])


def test_several_captions_per_image_best_one_counts():
    # Image 0: own captions score 0 and 0.995; caption 2 (image 1) scores 1.0 -> rank 1.
    # Image 1: own caption scores 0; captions 0 (1.0) and 1 (0.0995) are above -> rank 2.
    assert image_to_text_ranks(IMAGES, TEXTS, OWNER).tolist() == [1, 2]
    # Caption 0: image 1 scores 1 > image 0's 0 -> 1. Caption 1: own image first -> 0.
    # Caption 2: image 0 scores 1 > image 1's 0 -> 1.
    assert text_to_image_ranks(IMAGES, TEXTS, OWNER).tolist() == [1, 0, 1]
    metrics = retrieval_metrics(IMAGES, TEXTS, OWNER, ks=(1, 2, 3))
    assert metrics == pytest.approx({
        "image_to_text_R@1": 0.0, "image_to_text_R@2": 0.5, "image_to_text_R@3": 1.0,
        "text_to_image_R@1": 1 / 3, "text_to_image_R@2": 1.0, "text_to_image_R@3": 1.0,
    })


def test_a_tie_with_a_negative_counts_against_the_query():
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # caption 1 (image 1) ties caption 0
    owner = torch.tensor([0, 1, 1])
    assert image_to_text_ranks(images, texts, owner).tolist() == [1, 0]
    # Caption 1 scores 1 on image 0 and 0 on its own image 1 -> rank 1; caption 0 and 2 are clean.
    assert text_to_image_ranks(images, texts, owner).tolist() == [0, 1, 0]
    tied_images = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # both images identical: every caption ties
    assert text_to_image_ranks(tied_images, texts, owner).tolist() == [1, 1, 1]


def test_positives_tying_with_each_other_do_not_count():
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    owner = torch.tensor([0, 0, 1])
    assert image_to_text_ranks(images, texts, owner).tolist() == [0, 0]


def test_chunking_does_not_change_ranks_and_agrees_with_topk():
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(37, 8, generator=gen)
    owner = torch.arange(37).repeat_interleave(3)
    texts = images[owner] + 1.5 * torch.randn(len(owner), 8, generator=gen)
    full = image_to_text_ranks(images, texts, owner, chunk_size=1000)
    assert torch.equal(full, image_to_text_ranks(images, texts, owner, chunk_size=5))
    t2i = text_to_image_ranks(images, texts, owner, chunk_size=1000)
    assert torch.equal(t2i, text_to_image_ranks(images, texts, owner, chunk_size=7))
    # Reference: CLIP-paper recall via topk (no ties in random data).
    scores = torch.nn.functional.normalize(images, dim=-1) @ torch.nn.functional.normalize(texts, dim=-1).T
    top5 = scores.topk(5, dim=1).indices
    expected = (owner[top5] == torch.arange(37)[:, None]).any(dim=1).float().mean().item()
    assert recall_at_k(full, (5,))[5] == pytest.approx(expected)
    top5_img = scores.T.topk(5, dim=1).indices
    expected_t2i = (top5_img == owner[:, None]).any(dim=1).float().mean().item()
    assert recall_at_k(t2i, (5,))[5] == pytest.approx(expected_t2i)


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="no caption"):
        retrieval_metrics(IMAGES, TEXTS[:2], OWNER[:2])
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(IMAGES * float("nan"), TEXTS, OWNER)
    with pytest.raises(ValueError, match="one image index per text"):
        retrieval_metrics(IMAGES, TEXTS, OWNER[:2])
