__all__ = ["checkpoint", "cli", "consistent", "datasets", "embed", "evaluate", "report", "retrieval", "zeroshot"]
