"""The extract stage: a VinVL-compatible detector, and the Ray job that runs it over image-text shards.

- :mod:`softclip.extract.detector`: the detector library. The model (``vinvl``) built from its parts
  (``modules``), maskrcnn_benchmark's conventions (``legacy``), post-processing, training losses, the
  checkpoint and label-map adapter, the typed config, training and tag evaluation, and the ``softclip
  detect`` / ``softclip detector`` commands. It knows nothing of Ray or shards on disk.
- :mod:`softclip.extract.job`: the extraction job, sources -> actor -> writer -> manifest. ``stages``
  reads and decodes source shards, ``actor`` runs a detector on batches, ``writer`` assembles Parquet
  (and packed) shards on the driver, ``manifest`` is the commit log, ``run`` wires them with Ray Data;
  ``softclip extract`` / ``softclip inspect`` are its commands. It uses the detector only through a
  loader (``module:callable``), and imports :mod:`softclip.extract.detector`, never the reverse.

``configs/`` holds the detector's and the job's YAML, ``weights/`` the shipped shapes detector.
"""

__all__ = ["detector", "job"]
