__all__ = ["cache", "cli", "config", "runner"]
