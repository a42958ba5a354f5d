__all__ = ["checkpoint", "cli", "config", "data", "loop", "losses", "metrics", "model"]
