__all__ = ["checkpoint", "cli", "datasets", "embed", "evaluate", "report", "retrieval", "zeroshot"]
