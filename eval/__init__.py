"""Evaluation: zero-shot classification, image-text retrieval and reports (see the submodules)."""

__all__ = ["checkpoint", "cli", "datasets", "embed", "evaluate", "report", "retrieval", "zeroshot"]
