__all__ = ["annotation_features", "cli", "config", "images", "img2dataset", "io", "registry", "shapes", "shapes_captions", "shards", "sources"]
