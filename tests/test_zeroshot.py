"""Zero-shot classification math on hand-made embeddings with exactly known answers."""

import math

import pytest
import torch

from softclip.eval.zeroshot import (
    classification_metrics,
    classifier_from_template_embeddings,
    mean_per_class_recall,
    top_k_accuracy,
    true_class_ranks,
)


def test_classifier_is_renormalised_mean_of_normalised_templates():
    templates = torch.tensor([[[2.0, 0.0], [0.0, 3.0]], [[0.0, -5.0], [0.0, -1.0]]])
    w = classifier_from_template_embeddings(templates)
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(w, torch.tensor([[s, s], [0.0, -1.0]]))


def test_classifier_rejects_wrong_shape():
    with pytest.raises(ValueError, match="classes, templates, dim"):
        classifier_from_template_embeddings(torch.ones(3, 4))


def test_top_k_accuracy_known_values():
    logits = torch.tensor([[0.9, 0.5, 0.1], [0.2, 0.3, 0.1], [0.1, 0.2, 0.7], [0.6, 0.3, 0.4]])
    labels = torch.tensor([0, 0, 2, 1])
    assert true_class_ranks(logits, labels).tolist() == [0, 1, 0, 2]
    assert top_k_accuracy(logits, labels, 1) == pytest.approx(2 / 4)
    assert top_k_accuracy(logits, labels, 2) == pytest.approx(3 / 4)
    assert top_k_accuracy(logits, labels, 3) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="k=4"):
        top_k_accuracy(logits, labels, 4)


def test_ties_count_against_the_sample():
    logits = torch.tensor([[1.0, 1.0, 0.0], [0.5, 0.5, 0.5]])
    labels = torch.tensor([0, 2])
    assert true_class_ranks(logits, labels).tolist() == [1, 2]
    assert top_k_accuracy(logits, labels, 1) == 0.0
    assert top_k_accuracy(logits, labels, 2) == pytest.approx(0.5)
    assert mean_per_class_recall(logits, labels) == 0.0


def test_mean_per_class_recall_skips_a_class_no_image_belongs_to():
    # Class 2 has no sample but is predicted once; CLIP_benchmark (sklearn balanced accuracy) averages
    # over classes 0 and 1 only: (1/2 + 1/1) / 2, not (1/2 + 1 + 0) / 3.
    logits = torch.tensor([[0.9, 0.0, 0.1], [0.1, 0.0, 0.9], [0.0, 0.8, 0.2]])
    labels = torch.tensor([0, 0, 1])
    assert mean_per_class_recall(logits, labels) == pytest.approx(0.75)
    assert top_k_accuracy(logits, labels, 1) == pytest.approx(2 / 3)


def test_mean_per_class_recall_weights_classes_equally():
    logits = torch.tensor([[1.0, 0.0]] * 4 + [[1.0, 0.0]])
    labels = torch.tensor([0, 0, 0, 0, 1])
    assert top_k_accuracy(logits, labels, 1) == pytest.approx(0.8)
    assert mean_per_class_recall(logits, labels) == pytest.approx(0.5)


def test_labels_out_of_range_are_rejected():
    with pytest.raises(ValueError, match="labels must lie"):
        true_class_ranks(torch.zeros(2, 3), torch.tensor([0, 3]))


def test_nan_embeddings_are_an_error_not_a_perfect_score():
    images = torch.full((4, 6), float("nan"))
    with pytest.raises(ValueError, match="NaN or inf"):
        classification_metrics(images, torch.eye(6), torch.tensor([0, 1, 2, 3]))
    classifier = torch.eye(6)
    classifier[2] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        classification_metrics(torch.eye(6)[:4], classifier, torch.tensor([0, 1, 2, 3]))


def test_classification_metrics_end_to_end_and_top5_needs_five_classes():
    classifier = torch.eye(6)
    images = torch.eye(6)[[0, 1, 2, 3]] * 3.0
    images[3] = torch.tensor([0.0, 0.0, 0.0, 0.5, 1.0, 0.0])  # true 3, predicted 4
    metrics = classification_metrics(images, classifier, torch.tensor([0, 1, 2, 3]))
    assert metrics == pytest.approx({"top1": 0.75, "top5": 1.0, "mean_per_class_recall": 0.75})
    small = classification_metrics(torch.eye(3), torch.eye(3), torch.tensor([0, 1, 2]))
    assert small["top5"] is None and small["top1"] == 1.0


def test_agrees_with_topk_without_ties():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 10, generator=gen)
    labels = torch.randint(0, 10, (200,), generator=gen)
    top5 = logits.topk(5, dim=1).indices
    expected = (top5 == labels[:, None]).any(dim=1).float().mean().item()
    assert top_k_accuracy(logits, labels, 5) == pytest.approx(expected)
