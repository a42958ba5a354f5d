__all__ = ["annotation_features", "cli", "config", "images", "img2dataset", "io", "packed", "registry", "shapes",
           "shapes_captions", "shards", "sources"]
