__all__ = ["annotation_features", "cli", "config", "images", "img2dataset", "io", "packed", "registry", "schedule", "shapes",
           "shapes_captions", "shards", "sources", "torchio"]
