__all__ = ["checkpoint", "cli", "clip_benchmark", "consistent", "datasets", "embed", "evaluate", "image_retrieval",
           "report", "retrieval", "zeroshot"]
