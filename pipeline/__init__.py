__all__ = ["annotation_features", "cli", "config", "images", "img2dataset", "io", "packed", "precision", "registry", "schedule", "shapes",
           "shapes_captions", "shards", "sources", "torchio"]
