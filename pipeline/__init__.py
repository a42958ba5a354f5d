__all__ = ["annotation_features", "cli", "config", "images", "img2dataset", "io", "packed", "precision", "registry", "samples", "schedule", "shapes",
           "shapes_captions", "shards", "sources", "torchio"]
