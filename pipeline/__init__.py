__all__ = ["annotation_features", "cli", "config", "images", "img2dataset", "io", "registry", "shapes", "shards", "sources"]
