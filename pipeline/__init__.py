__all__ = ["annotation_features", "cli", "config", "images", "img2dataset", "io", "packed", "registry", "shapes", "shards", "sources"]
