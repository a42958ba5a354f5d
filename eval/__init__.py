__all__ = ["checkpoint", "cli", "clip_benchmark", "datasets", "embed", "evaluate", "image_retrieval", "report", "retrieval",
           "zeroshot"]
