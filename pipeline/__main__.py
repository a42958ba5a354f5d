"""``python -m pipeline`` runs the ``softclip`` command (used by torchrun, which needs a module)."""

from pipeline.cli import main

main()
