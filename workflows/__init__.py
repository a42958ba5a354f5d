__all__ = ["cache", "cli", "config", "datasets", "runner"]
