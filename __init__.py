"""softclip: SoftCLIP at CC3M/CC12M scale, and end to end on a laptop.

The repository's top-level folders are this package's subpackages, installed under one name:
``softclip.pipeline`` (shared core), ``softclip.extract`` (detector + Ray job), ``softclip.train``,
``softclip.eval`` and ``softclip.workflows``. Data flows pipeline -> extract -> train -> eval; workflows
sits on top.
"""

__all__ = ["eval", "extract", "pipeline", "train", "workflows"]
