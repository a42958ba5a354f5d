__all__ = ["checkpoint", "cli", "config", "data", "export", "loop", "losses", "metrics", "model", "runtime"]
