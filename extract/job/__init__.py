"""The extraction job: image-text shards in, Parquet feature shards (and packed training shards) out.

Data path: ``stages`` (read a source shard, decode and validate every image: CPU tasks) -> ``actor``
(a detector per Ray actor, batches in, Arrow tables out) -> ``writer`` (the driver appends rows to one
Parquet file, and a packed tar, per input shard and commits it) -> ``manifest`` (the commit log that
makes reruns exact). ``run`` wires them with Ray Data (``ray_local`` keeps a private cluster tied to the
driver), ``config`` holds the job's settings, ``inspect`` summarises an output folder and ``cli`` adds
``softclip extract`` and ``softclip inspect``. The detector comes from :mod:`softclip.extract.detector`
through ``ExtractConfig.loader``; nothing here is imported by the detector.
"""

__all__ = ["actor", "cli", "config", "inspect", "manifest", "ray_local", "run", "stages", "writer"]
