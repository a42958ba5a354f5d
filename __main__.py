"""``python -m softclip`` runs the ``softclip`` command (torchrun needs a module to run)."""

from softclip.pipeline.cli import main

main()
