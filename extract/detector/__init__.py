"""The VinVL-compatible object-attribute detector as a library (no Ray, no shard files).

``vinvl`` (:class:`~softclip.extract.detector.vinvl.VinVLDetector`: inference, and the training
forward that returns the loss dict), ``modules`` (its parts, named as VinVL's state dict), ``legacy``
(maskrcnn_benchmark's box, anchor and resize conventions), ``postprocess`` (RPN proposals, NMS_FILTER,
attributes), ``losses`` (RPN, Fast R-CNN and attribute losses), ``checkpoint`` (VinVL checkpoints and
label maps), ``config`` (architecture, test and training settings), ``training`` and ``evaluation`` (on
box-annotated shards), ``cli`` (``softclip detect``, ``softclip detector train|eval``).
"""

__all__ = ["checkpoint", "cli", "config", "evaluation", "legacy", "losses", "modules", "postprocess", "training",
           "vinvl"]
